//! virtio-blk requests: how one travels in a descriptor chain, and how it is checked and carried
//! out.
//!
//! Every request is a `struct virtio_blk_req` (virtio 1.2, 5.2.6), little endian:
//!
//! ```text
//! offset  size  field              who writes it
//!      0     4  type               driver   IN 0, OUT 1, FLUSH 4, GET_ID 8, ...
//!      4     4  reserved           driver   (ioprio in legacy drivers; ignored)
//!      8     8  sector             driver   in 512-byte units, whatever the block size
//!     16     n  data               driver for OUT, device for IN and GET_ID
//!   16+n     1  status             device   OK 0, IOERR 1, UNSUPP 2
//! ```
//!
//! The spec's message-framing rule (2.6.4) forbids the device to assume how these bytes are cut
//! into descriptors, only that the device-readable ones come first. Linux sends one descriptor
//! for the header, one per data segment and one for the status byte, but nothing here depends
//! on that: the chain is read as two byte streams, as QEMU does. The header is the first 16
//! device-readable bytes; the status is the last device-writable byte; the data is what lies
//! between (the rest of the readable stream for OUT, the writable stream but its last byte for
//! IN and GET_ID).
//!
//! What is refused, with `VIRTIO_BLK_S_IOERR` written to the status byte: a readable descriptor
//! after a writable one; fewer than 16 readable bytes; IN/OUT data that is not a whole number of
//! sectors, that runs past the end of the disk (or whose offset overflows), or that travels the
//! wrong way (IN data in readable descriptors, OUT data in writable ones); OUT on a read-only disk
//! (the spec's device requirement; a Linux driver that saw `VIRTIO_BLK_F_RO` never sends one);
//! guest addresses outside guest memory. Unknown types get `VIRTIO_BLK_S_UNSUPP`. A chain with no
//! writable byte at all has nowhere to put a status: it is returned with a used length of 0. In
//! every case the chain goes back to the used ring: a malformed request never stalls the queue.

use std::io::ErrorKind;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::DiskFile;

/// Bytes in a sector (the unit of `sector` and of the capacity, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (type, reserved, sector).
pub const HDR_LEN: usize = 16;
/// Size of the device ID that `GET_ID` returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// Request types (`VIRTIO_BLK_T_*`).
pub mod req_type {
    /// Read sectors into the data buffers.
    pub const IN: u32 = 0;
    /// Write the data buffers to sectors.
    pub const OUT: u32 = 1;
    /// Make completed writes durable.
    pub const FLUSH: u32 = 4;
    /// Fetch the device ID string.
    pub const GET_ID: u32 = 8;
}

/// Status values (`VIRTIO_BLK_S_*`).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed or was malformed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// A run of guest memory, one descriptor's or a part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` after its first `n` bytes (`n` at most their total length).
fn split_front(segs: &[Segment], n: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut front, mut back) = (Vec::new(), Vec::new());
    let mut left = n;
    for s in segs {
        let len = u64::from(s.len);
        if left >= len {
            front.push(*s);
            left -= len;
        } else if left > 0 {
            // `left` < `s.len`, a u32: both conversions are lossless.
            let head = left as u32;
            front.push(Segment {
                addr: s.addr,
                len: head,
            });
            back.push(Segment {
                addr: GuestAddress(s.addr.0.wrapping_add(left)),
                len: s.len - head,
            });
            left = 0;
        } else {
            back.push(*s);
        }
    }
    (front, back)
}

/// What the driver asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`.
    In,
    /// `VIRTIO_BLK_T_OUT`.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// Any other type.
    Unsupported(u32),
}

