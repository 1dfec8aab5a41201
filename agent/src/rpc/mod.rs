//! The agent's ttrpc API (`hull.agent.v1.AgentService`, see `agent/api/protos/agent.proto`): one
//! file per area ([`health`], [`sandbox`]; containers next), a thin [`Service`] that implements the
//! generated trait by calling them and maps their [`AgentError`]s to statuses, and [`Server`], the
//! ttrpc server on one listener.
//!
//! The same service runs in both modes ([`Mode`]): as the guest's PID 1 on vsock, and as a plain
//! process on a Unix socket (host mode, for tests). The mode decides what touches the machine:
//! a host-mode agent never sets the clock, and `DestroySandbox` ends the process instead of
//! powering off.

pub mod container;
pub mod health;
pub mod sandbox;
pub mod storage;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::{create_agent_service, AgentService};
use tokio::sync::watch;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::TtrpcContext;

use crate::container::Containers;
use crate::error::{AgentError, ServeError};

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The guest's PID 1: it owns the machine.
    Guest,
    /// A process on the host (`--listen`): it must leave the machine alone.
    Host,
}

/// What the RPCs share.
#[derive(Debug)]
pub struct State {
    mode: Mode,
    serving: AtomicBool,
    stop: watch::Sender<bool>,
    containers: Option<Arc<Containers>>,
}

impl State {
    /// A serving agent in `mode`, without containers (tests of the other areas).
    #[cfg(test)]
    pub fn new(mode: Mode) -> Arc<Self> {
        Self::build(mode, None)
    }

    /// A serving agent in `mode` whose containers are `containers`.
    pub fn with_containers(mode: Mode, containers: Arc<Containers>) -> Arc<Self> {
        Self::build(mode, Some(containers))
    }

    fn build(mode: Mode, containers: Option<Arc<Containers>>) -> Arc<Self> {
        Arc::new(Self {
            mode,
            serving: AtomicBool::new(true),
            stop: watch::channel(false).0,
            containers,
        })
    }

    /// The containers.
    pub fn containers(&self) -> Result<&Containers, AgentError> {
        self.containers
            .as_deref()
            .ok_or_else(|| AgentError::FailedPrecondition("this agent runs no containers".into()))
    }

    /// Where the agent runs.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// False once a stop was requested.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// Asks the server's owner to stop (after the current replies are sent).
    pub fn request_stop(&self) {
        self.serving.store(false, Ordering::SeqCst);
        self.stop.send_replace(true);
    }

