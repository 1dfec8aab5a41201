//! `cargo xtask guest-image`: builds target/guest/ (owner: guest-image helper).
use anyhow::Result;

/// Arguments of `cargo xtask guest-image`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the command.
pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
