//! The serving shim: logs to containerd's `log` FIFO in the bundle, serves the Task API on the
//! socket `start` passed as fd 3 (as `containerd.task.v2.Task` and `containerd.task.v3.Task`),
//! and exits when containerd's Shutdown says so.
//!
//! The runtime is single-threaded: the shim's work is waiting on containerd and the agent, and
//! the thread that spawns hull-vmm and virtiofsd must live as long as the shim for their
//! parent-death signal to mean "the shim died" ([`crate::sandbox`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{Context, Result};
use containerd_shim_protos::shim_async::{create_task, Task};
use tokio::sync::Notify;

use crate::cli::Args;
use crate::events::Publisher;
use crate::service::Service;

/// Service names the Task API is served under.
pub const TASK_V2: &str = "containerd.task.v2.Task";
/// See [`TASK_V2`].
pub const TASK_V3: &str = "containerd.task.v3.Task";

/// Points stderr at containerd's `log` FIFO in the working directory (non-blocking: a log line
/// is dropped rather than the shim stalled when nobody reads).
fn log_to_fifo() {
    let path = c"log";
    // SAFETY: a NUL-terminated path; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: fd is ours; dup2 onto stderr, then close the original.
    unsafe {
        libc::dup2(fd, 2);
        libc::close(fd);
    }
}

/// When this serving process started (for the timing fields of the log).
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Serves until Shutdown.
pub fn serve(args: &Args) -> Result<()> {
    STARTED.get_or_init(std::time::Instant::now);
    log_to_fifo();
    // The socket `start` bound for this sandbox (the bundle may be gone when we exit).
    let socket = std::env::current_dir()
        .ok()
        .and_then(|b| crate::start::group_of(&b, &args.id).ok())
        .map(|(group, _)| crate::start::socket_path(&args.address, &args.namespace, &group));
    let level = if args.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HULL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // SAFETY: fd 3 is the listening socket `start` passed; nothing else owns it.
    let listener = unsafe { OwnedFd::from_raw_fd(3) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the runtime")?;
    rt.block_on(async move {
        let publisher = Publisher::start(
            std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
            args.namespace.clone(),
        );
        let shutdown = Arc::new(Notify::new());
        let service = Service::new(args.namespace.clone(), publisher, shutdown.clone());
        let task: Arc<dyn Task + Send + Sync> = Arc::new(service);
        let mut services = create_task(task.clone());
        let v2 = create_task(task)
            .remove(TASK_V3)
            .context("the generated Task service has an unexpected name")?;
        services.insert(TASK_V2.to_string(), v2);
        // SAFETY: the fd is a listening Unix socket we own; the server takes it over.
        let mut server =
            unsafe { ttrpc::asynchronous::Server::new().add_unix_listener(listener.as_raw_fd()) }
                .context("serve on fd 3")?
                .register_service(services);
        std::mem::forget(listener);
        server.start().await.context("start the ttrpc server")?;
        tracing::info!(id = %args.id, namespace = %args.namespace, "shim serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = term.recv() => tracing::info!("SIGTERM"),
        }
        // Let the Shutdown answer go out before the socket closes.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server.shutdown()).await;
        tracing::info!("shim exits");
        Ok::<_, anyhow::Error>(())
    })?;
    // Our socket goes with us (`start` made it for this sandbox).
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
    // Not a runtime drop: that would wait for blocking tasks (a stdin FIFO open that never
    // completes, a logger being reaped).
    std::process::exit(0)
}
