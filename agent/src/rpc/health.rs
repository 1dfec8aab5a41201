//! Health: `Check` (is the agent serving) and `Version` (its build and API version). Both are
//! cheap and never fail: the host polls `Check` while the guest boots.

use hull_agent_api::agent::{check_response::ServingStatus, CheckResponse, VersionResponse};
use hull_agent_api::API_VERSION;

use super::State;

/// The agent's version: the crate's.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `Check`: `SERVING`, or `NOT_SERVING` once `DestroySandbox` was called.
pub fn check(state: &State) -> CheckResponse {
    let status = if state.is_serving() {
        ServingStatus::SERVING
    } else {
        ServingStatus::NOT_SERVING
    };
    CheckResponse {
        status: status.into(),
        ..Default::default()
    }
}

/// `Version`.
pub fn version() -> VersionResponse {
    VersionResponse {
        agent_version: AGENT_VERSION.to_owned(),
        api_version: API_VERSION,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::Mode;

    #[test]
    fn serving_until_stopped() {
        let state = State::new(Mode::Host);
        assert_eq!(
            check(&state).status.enum_value(),
            Ok(ServingStatus::SERVING)
        );
        state.request_stop();
        assert_eq!(
            check(&state).status.enum_value(),
            Ok(ServingStatus::NOT_SERVING)
        );
    }

    #[test]
    fn versions() {
        let v = version();
        assert_eq!(v.api_version, API_VERSION);
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    }
}
