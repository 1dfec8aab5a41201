//! The container RPCs: argument checks are in [`crate::container`]; this file turns requests into
//! calls of the registry and results into replies.

use std::time::UNIX_EPOCH;

use hull_agent_api::agent;

use crate::container::Containers;
use crate::error::AgentError;

/// CreateContainer.
pub async fn create(
    c: &Containers,
    r: &agent::CreateContainerRequest,
) -> Result<agent::Empty, AgentError> {
    c.create(&r.container_id, &r.spec_json, &r.rootfs, r.stdin)
        .await?;
    Ok(agent::Empty::new())
}

/// StartContainer.
pub async fn start(
    c: &Containers,
    r: &agent::ContainerRequest,
) -> Result<agent::Empty, AgentError> {
    c.start(&r.container_id).await?;
    Ok(agent::Empty::new())
}

/// ExecProcess.
pub async fn exec(
    c: &Containers,
    r: &agent::ExecProcessRequest,
) -> Result<agent::Empty, AgentError> {
    c.exec(&r.container_id, &r.exec_id, &r.process_json, r.stdin)
        .await?;
    Ok(agent::Empty::new())
}

/// SignalProcess.
pub fn signal(c: &Containers, r: &agent::SignalProcessRequest) -> Result<agent::Empty, AgentError> {
    c.signal(&r.container_id, &r.exec_id, r.signal, r.all)?;
    Ok(agent::Empty::new())
}

/// WaitProcess.
pub async fn wait(
    c: &Containers,
    r: &agent::ProcessRequest,
) -> Result<agent::WaitProcessResponse, AgentError> {
    let e = c.wait(&r.container_id, &r.exec_id).await?;
    let mut resp = agent::WaitProcessResponse::new();
    resp.status = e.status;
    resp.exited_at_unix_ms =
        e.at.duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
    Ok(resp)
}

/// ReadStdout / ReadStderr.
pub async fn read(
    c: &Containers,
    r: &agent::ReadStreamRequest,
    stderr: bool,
) -> Result<agent::ReadStreamResponse, AgentError> {
    let mut resp = agent::ReadStreamResponse::new();
    resp.data = c.read(&r.container_id, &r.exec_id, stderr, r.len).await?;
    Ok(resp)
}

/// WriteStdin.
pub async fn write(
    c: &Containers,
    r: &agent::WriteStreamRequest,
) -> Result<agent::WriteStreamResponse, AgentError> {
    let mut resp = agent::WriteStreamResponse::new();
    resp.len = c.write(&r.container_id, &r.exec_id, &r.data).await?;
    Ok(resp)
}

/// CloseStdin.
pub async fn close_stdin(
    c: &Containers,
    r: &agent::ProcessRequest,
) -> Result<agent::Empty, AgentError> {
    c.close_stdin(&r.container_id, &r.exec_id).await?;
    Ok(agent::Empty::new())
}

/// TtyWinResize.
pub fn resize(c: &Containers, r: &agent::TtyWinResizeRequest) -> Result<agent::Empty, AgentError> {
    c.resize(&r.container_id, &r.exec_id, r.rows, r.columns)?;
    Ok(agent::Empty::new())
}

/// RemoveContainer.
pub async fn remove(
    c: &Containers,
    r: &agent::RemoveContainerRequest,
) -> Result<agent::Empty, AgentError> {
    c.remove(&r.container_id, r.force).await?;
    Ok(agent::Empty::new())
}

/// StatsContainer.
pub fn stats(
    c: &Containers,
    r: &agent::ContainerRequest,
) -> Result<agent::StatsContainerResponse, AgentError> {
    use agent::stats_container_response::{Cpu, Io, Memory, Pids};
    let s = c.stats(&r.container_id)?;
    let mut resp = agent::StatsContainerResponse::new();
    let mut cpu = Cpu::new();
    [cpu.usage_usec, cpu.user_usec, cpu.system_usec] = s.cpu_usec;
    let mut mem = Memory::new();
    [
        mem.usage_bytes,
        mem.limit_bytes,
        mem.max_usage_bytes,
        mem.oom_kills,
    ] = s.memory;
    let mut pids = Pids::new();
    [pids.current, pids.limit] = s.pids;
    let mut io = Io::new();
    [io.read_bytes, io.write_bytes] = s.io;
    resp.cpu = Some(cpu).into();
    resp.memory = Some(mem).into();
    resp.pids = Some(pids).into();
    resp.io = Some(io).into();
    Ok(resp)
}

/// PauseContainer / ResumeContainer.
pub fn pause(
    c: &Containers,
    r: &agent::ContainerRequest,
    pause: bool,
) -> Result<agent::Empty, AgentError> {
    c.pause(&r.container_id, pause)?;
    Ok(agent::Empty::new())
}

/// UpdateContainer.
pub fn update(
    c: &Containers,
    r: &agent::UpdateContainerRequest,
) -> Result<agent::Empty, AgentError> {
    c.update(&r.container_id, &r.resources_json)?;
    Ok(agent::Empty::new())
}

/// ListProcesses.
pub fn list(
    c: &Containers,
    r: &agent::ContainerRequest,
) -> Result<agent::ListProcessesResponse, AgentError> {
    let mut resp = agent::ListProcessesResponse::new();
    resp.pids = c.pids(&r.container_id)?;
    Ok(resp)
}

/// GetOOMEvent.
pub async fn oom(c: &Containers) -> agent::OOMEvent {
    let mut e = agent::OOMEvent::new();
    e.container_id = c.next_oom().await;
    e
}
