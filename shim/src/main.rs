//! `containerd-shim-kata-v2` (also installed as `containerd-shim-hull-v2`): Hull's containerd
//! shim, runtime type `io.containerd.kata.v2`. One shim process per sandbox (pod, or standalone
//! container) owns that sandbox's VM and serves containerd's Task API for its containers.
//!
//! containerd runs the binary three ways ([`cli`] parses them):
//! - `… start`: find or launch the sandbox's shim and print its socket address ([`start`]);
//! - `… delete`: clean up after a shim that died ([`start::delete`]);
//! - no action: be the shim, serving on the socket `start` passed as fd 3 ([`serve`]);
//! - `… warm` (launched by `start`, not containerd): boot a sandbox ahead of need and serve the
//!   pod that claims it ([`warm`]); `… drain-warm` stops those.
//!
//! Module map: [`config`] (the TOML file), [`sandbox`] (VM, virtiofsd, share), [`service`] (the
//! Task API), [`io`] (stdio), [`spec`] (the OCI spec for the guest), [`mount`] (host mounts),
//! [`events`] (to containerd), [`warm`] (sandboxes booted ahead of need).

mod cli;
mod config;
mod events;
mod hostcg;
mod io;
mod mount;
mod sandbox;
mod serve;
mod service;
mod spec;
mod start;
mod warm;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.action {
        cli::Action::Version => {
            println!(
                "containerd-shim-kata-v2 (Hull) {}\nTask API: containerd.task.v2.Task, containerd.task.v3.Task",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        cli::Action::Start => start::start(&args),
        cli::Action::Delete => start::delete(&args),
        cli::Action::Serve => serve::serve(&args),
        cli::Action::Warm => serve::warm(&args),
        cli::Action::DrainWarm => {
            let (path, required) = config::locate(None);
            config::Config::load(&path, required)
                .map_err(anyhow::Error::from)
                .and_then(|cfg| warm::drain(&cfg))
                .map(|n| println!("stopped {n} warm sandbox(es)"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // containerd shows a failed start's stderr to the user.
            eprintln!("containerd-shim-kata-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}
