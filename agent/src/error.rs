//! The errors of the agent's RPCs and their ttrpc status codes, mapped in one place
//! (`impl From<AgentError> for ttrpc::Error`; the status message is the error's text: it says
//! what failed, for the shim's logs), and [`ServeError`], why the agent could not start serving.

use std::io;

use nix::errno::Errno;

use crate::sysinfo::SysInfoError;

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Not possible in this mode, e.g. setting the clock of a host-mode agent.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The agent is shutting down (after `DestroySandbox`).
    #[error("the agent is shutting down: {0}")]
    ShuttingDown(&'static str),
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// What the agent was doing, e.g. `clock_settime(CLOCK_REALTIME)`.
        what: &'static str,
        /// Why.
        errno: Errno,
    },
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The container or process id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The container runtime (libcontainer) failed; its message.
    #[error("{0}")]
    Failed(String),
    /// Something in the agent failed.
    #[error("{0}")]
    Internal(String),
    /// The kernel's files could not be read.
    #[error(transparent)]
    SysInfo(#[from] SysInfoError),
}

impl AgentError {
    /// The ttrpc status code of this error.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::ShuttingDown(_) => ttrpc::Code::UNAVAILABLE,
            Self::Sys {
                errno: Errno::EPERM,
                ..
            } => ttrpc::Code::PERMISSION_DENIED,
            Self::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Self::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Self::Sys { .. } | Self::SysInfo(_) | Self::Failed(_) | Self::Internal(_) => {
                ttrpc::Code::INTERNAL
            }
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// The agent could not start serving (fatal: a guest agent reports it on the console and powers
/// off; a host-mode one exits 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The tokio runtime could not be built.
    #[error("tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// A signal handler could not be installed.
    #[error("install the {signal} handler: {source}")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A listener could not be set up.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// `vsock:<port>` or `unix:<path>`.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ttrpc server did not start.
    #[error("start the ttrpc server on {addr}: {source}")]
    Start {
        /// As in [`ServeError::Listen`].
        addr: String,
        /// Why.
        #[source]
        source: ttrpc::Error,
    },
    /// The marker's facts could not be read.
    #[error(transparent)]
    SysInfo(#[from] SysInfoError),
    /// Containers could not be set up.
    #[error("containers: {what}: {source}")]
    Containers {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: AgentError) -> (ttrpc::Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codes() {
        assert_eq!(
            status(AgentError::InvalidArgument(
                "nanos 1000000000 > 999999999".into()
            )),
            (
                ttrpc::Code::INVALID_ARGUMENT,
                "invalid argument: nanos 1000000000 > 999999999".into()
            )
        );
        assert_eq!(
            status(AgentError::FailedPrecondition(
                "not the guest's PID 1".into()
            )),
            (
                ttrpc::Code::FAILED_PRECONDITION,
                "not the guest's PID 1".into()
            )
        );
        assert_eq!(
            status(AgentError::ShuttingDown("DestroySandbox was called")).0,
            ttrpc::Code::UNAVAILABLE
        );
        assert_eq!(
            status(AgentError::Sys {
                what: "clock_settime(CLOCK_REALTIME)",
                errno: Errno::EINVAL
            }),
            (
                ttrpc::Code::INTERNAL,
                "clock_settime(CLOCK_REALTIME): EINVAL: Invalid argument".into()
            )
        );
        assert_eq!(
            status(AgentError::Sys {
                what: "clock_settime(CLOCK_REALTIME)",
                errno: Errno::EPERM
            })
            .0,
            ttrpc::Code::PERMISSION_DENIED
        );
        let e = AgentError::from(SysInfoError::Uname(Errno::EFAULT));
        assert_eq!(
            status(e),
            (ttrpc::Code::INTERNAL, "uname: EFAULT: Bad address".into())
        );
    }
}
