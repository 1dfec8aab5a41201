//! virtiofsd (from crates.io, `target/tools/bin/virtiofsd` as `cargo xtask deps` installs it)
//! serving one host directory, for the suites and benchmarks that give a VM a virtio-fs share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running virtiofsd; killed on drop.
pub struct Virtiofsd {
    child: Child,
    /// Its vhost-user socket, for `hull-vmm --fs tag=…,socket=…`.
    pub socket: PathBuf,
}

/// The virtiofsd binary: `$HULL_VIRTIOFSD`, else the one `cargo xtask deps` installs.
pub fn binary() -> PathBuf {
    std::env::var_os("HULL_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/tools/bin/virtiofsd"))
}

impl Virtiofsd {
    /// virtiofsd on `shared` (`--cache=auto`, its sandbox on), its socket and log in `dir`.
    /// With `HULL_TEST_CONSOLE_DIR` set, it logs at debug level into that directory instead;
    /// `HULL_VIRTIOFSD_ARGS` (space-separated) is appended to its arguments (e.g.
    /// `--cache=always --writeback`, to compare modes in `cargo xtask bench fs`).
    pub fn start(dir: &Path, shared: &Path) -> Self {
        let bin = binary();
        assert!(
            bin.exists(),
            "{} is missing: cargo xtask deps installs it",
            bin.display()
        );
        let socket = dir.join("virtiofsd.sock");
        let (level, log) = match std::env::var_os("HULL_TEST_CONSOLE_DIR") {
            Some(d) => ("debug", PathBuf::from(d).join("virtiofsd.log")),
            None => ("error", dir.join("virtiofsd.log")),
        };
        let child = Command::new(&bin)
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--cache=auto", &format!("--log-level={level}")])
            .args(
                std::env::var("HULL_VIRTIOFSD_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create virtiofsd's log"))
            .spawn()
            .expect("spawn virtiofsd");
        // Ready when its socket exists (it listens before it creates nothing else).
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "virtiofsd made no socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }

    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
