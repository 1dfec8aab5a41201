//! A hull-vmm with a vsock device and the agent serving, driven from xtask (the main job and the
//! boot benchmark): start it, wait for the agent's first `Check`, destroy it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hull_agent_api::client::{connect_watching, process_alive, AgentClient, Target};

/// A VM being driven.
pub struct AgentVm {
    child: Option<Child>,
    /// Its hybrid-vsock socket.
    pub uds: PathBuf,
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl AgentVm {
    /// Spawns `vmm` booting `kernel` + `initrd` with a vsock device (stdout inherited or not).
    pub fn spawn(
        vmm: &Path,
        kernel: &Path,
        initrd: &Path,
        vcpus: u8,
        memory: u32,
        cmdline: &str,
        show_console: bool,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "hull-xtask-vm-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let uds = dir.join("vsock.sock");
        let stderr = std::fs::File::create(dir.join("vmm.stderr"))?;
        let child = Command::new(vmm)
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .args([
                "--vcpus",
                &vcpus.to_string(),
                "--memory",
                &memory.to_string(),
            ])
            .args(["--cmdline", cmdline])
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(if show_console {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {}", vmm.display()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            child: Some(child),
            uds,
            dir,
            runtime,
        })
    }

    /// Waits for the agent to answer `Check` (the client retries every 2-20 ms), for at most `limit`
    /// or until the VMM dies.
    pub fn wait_agent(&mut self, limit: Duration) -> Result<AgentClient> {
        let target = Target::HybridVsock {
            uds: self.uds.clone(),
            port: hull_agent_api::DEFAULT_AGENT_PORT,
        };
        let pid = self.pid();
        self.runtime
            .block_on(connect_watching(
                &target,
                Instant::now() + limit,
                process_alive(pid),
            ))
            .map_err(|e| anyhow::anyhow!("{e}; hull-vmm said: {}", self.vmm_stderr()))
    }

    /// What the VMM wrote on stderr so far.
    pub fn vmm_stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmm.stderr")).unwrap_or_default()
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs an async client call.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Asks the agent to power off, waits for the VMM, and returns its stderr and success.
    pub fn destroy(mut self, client: &AgentClient) -> Result<(bool, String)> {
        self.runtime
            .block_on(client.destroy_sandbox())
            .context("DestroySandbox")?;
        let mut child = self.child.take().context("the VM was already destroyed")?;
        let status = child.wait()?;
        Ok((status.success(), self.vmm_stderr()))
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
