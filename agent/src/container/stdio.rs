//! A container process's standard streams, as the agent holds them: the agent's ends of the
//! stdin/stdout/stderr pipes, or the master of the process's pty, made non-blocking and driven by
//! tokio ([`Stream`]). Nothing is buffered in the agent: a read takes what the pipe holds (the
//! process blocks when the pipe is full: back-pressure), a write waits until the pipe takes it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The child's ends of the pipes (each `None`: /dev/null), and the agent's.
#[derive(Debug, Default)]
pub struct Pipes {
    /// Given to the helper as its stdin, stdout, stderr.
    pub child: [Option<OwnedFd>; 3],
    /// The agent's ends: stdin's write end, stdout's and stderr's read ends.
    pub ours: [Option<Stream>; 3],
}

impl Pipes {
    /// Pipes for stdout and stderr, and for stdin if `stdin`.
    pub fn new(stdin: bool) -> io::Result<Self> {
        let mut p = Pipes::default();
        if stdin {
            let (r, w) = pipe()?;
            p.child[0] = Some(r);
            p.ours[0] = Some(Stream::new(w)?);
        }
        for i in 1..3 {
            let (r, w) = pipe()?;
            p.child[i] = Some(w);
            p.ours[i] = Some(Stream::new(r)?);
        }
        Ok(p)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// One non-blocking stream (a pipe end or a pty master).
#[derive(Debug)]
pub struct Stream {
    fd: AsyncFd<OwnedFd>,
}

impl Stream {
    /// Takes `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL)?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the AsyncFd owns `fd`, so the fd stays open for as long as it is registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Self { fd })
    }

    /// The fd (for ioctls on a pty).
    pub fn raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }

    /// Reads up to `max` bytes, waiting until there are some; empty at the end (a pty whose
    /// other side is closed reads EIO: also the end).
    pub async fn read(&self, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; max];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), &mut buf).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => return Ok(Vec::new()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`, waiting while the pipe is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Sets the window size of the pty whose master is `fd`.
pub fn set_winsize(fd: i32, rows: u16, columns: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live local; `fd`
    // is a pty master the caller holds open.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_round_trip_and_end() {
        let (r, w) = pipe().unwrap();
        let (r, w) = (Stream::new(r).unwrap(), Stream::new(w).unwrap());
        // More than a pipe holds: the writer waits for the reader.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            drop(w);
        });
        let mut got = Vec::new();
        loop {
            let chunk = r.read(65536).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        assert_eq!(got, expect);
    }
}
