//! Running the host tools the build relies on (apt-get, apt-cache, dpkg-deb, depmod, cargo), turning
//! "not installed" and "failed" into typed errors that say what to do.

use std::io;
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub(crate) const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
};
pub(crate) const APT_CACHE: Tool = Tool {
    program: "apt-cache",
    package: "apt",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
};
pub(crate) const DEPMOD: Tool = Tool {
    program: "depmod",
    package: "kmod",
};

/// Runs `cmd` (a `tool` invocation) with captured output; fails unless it exits 0. `hint` says what to
/// do when it fails.
pub(crate) fn run(tool: Tool, cmd: &mut Command, hint: &str) -> Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(tool, cmd, e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failed(cmd, &output.status, &output.stderr, hint))
    }
}

/// The error for a command that could not be started.
pub(crate) fn spawn_error(tool: Tool, cmd: &Command, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::ToolMissing {
            tool: tool.program,
            package: tool.package,
        }
    } else {
        Error::CommandFailed {
            command: describe(cmd),
            status: format!("could not start: {e}"),
            stderr: String::new(),
            hint: format!("check that {} is installed and runnable", tool.program),
        }
    }
}

/// The error for a command that ran and failed.
pub(crate) fn failed(
    cmd: &Command,
    status: &std::process::ExitStatus,
    stderr: &[u8],
    hint: &str,
) -> Error {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    Error::CommandFailed {
        command: describe(cmd),
        status: status.to_string(),
        stderr: if tail.is_empty() {
            String::new()
        } else {
            format!(":\n  {tail}\n")
        },
        hint: hint.to_owned(),
    }
}

/// `program arg arg...`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
