//! `cargo xtask`: every project command (build the guest image, run the nested-KVM harness, run the
//! test suite, benchmarks, the main job). Each command lives in its own module.

mod agent_vm;
mod bench;
mod bench_agent;
mod bench_ctr;
mod bench_fs;
mod bench_vsock;
mod cargo;
mod deps;
mod guest_image;
mod guest_suites;
mod harness;
mod run;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Hull project commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: build everything and boot the guest image under hull-vmm.
    Run(run::Args),
    /// The whole test suite (installs what it needs).
    Test(test::Args),
    /// Benchmarks, side by side with their peer.
    Bench(bench::Args),
    /// Build the guest kernel and initramfs into target/guest/.
    GuestImage(guest_image::Args),
    /// Run a command inside the nested-KVM harness (L1 VM), or directly on a hardware-KVM host.
    Harness(harness::Args),
    /// Install the Debian packages the project needs (and unpack containerd 1.7 and 2.x for the
    /// shim suite).
    Deps,
    /// The part of the main job that runs where guests boot (used by `run`).
    #[command(hide = true)]
    RunInner(run::InnerArgs),
    /// The part of a benchmark that runs where guests boot (used by `bench`).
    #[command(hide = true)]
    BenchInner(bench::InnerArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::GuestImage(args) => guest_image::run(args),
        Command::Harness(args) => harness::run(args),
        Command::Deps => deps::ensure().and_then(|()| deps::other_containerds().map(drop)),
        Command::BenchInner(args) => bench::inner(args),
        Command::RunInner(args) => run::inner(args),
    }
}
