//! The serving shim: logs to containerd's `log` FIFO in the bundle, serves the Task API on the
//! socket `start` passed as fd 3 (as `containerd.task.v2.Task` and `containerd.task.v3.Task`),
//! and exits when containerd's Shutdown says so.
//!
//! The runtime is single-threaded: the shim's work is waiting on containerd and the agent, and
//! the thread that spawns hull-vmm and virtiofsd must live as long as the shim for their
//! parent-death signal to mean "the shim died" ([`crate::sandbox`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use containerd_shim_protos::shim_async::{create_task, Task};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::cli::Args;
use crate::config::{self, Config};
use crate::events::Publisher;
use crate::sandbox::Sandbox;
use crate::service::Service;
use crate::warm;

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

/// When this process started serving (for the timing fields of the log): a warm shim's
/// adoption, else its start.
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Logs through `tracing` to stderr, at `debug` or info unless `$HULL_LOG` says otherwise.
fn init_tracing(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HULL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the runtime")
}

/// Serves until Shutdown.
pub fn serve(args: &Args) -> Result<()> {
    STARTED.get_or_init(std::time::Instant::now);
    log_to_fifo();
    init_tracing(args.debug);
    // SAFETY: fd 3 is the listening socket `start` passed; nothing else owns it.
    let listener = unsafe { OwnedFd::from_raw_fd(3) };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    // The runtime lives until exit: dropping it would wait for its blocking tasks.
    let rt = runtime()?;
    let socket = rt.block_on(serving(args.clone(), listener, ttrpc_address, None))?;
    exit(socket)
}

/// Ends the serving shim: its socket goes with it (`start` made it for this sandbox). Not a
/// runtime drop: that would wait for blocking tasks (a stdin FIFO open that never completes, a
/// logger being reaped).
fn exit(socket: Option<PathBuf>) -> ! {
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
    std::process::exit(0)
}

/// Serves the Task API on `listener` for the sandbox of `args` (the working directory is the
/// bundle) until Shutdown or SIGTERM; `warm`: a booted sandbox and its configuration key.
/// Returns the socket to remove.
async fn serving(
    args: Args,
    listener: OwnedFd,
    ttrpc_address: String,
    warm: Option<(String, Sandbox)>,
) -> Result<Option<PathBuf>> {
    // The socket `start` bound for this sandbox (the bundle may be gone when we exit).
    let socket = std::env::current_dir()
        .ok()
        .and_then(|b| crate::start::group_of(&b, &args.id).ok())
        .map(|(group, _)| crate::start::socket_path(&args.address, &args.namespace, &group));
    let publisher = Publisher::start(ttrpc_address, args.namespace.clone());
    let shutdown = Arc::new(Notify::new());
    let service = Service::new(args.namespace.clone(), publisher, shutdown.clone());
    if let Some((key, sb)) = warm {
        service.set_warm(key, sb);
    }
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service.clone());
    let mut services = create_task(task.clone());
    let v2 = create_task(task)
        .remove(TASK_V3)
        .context("the generated Task service has an unexpected name")?;
    services.insert(TASK_V2.to_string(), v2);
    // SAFETY: the fd is a listening Unix socket we own; the server takes it over.
    let mut server =
        unsafe { ttrpc::asynchronous::Server::new().add_unix_listener(listener.as_raw_fd()) }
            .context("serve on the task socket")?
            .register_service(services);
    std::mem::forget(listener);
    server.start().await.context("start the ttrpc server")?;
    tracing::info!(id = %args.id, namespace = %args.namespace, "shim serving");
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = shutdown.notified() => {}
        _ = term.recv() => tracing::info!("SIGTERM"),
    }
    service.drop_warm().await;
    // Let the Shutdown answer go out before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
    tracing::info!("shim exits");
    Ok(socket)
}