    /// Resolves once a stop was requested (at once if it was already).
    pub async fn stop_requested(&self) {
        let mut rx = self.stop.subscribe();
        // The sender lives in `self`: wait_for cannot fail while we hold `&self`.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// The generated service trait, implemented by calling the area modules.
struct Service {
    state: Arc<State>,
}

/// An RPC's result, as ttrpc wants it; failures are logged here, once.
fn reply<T>(method: &'static str, result: Result<T, AgentError>) -> ttrpc::Result<T> {
    result.map_err(|e| {
        tracing::warn!(method, code = ?e.code(), error = %e, "rpc failed");
        e.into()
    })
}

#[async_trait]
impl AgentService for Service {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        Ok(health::check(&self.state))
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::VersionRequest,
    ) -> ttrpc::Result<agent::VersionResponse> {
        Ok(health::version())
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetGuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetails> {
        reply("GetGuestDetails", sandbox::guest_details())
    }

    async fn set_guest_time(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetGuestTimeRequest,
    ) -> ttrpc::Result<agent::SetGuestTimeResponse> {
        reply("SetGuestTime", sandbox::set_guest_time(&self.state, &req))
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<agent::DestroySandboxResponse> {
        if self.state.mode() == Mode::Guest {
            // The host may stop the VM as soon as it has the reply: what containers wrote to
            // disks must be on the host first.
            let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        }
        reply("DestroySandbox", Ok(sandbox::destroy_sandbox(&self.state)))
    }

    async fn mount_storage(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MountStorageRequest,
    ) -> ttrpc::Result<agent::Empty> {
        reply("MountStorage", storage::mount_storage(&self.state, &req))
    }

    async fn unmount_storage(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UnmountStorageRequest,
    ) -> ttrpc::Result<agent::Empty> {
        reply(
            "UnmountStorage",
            storage::unmount_storage(&self.state, &req),
        )
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::create(self.state.containers()?, &req).await }.await;
        reply("CreateContainer", result)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::start(self.state.containers()?, &req).await }.await;
        reply("StartContainer", result)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::exec(self.state.containers()?, &req).await }.await;
        reply("ExecProcess", result)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::signal(self.state.containers()?, &req) }.await;
        reply("SignalProcess", result)
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let result = async { container::wait(self.state.containers()?, &req).await }.await;
        reply("WaitProcess", result)
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let result = async { container::read(self.state.containers()?, &req, false).await }.await;
        reply("ReadStdout", result)
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let result = async { container::read(self.state.containers()?, &req, true).await }.await;
        reply("ReadStderr", result)
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WriteStreamRequest,
    ) -> ttrpc::Result<agent::WriteStreamResponse> {
        let result = async { container::write(self.state.containers()?, &req).await }.await;
        reply("WriteStdin", result)
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::close_stdin(self.state.containers()?, &req).await }.await;
        reply("CloseStdin", result)
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: agent::TtyWinResizeRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::resize(self.state.containers()?, &req) }.await;
        reply("TtyWinResize", result)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::remove(self.state.containers()?, &req).await }.await;
        reply("RemoveContainer", result)
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        let result = async { container::stats(self.state.containers()?, &req) }.await;
        reply("StatsContainer", result)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::pause(self.state.containers()?, &req, true) }.await;
        reply("PauseContainer", result)
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::pause(self.state.containers()?, &req, false) }.await;
        reply("ResumeContainer", result)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let result = async { container::update(self.state.containers()?, &req) }.await;
        reply("UpdateContainer", result)
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        let result = async { container::list(self.state.containers()?, &req) }.await;
        reply("ListProcesses", result)
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetOOMEventRequest,
    ) -> ttrpc::Result<agent::OOMEvent> {
        // A long poll: it ends with the agent (DestroySandbox), so that the server's graceful
        // shutdown does not wait on it.
        let result = async {
            let containers = self.state.containers()?;
            tokio::select! {
                e = container::oom(containers) => Ok(e),
                _ = self.state.stop_requested() => {
                    Err(AgentError::ShuttingDown("DestroySandbox was called"))
                }
            }
        }
        .await;
        reply("GetOOMEvent", result)
    }
}

/// The ttrpc server of one listener.
pub struct Server {
    inner: ttrpc::r#async::Server,
    state: Arc<State>,
}

impl Server {
    /// Serves `state`'s agent on `listener` (`addr` names it in errors and logs).
    pub async fn start(
        listener: Listener,
        state: Arc<State>,
        addr: &str,
    ) -> Result<Self, ServeError> {
        let service = Arc::new(Service {
            state: state.clone(),
        });
        let mut inner = ttrpc::r#async::Server::new()
            .add_listener(listener)
            .register_service(create_agent_service(service));
        inner.start().await.map_err(|source| ServeError::Start {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Self { inner, state })
    }

    /// Resolves when an RPC asked the agent to stop (`DestroySandbox`).
    pub async fn stop_requested(&self) {
        self.state.stop_requested().await
    }

    /// Stops accepting, lets the handlers in flight finish and their replies be written (bounded
    /// by ttrpc's own timeouts), and closes every connection.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.inner.shutdown().await {
            tracing::warn!(error = %e, "ttrpc server shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_requests() {
        let state = State::new(Mode::Host);
        assert!(state.is_serving());
        let waiter = {
            let state = state.clone();
            tokio::spawn(async move { state.stop_requested().await })
        };
        state.request_stop();
        waiter.await.unwrap();
        assert!(!state.is_serving());
        // Already requested: resolves at once.
        state.stop_requested().await;
    }
}
