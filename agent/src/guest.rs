//! The serving PID 1: what follows early init ([`crate::init`]) unless `hull.oneshot`.
//!
//! Hostname and loopback, then a tokio runtime with logging ([`crate::log`]) and the reaper; the
//! ttrpc API on vsock port `agent.port=` (1024), the echo service on `agent.echo_port=` if set; then
//! the readiness marker (`HULL_GUEST_READY …`, the same line as the one-shot mode's) once the API
//! listens, so a host that saw it can connect at once. It serves until `DestroySandbox`: the reply
//! is written, the server closes, and the caller ([`crate::init::run`]) syncs, unmounts and powers
//! off.

use std::time::Instant;

use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::cmdline::Cmdline;
use crate::error::ServeError;
use crate::init::{say, step, unmount_all};
use crate::reaper::Reaper;
use crate::rpc::{self, Mode, State};
use crate::sysinfo::Facts;
use crate::{container, echo, log, net};

/// Serves until `DestroySandbox`, then unmounts what it can; the caller powers off.
pub fn run(cmdline: &Cmdline) -> Result<(), ServeError> {
    let t = Instant::now();
    if let Err(e) = net::set_hostname(&cmdline.hostname) {
        say(&format!("hull-agent: {e}"));
    }
    if let Err(e) = net::loopback_up() {
        say(&format!("hull-agent: {e}"));
    }
    step(
        cmdline.debug,
        format_args!("hostname {:?}, lo up", cmdline.hostname),
        t,
    );
    if let Some(tag) = &cmdline.shared_fs {
        let t = Instant::now();
        match container::mount_shared(tag) {
            Ok(()) => step(
                cmdline.debug,
                format_args!("virtio-fs {tag} on {}", container::SHARED_DIR),
                t,
            ),
            Err(e) => say(&format!("hull-agent: {e}")),
        }
    }

    let runtime = crate::runtime()?;
    runtime.block_on(serve(cmdline))?;
    let t = Instant::now();
    unmount_all();
    step(cmdline.debug, format_args!("synced and unmounted"), t);
    Ok(())
}

async fn serve(cmdline: &Cmdline) -> Result<(), ServeError> {
    log::init_guest(cmdline.debug, cmdline.log_port);
    let reaper = Reaper::start().map_err(|source| ServeError::Signal {
        signal: "SIGCHLD",
        source,
    })?;
    let cfg = container::guest_config();
    let containers = container::Containers::new(cfg, reaper)?;

    let (listener, addr) = bind(cmdline.port)?;
    let state = State::with_containers(Mode::Guest, containers);
    let server = rpc::Server::start(listener.into(), state, &addr).await?;

    if let Some(port) = cmdline.echo_port {
        let (listener, addr) = bind(port)?;
        tokio::spawn(async move {
            if let Err(e) = echo::serve_vsock(listener).await {
                tracing::error!(%addr, error = %e, "echo service stopped");
            }
        });
    }

    say(&Facts::read()?.marker());
    tracing::info!(%addr, echo_port = ?cmdline.echo_port, "serving");

    server.stop_requested().await;
    // Graceful, but bounded: a handler still waiting (a read of a process that never ends) must
    // not hold the power-off. DestroySandbox's own reply is written first: it is already done.
    if tokio::time::timeout(std::time::Duration::from_millis(500), server.shutdown())
        .await
        .is_err()
    {
        tracing::info!("handlers still in flight after 500 ms; closing anyway");
    }
    tracing::info!("server closed; powering off");
    Ok(())
}

/// A vsock listener on `port` of any CID (ours), and its name for messages.
fn bind(port: u32) -> Result<(VsockListener, String), ServeError> {
    let addr = format!("vsock:{port}");
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(l) => Ok((l, addr)),
        Err(source) => Err(ServeError::Listen { addr, source }),
    }
}