/// `warm`: boots a default-sized sandbox, offers it on `warm.sock` and, once a pod's `start`
/// claimed it, serves that pod as a shim `start` launched would ([`crate::warm`]). Until then it
/// logs to the state directory's warm log and runs at `SCHED_IDLE` (as `start` launched it).
pub fn warm(args: &Args) -> Result<()> {
    init_tracing(args.debug);
    let (path, required) = config::locate(None);
    let cfg = Config::load(&path, required)?;
    let rt = runtime()?;
    let marker = warm::marker(&cfg, &args.id);
    let ready_marker = marker.clone();
    let adopted = rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let size = cfg.default_sizing();
        let key = warm::key(&cfg, size);
        cfg.check_files()?;
        let t = std::time::Instant::now();
        // A SIGTERM mid-boot kills what the boot started (by its pid files, until the boot
        // gives up): the boot's own error path then removes the rest, as for any failed start.
        let dir = crate::sandbox::sandbox_dir(&cfg, &args.id);
        let boot = Sandbox::start(&cfg, "", &args.id, size);
        tokio::pin!(boot);
        let mut stopping = false;
        let booted = loop {
            tokio::select! {
                r = &mut boot => break r,
                _ = term.recv(), if !stopping => stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(50)), if stopping => {}
            }
            crate::sandbox::kill_recorded(&dir);
        };
        let mut sb = match booted {
            Ok(sb) if stopping => {
                sb.stop(Duration::from_secs(1)).await;
                return Ok(None);
            }
            Ok(sb) => sb,
            Err(_) if stopping => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let _ = std::fs::write(
            sb.dir.join(warm::PID_FILE),
            std::process::id().to_string(),
        );
        let sock = sb.dir.join(warm::SOCKET);
        let listener = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("listen on {}", sock.display()))?;
        let ready = args.id.replacen(warm::BOOTING, warm::READY, 1);
        sb.rename(&cfg, &ready)?;
        let _ = std::fs::remove_file(&ready_marker);
        tracing::info!(sandbox = %ready, ms = t.elapsed().as_millis() as u64, "warm sandbox ready");
        let mut vmm_exit = sb.vmm_exit.clone();
        let (req, fd, stream) = loop {
            tokio::select! {
                a = listener.accept() => {
                    let stream = a.context("accept on the warm socket")?.0;
                    if !warm::peer_is_us(&stream) {
                        tracing::warn!("refused a claim from another user");
                        continue;
                    }
                    let stream = stream.into_std()?;
                    stream.set_nonblocking(false)?;
                    match warm::receive(&stream) {
                        Ok((req, fd)) => break (req, fd, stream),
                        Err(e) => warm::answer(&stream, &format!("error: {e:#}")),
                    }
                }
                _ = term.recv() => {
                    sb.stop(Duration::from_secs(10)).await;
                    return Ok(None);
                }
                _ = vmm_exit.wait_for(Option::is_some) => {
                    sb.stop(Duration::from_secs(1)).await;
                    anyhow::bail!("the warm sandbox's VM ended before a pod claimed it");
                }
            }
        };
        drop(listener);
        if let Err(e) = sb.adopt(&cfg, &req.sandbox, &req.namespace) {
            warm::answer(&stream, &format!("error: {e}"));
            sb.stop(Duration::from_secs(1)).await;
            return Err(e.into());
        }
        let _ = std::fs::remove_file(sb.dir.join(warm::SOCKET));
        // Normal priority again, for the shim and every thread of the VM and virtiofsd.
        warm::unidle_process(std::process::id());
        for pid in sb.processes() {
            warm::unidle_process(pid);
        }
        if let Err(e) = std::env::set_current_dir(&req.bundle) {
            warm::answer(&stream, &format!("error: the bundle {}: {e}", req.bundle.display()));
            sb.stop(Duration::from_secs(1)).await;
            return Err(e.into());
        }
        log_to_fifo();
        // Serving starts now (the timing fields of the log count from here).
        STARTED.get_or_init(std::time::Instant::now);
        tracing::info!(sandbox = %req.sandbox, container = %req.id, namespace = %req.namespace, "adopted by a pod: serving it with its warm sandbox");
        warm::answer(&stream, &format!("ok {}", std::process::id()));
        drop(stream);
        let served = Args {
            namespace: req.namespace,
            address: req.address,
            publish_binary: req.publish_binary,
            id: req.id,
            bundle: req.bundle.to_string_lossy().into_owned(),
            debug: req.debug,
            action: crate::cli::Action::Serve,
        };
        serving(served, fd, req.ttrpc_address, Some((key, sb)))
            .await
            .map(Some)
    });
    match adopted {
        Ok(Some(socket)) => exit(socket),
        Ok(None) => {
            let _ = std::fs::remove_file(&marker);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&marker);
            tracing::error!("warm sandbox {}: {e:#}", args.id);
            Err(e)
        }
    }
}
