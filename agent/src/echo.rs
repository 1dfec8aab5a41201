//! The test echo service (`agent.echo_port=N` in a guest, `--echo unix:<path>` in host mode): every
//! byte a connection sends comes back on it, until the client shuts its side down; then the agent
//! shuts down its own. Connections are independent tasks (any number at once), and back-pressure
//! is the normal one of an async copy: a client that does not read stops being read from. Used by
//! the host's vsock throughput and concurrency tests.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_vsock::VsockListener;

/// The copy buffer of each connection.
const BUFFER: usize = 64 * 1024;

/// Echoes every connection of a vsock listener; runs until the listener fails.
pub async fn serve_vsock(listener: VsockListener) -> io::Result<()> {
    loop {
        let (conn, peer) = listener.accept().await?;
        tracing::debug!(%peer, "echo: connection");
        let (r, w) = conn.into_split();
        tokio::spawn(echo(r, w));
    }
}

/// Echoes every connection of a Unix listener; runs until the listener fails.
pub async fn serve_unix(listener: UnixListener) -> io::Result<()> {
    loop {
        let (conn, _) = listener.accept().await?;
        tracing::debug!("echo: connection");
        let (r, w) = conn.into_split();
        tokio::spawn(echo(r, w));
    }
}

/// One connection: copy `r` into `w` until EOF, then shut `w` down. Returns the bytes echoed.
async fn echo<R, W>(r: R, mut w: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(BUFFER, r);
    let result = tokio::io::copy_buf(&mut r, &mut w).await;
    let _ = w.shutdown().await;
    match &result {
        Ok(n) => tracing::debug!(bytes = n, "echo: done"),
        Err(e) => tracing::debug!(error = %e, "echo: connection failed"),
    }
    result
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    use super::*;

    #[tokio::test]
    async fn echoes_until_eof() {
        let (client, server) = tokio::io::duplex(1024);
        let (sr, sw) = tokio::io::split(server);
        let task = tokio::spawn(echo(sr, sw));
        let (mut cr, mut cw) = tokio::io::split(client);
        // More than the duplex buffer both ways: needs the reader and writer to overlap.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                cw.write_all(&data).await.unwrap();
                cw.shutdown().await.unwrap();
            })
        };
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back, data);
        assert_eq!(task.await.unwrap().unwrap(), 200_000);
    }

    #[tokio::test]
    async fn many_connections_on_a_unix_socket() {
        let dir = hull_agent_api::testing::TempDir::new("echo").unwrap();
        let path = dir.join("echo.sock");
        let server = tokio::spawn(serve_unix(UnixListener::bind(&path).unwrap()));
        let mut clients = Vec::new();
        for i in 0..32u8 {
            let path = path.clone();
            clients.push(tokio::spawn(async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                let msg = vec![i; 10_000];
                s.write_all(&msg).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, msg);
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        server.abort();
    }
}
