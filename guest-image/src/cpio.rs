//! A writer of newc ("070701") cpio archives, the format the kernel's initramfs unpacker reads.
//! Reproducible: uid/gid 0, mtime 0, inode numbers counted from 1 in the order entries are added.
//! Parent directories must be added before their contents (the kernel does not create them).

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far (padding is relative to the start of the archive).
    offset: u64,
    next_ino: u32,
}

/// The metadata of one entry.
struct Header<'a> {
    name: &'a str,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

impl<W: Write> Writer<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory (`mode` = permission bits, e.g. 0o755).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with these contents.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        if target.is_empty() {
            return Err(invalid(format!("symlink {path:?} has an empty target")));
        }
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_entry(
            &Header {
                name: TRAILER,
                ino: 0,
                mode: 0,
                nlink: 1,
                filesize: 0,
                rdev: (0, 0),
            },
            &[],
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = archive_name(path)?;
        let filesize = u32::try_from(data.len()).map_err(|_| {
            invalid(format!(
                "{path:?}: {} bytes is too large for cpio newc",
                data.len()
            ))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_entry(
            &Header {
                name,
                ino,
                mode,
                nlink,
                filesize,
                rdev,
            },
            data,
        )
    }

    fn write_entry(&mut self, h: &Header<'_>, data: &[u8]) -> io::Result<()> {
        let namesize = h.name.len() as u32 + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize, check
        let fields = [
            h.ino, h.mode, 0, 0, h.nlink, 0, h.filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.write(header.as_bytes())?;
        self.write(h.name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Zero bytes up to the next multiple of 4.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0; 3][..n])
    }
}

/// The name stored in the archive: relative, as the kernel and `cpio -i` expect (`/init` → `init`).
fn archive_name(path: &str) -> io::Result<&str> {
    let name = path.trim_start_matches('/');
    if name.is_empty() || name == TRAILER || name.contains('\0') {
        return Err(invalid(format!("{path:?} is not a valid archive path")));
    }
    Ok(name)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry.
    #[derive(Debug)]
    struct Parsed {
        name: String,
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A strict newc reader: checks the magic, the padding (zeros, to 4 bytes) and the trailer.
    fn parse(archive: &[u8]) -> Vec<Parsed> {
        let mut pos = 0;
        let mut out = Vec::new();
        let padded = |pos: usize| pos.div_ceil(4) * 4;
        loop {
            assert_eq!(pos % 4, 0, "entry at {pos} is not aligned");
            let h = &archive[pos..pos + 110];
            assert_eq!(&h[..6], b"070701", "bad magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
                assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "field {i} {s:?}");
                u32::from_str_radix(s, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let filesize = field(6) as usize;
            let name_start = pos + 110;
            let name = &archive[name_start..name_start + namesize];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = padded(name_start + namesize);
            assert!(archive[name_start + namesize..data_start]
                .iter()
                .all(|&b| b == 0));
            let data_end = data_start + filesize;
            let next = padded(data_end);
            assert!(archive[data_end..next].iter().all(|&b| b == 0));
            pos = next;
            if name == TRAILER {
                assert_eq!(pos, archive.len(), "bytes after the trailer");
                return out;
            }
            out.push(Parsed {
                name,
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data: archive[data_start..data_end].to_vec(),
            });
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.dir("tmp", 0o1777).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("/empty", 0o644, b"").unwrap();
        w.file("/odd", 0o600, b"abcde").unwrap();
        w.symlink("/bin", "usr/bin").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn writes_what_it_reads_back() {
        let entries = parse(&sample());
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "tmp", "init", "empty", "odd", "bin"]
        );
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("dev").mode, 0o040_755);
        assert_eq!(by("dev").nlink, 2);
        assert_eq!(by("tmp").mode, 0o041_777);
        assert_eq!(by("dev/console").mode, 0o020_600);
        assert_eq!(by("dev/console").rdev, (5, 1));
        assert_eq!(by("init").mode, 0o100_755);
        assert_eq!(by("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(by("init").nlink, 1);
        assert_eq!(by("odd").data, b"abcde");
        assert!(by("empty").data.is_empty());
        assert_eq!(by("bin").mode, 0o120_777);
        assert_eq!(by("bin").data, b"usr/bin");
        for e in &entries {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.name);
        }
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.sort();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers must be unique");
    }

    #[test]
    fn is_reproducible() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(w.symlink("a", "").is_err());
    }

    #[test]
    fn cpio_tool_lists_it() {
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-it", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio not installed: skipping");
            return;
        };
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 7, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("crw-------") && lines[1].contains(" 5,"),
            "{listing}"
        );
        assert!(lines[2].starts_with("drwxrwxrwt"), "{listing}");
        assert!(
            lines[3].starts_with("-rwxr-xr-x") && lines[3].ends_with(" init"),
            "{listing}"
        );
        assert!(
            lines[6].starts_with("lrwxrwxrwx") && lines[6].ends_with("bin -> usr/bin"),
            "{listing}"
        );
    }
}