impl RequestKind {
    fn from_raw(t: u32) -> Self {
        match t {
            req_type::IN => Self::In,
            req_type::OUT => Self::Out,
            req_type::FLUSH => Self::Flush,
            req_type::GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// Why a request was refused before any I/O.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// No device-writable byte to put the status in.
    #[error("no device-writable byte for the status")]
    NoStatus,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer readable bytes than a header.
    #[error("header too short: {0} device-readable bytes, need {HDR_LEN}")]
    HeaderTooShort(u64),
    /// The header is not in guest memory.
    #[error("cannot read the header: {0}")]
    Header(String),
    /// IN/OUT data that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    DataLength(u64),
    /// IN/OUT data beyond the end of the disk.
    #[error("sector {sector} + {len} bytes is beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// IN data in device-readable descriptors, or OUT data in device-writable ones.
    #[error("{0} data in descriptors of the wrong direction")]
    WrongDirection(&'static str),
}

/// A request that could not be parsed, and where its status byte is (if it has one).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong.
    pub error: RequestError,
    /// The status byte, to report `VIRTIO_BLK_S_IOERR` in.
    pub status: Option<GuestAddress>,
}

/// A parsed, checked request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (IN and OUT).
    pub sector: u64,
    /// The data buffers: device-readable for OUT, device-writable for IN and GET_ID, empty for
    /// the rest.
    pub data: Vec<Segment>,
    /// The status byte.
    pub status: GuestAddress,
}

/// What executing a request produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status byte to write.
    pub status: u8,
    /// Bytes written into the data buffers (the used length is this plus the status byte).
    pub written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

impl Request {
    /// Parses and checks the request in `chain` against a disk of `capacity` sectors.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        capacity: u64,
    ) -> Result<Self, Malformed> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut misordered = false;
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                misordered |= !writable.is_empty();
                readable.push(seg);
            }
        }
        // The status is the last writable byte.
        let status = writable
            .last()
            .and_then(|s| s.addr.0.checked_add(u64::from(s.len) - 1))
            .map(GuestAddress);
        let fail = |error| Malformed { error, status };
        let Some(status_addr) = status else {
            return Err(fail(RequestError::NoStatus));
        };
        if misordered {
            return Err(fail(RequestError::ReadableAfterWritable));
        }
        let readable_len = total_len(&readable);
        if readable_len < HDR_LEN as u64 {
            return Err(fail(RequestError::HeaderTooShort(readable_len)));
        }
        let (hdr_segs, out_data) = split_front(&readable, HDR_LEN as u64);
        let mut hdr = [0u8; HDR_LEN];
        let mut at = 0;
        for s in &hdr_segs {
            let end = at + s.len as usize;
            mem.read_slice(&mut hdr[at..end], s.addr)
                .map_err(|e| fail(RequestError::Header(e.to_string())))?;
            at = end;
        }
        let kind = RequestKind::from_raw(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let in_data = split_front(&writable, total_len(&writable) - 1).0;

        let data = match kind {
            RequestKind::In | RequestKind::Out => {
                let (data, name, stray) = if kind == RequestKind::In {
                    (in_data, "IN", !out_data.is_empty())
                } else {
                    (out_data, "OUT", !in_data.is_empty())
                };
                if stray {
                    return Err(fail(RequestError::WrongDirection(name)));
                }
                let len = total_len(&data);
                if len % SECTOR_SIZE != 0 {
                    return Err(fail(RequestError::DataLength(len)));
                }
                let end = sector
                    .checked_add(len / SECTOR_SIZE)
                    .filter(|&end| end <= capacity);
                if end.is_none() {
                    return Err(fail(RequestError::OutOfRange {
                        sector,
                        len,
                        capacity,
                    }));
                }
                data
            }
            RequestKind::GetId => in_data,
            RequestKind::Flush | RequestKind::Unsupported(_) => Vec::new(),
        };
        Ok(Self {
            kind,
            sector,
            data,
            status: status_addr,
        })
    }

    /// Carries the request out on `disk` (read-only if `read_only`); `id` is the answer to
    /// GET_ID.
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut DiskFile,
        read_only: bool,
        id: &[u8; ID_BYTES],
    ) -> Outcome {
        // In range for IN and OUT (checked in `parse`); anything for the other types.
        let offset = self.sector.wrapping_mul(SECTOR_SIZE);
        let result = match self.kind {
            RequestKind::In => disk
                .read_into(mem, offset, &self.data)
                .map(|()| total_len(&self.data)),
            RequestKind::Out if read_only => {
                return Outcome::status(status::IOERR);
            }
            RequestKind::Out => disk.write_from(mem, offset, &self.data).map(|()| 0),
            RequestKind::Flush => disk.flush().map(|()| 0),
            RequestKind::GetId => write_id(mem, &self.data, id),
            RequestKind::Unsupported(_) => return Outcome::status(status::UNSUPP),
        };
        match result {
            Ok(written) => Outcome {
                status: status::OK,
                // At most the chain's writable bytes, which a u32 descriptor length bounds
                // only per descriptor: saturate rather than wrap.
                written: u32::try_from(written).unwrap_or(u32::MAX),
            },
            Err(e) => {
                tracing::debug!(kind = ?self.kind, sector = self.sector, "virtio-blk: I/O error: {e}");
                Outcome::status(status::IOERR)
            }
        }
    }
}

/// Writes the ID (as much as the buffers hold, at most [`ID_BYTES`]) into `data`.
fn write_id(mem: &GuestMemoryMmap, data: &[Segment], id: &[u8; ID_BYTES]) -> std::io::Result<u64> {
    let mut rest: &[u8] = id;
    for s in data {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(s.len as usize);
        mem.write_slice(&rest[..n], s.addr)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        rest = &rest[n..];
    }
    Ok((ID_BYTES - rest.len()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_front_cuts_inside_and_between_segments() {
        let segs = [seg(0x1000, 10), seg(0x2000, 6), seg(0x3000, 4)];
        assert_eq!(split_front(&segs, 0), (vec![], segs.to_vec()));
        assert_eq!(
            split_front(&segs, 12),
            (
                vec![seg(0x1000, 10), seg(0x2000, 2)],
                vec![seg(0x2002, 4), seg(0x3000, 4)]
            )
        );
        assert_eq!(
            split_front(&segs, 16),
            (vec![seg(0x1000, 10), seg(0x2000, 6)], vec![seg(0x3000, 4)])
        );
        assert_eq!(split_front(&segs, 20), (segs.to_vec(), vec![]));
        assert_eq!(total_len(&segs), 20);
    }

    #[test]
    fn kinds_from_raw_types() {
        assert_eq!(RequestKind::from_raw(0), RequestKind::In);
        assert_eq!(RequestKind::from_raw(1), RequestKind::Out);
        assert_eq!(RequestKind::from_raw(4), RequestKind::Flush);
        assert_eq!(RequestKind::from_raw(8), RequestKind::GetId);
        assert_eq!(RequestKind::from_raw(11), RequestKind::Unsupported(11));
    }
}
