//! `cargo xtask`: every project command (build the guest image, run the nested-KVM harness,
//! run the test suite, benchmarks, the main job). Each command lives in its own module.

mod guest_image;
mod harness;

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
    /// Build the guest kernel and initramfs into target/guest/.
    GuestImage(guest_image::Args),
    /// Run a command inside the nested-KVM harness (L1 VM), or directly on a hardware-KVM host.
    Harness(harness::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::GuestImage(args) => guest_image::run(args),
        Command::Harness(args) => harness::run(args),
    }
}
