//! Logging: structured lines (`<uptime>  LEVEL target: message key=value…`) through `tracing`.
//!
//! - Guest (PID 1): to the console (PID 1's stdout is `/dev/console`, the serial port), warnings
//!   and errors only unless `hull.debug` (then everything down to debug): the serial port is slow
//!   and boot tests read it. With `agent.log_port=N` the agent also opens a vsock stream to the
//!   host (CID 2, port N; guest-initiated, which a hybrid-vsock VMM forwards to `<uds>_N` on the
//!   host) and sends it info and up (debug with `hull.debug`). The stream is best effort: lines go
//!   through a bounded queue (dropped when it is full, never blocking a caller), and if the
//!   connect or a write fails the sink is dropped for good, with one line on the console.
//! - Host mode: to stderr, filtered by `RUST_LOG` (default `info`).

use std::io::{self, Write};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::{self, MakeWriter};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// Lines queued for the vsock sink before new ones are dropped.
const SINK_QUEUE: usize = 4096;

/// Guest logging (see the module docs). Call inside the tokio runtime (the vsock sink is a task).
pub fn init_guest(debug: bool, log_port: Option<u32>) {
    let console_level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::WARN
    };
    let sink_level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    let console = fmt::layer()
        .with_ansi(false)
        .with_timer(fmt::time::uptime())
        .with_writer(io::stdout)
        .with_filter(console_level);
    let sink = log_port.map(|port| {
        fmt::layer()
            .with_ansi(false)
            .with_timer(fmt::time::uptime())
            .with_writer(vsock_sink(port))
            .with_filter(sink_level)
    });
    let _ = tracing_subscriber::registry()
        .with(console)
        .with(sink)
        .try_init();
}

/// Host-mode logging: stderr, `RUST_LOG` or `info`.
pub fn init_host() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_ansi(false)
                .with_timer(fmt::time::uptime())
                .with_writer(io::stderr)
                .with_filter(filter),
        )
        .try_init();
}

/// The writer side of the vsock sink: each formatted event (one `write` of one line) is queued.
#[derive(Clone)]
struct ChannelSink {
    tx: mpsc::Sender<Vec<u8>>,
}

impl<'a> MakeWriter<'a> for ChannelSink {
    type Writer = ChannelSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Write for ChannelSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Full: dropped (logging must never block the agent). Closed: the sink is gone.
        let _ = self.tx.try_send(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts the task that connects to the host's port and writes the queued lines to it.
fn vsock_sink(port: u32) -> ChannelSink {
    let (tx, rx) = mpsc::channel(SINK_QUEUE);
    tokio::spawn(async move {
        let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_HOST, port);
        match tokio_vsock::VsockStream::connect(addr).await {
            Ok(stream) => {
                if let Err(e) = forward(rx, stream).await {
                    crate::init::say(&format!(
                        "hull-agent: log stream to vsock 2:{port}: {e}; logging to the console only"
                    ));
                }
            }
            Err(e) => crate::init::say(&format!(
                "hull-agent: connect the log stream to vsock 2:{port}: {e}; logging to the console only"
            )),
        }
    });
    ChannelSink { tx }
}

/// Writes every queued line to `out` until the queue closes or a write fails.
async fn forward<W: tokio::io::AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut out: W,
) -> io::Result<()> {
    while let Some(line) = rx.recv().await {
        out.write_all(&line).await?;
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sink_forwards_lines_and_never_blocks() {
        let (tx, rx) = mpsc::channel(2);
        let mut sink = ChannelSink { tx };
        sink.write_all(b"one\n").unwrap();
        sink.make_writer().write_all(b"two\n").unwrap();
        // Full: dropped, not blocked.
        sink.write_all(b"three\n").unwrap();
        drop(sink);
        let mut out = Vec::new();
        forward(rx, &mut out).await.unwrap();
        assert_eq!(out, b"one\ntwo\n");
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_sink() {
        let (tx, rx) = mpsc::channel(8);
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let mut sink = ChannelSink { tx };
        sink.write_all(b"line\n").unwrap();
        assert!(forward(rx, a).await.is_err());
        // The queue is closed now: writes still succeed (and go nowhere).
        sink.write_all(b"later\n").unwrap();
    }
}
