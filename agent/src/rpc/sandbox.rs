//! The sandbox itself: `GetGuestDetails` (the kernel's own files, see [`crate::sysinfo`]),
//! `SetGuestTime` (CLOCK_REALTIME; refused in host mode), `DestroySandbox` (ask the owner of the
//! server to stop: it sends this reply, then syncs, unmounts and powers off, or exits in host mode).

use hull_agent_api::agent::{
    DestroySandboxResponse, GuestDetails, SetGuestTimeRequest, SetGuestTimeResponse,
};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use super::health::AGENT_VERSION;
use super::{Mode, State};
use crate::error::AgentError;
use crate::sysinfo::Facts;

/// The largest valid `nanos`.
const MAX_NANOS: u32 = 999_999_999;

/// `GetGuestDetails`.
pub fn guest_details() -> Result<GuestDetails, AgentError> {
    let f = Facts::read()?;
    Ok(GuestDetails {
        kernel_release: f.kernel,
        mem_total_kib: f.mem_kib,
        online_cpus: f.cpus,
        agent_version: AGENT_VERSION.to_owned(),
        uptime_ms: f.uptime_ms,
        ..Default::default()
    })
}

/// `SetGuestTime`.
pub fn set_guest_time(
    state: &State,
    req: &SetGuestTimeRequest,
) -> Result<SetGuestTimeResponse, AgentError> {
    if req.nanos > MAX_NANOS {
        return Err(AgentError::InvalidArgument(format!(
            "nanos {} is more than {MAX_NANOS}",
            req.nanos
        )));
    }
    if !state.is_serving() {
        return Err(AgentError::ShuttingDown("DestroySandbox was called"));
    }
    match state.mode() {
        Mode::Host => Err(AgentError::FailedPrecondition(
            "SetGuestTime: this agent is not the guest's PID 1 (host mode): \
             the host clock is left alone"
                .into(),
        )),
        Mode::Guest => {
            let ts = TimeSpec::new(req.seconds, i64::from(req.nanos));
            clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|errno| AgentError::Sys {
                what: "clock_settime(CLOCK_REALTIME)",
                errno,
            })?;
            tracing::info!(seconds = req.seconds, nanos = req.nanos, "guest time set");
            Ok(SetGuestTimeResponse::new())
        }
    }
}

/// `DestroySandbox`: idempotent.
pub fn destroy_sandbox(state: &State) -> DestroySandboxResponse {
    if state.is_serving() {
        tracing::info!(mode = ?state.mode(), "DestroySandbox: stopping after this reply");
    }
    state.request_stop();
    DestroySandboxResponse::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: i64, nanos: u32) -> SetGuestTimeRequest {
        SetGuestTimeRequest {
            seconds,
            nanos,
            ..Default::default()
        }
    }

    // Only host-mode states here: a guest-mode call would set this machine's clock.

    #[test]
    fn host_mode_refuses_to_set_the_clock() {
        let state = State::new(Mode::Host);
        let e = set_guest_time(&state, &time(1_800_000_000, 0)).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("not the guest's PID 1"), "{e}");
    }

    #[test]
    fn bad_nanos_are_an_invalid_argument() {
        let state = State::new(Mode::Host);
        let e = set_guest_time(&state, &time(0, 1_000_000_000)).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(
            e.to_string(),
            "invalid argument: nanos 1000000000 is more than 999999999"
        );
    }

    #[test]
    fn nothing_after_destroy() {
        let state = State::new(Mode::Host);
        destroy_sandbox(&state);
        destroy_sandbox(&state);
        assert!(!state.is_serving());
        let e = set_guest_time(&state, &time(0, 0)).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::UNAVAILABLE);
    }

    #[test]
    fn details_of_this_machine() {
        let d = guest_details().unwrap();
        assert_eq!(d.agent_version, AGENT_VERSION);
        assert!(
            d.online_cpus >= 1 && d.mem_total_kib > 0 && d.uptime_ms > 0,
            "{d:?}"
        );
    }
}
