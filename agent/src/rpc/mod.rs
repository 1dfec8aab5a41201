//! The agent's ttrpc API (`hull.agent.v1.AgentService`, see `agent/api/protos/agent.proto`): one
//! file per area ([`health`], [`sandbox`]; containers next), a thin [`Service`] that implements the
//! generated trait by calling them and maps their [`AgentError`]s to statuses, and [`Server`], the
//! ttrpc server on one listener.
//!
//! The same service runs in both modes ([`Mode`]): as the guest's PID 1 on vsock, and as a plain
//! process on a Unix socket (host mode, for tests). The mode decides what touches the machine:
//! a host-mode agent never sets the clock, and `DestroySandbox` ends the process instead of
//! powering off.

pub mod health;
pub mod sandbox;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hull_agent_api::agent;
use hull_agent_api::agent_ttrpc::{create_agent_service, AgentService};
use tokio::sync::watch;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::TtrpcContext;

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
}

impl State {
    /// A serving agent in `mode`.
    pub fn new(mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            mode,
            serving: AtomicBool::new(true),
            stop: watch::channel(false).0,
        })
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
        reply("DestroySandbox", Ok(sandbox::destroy_sandbox(&self.state)))
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
