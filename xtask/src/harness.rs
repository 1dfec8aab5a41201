//! `cargo xtask harness -- CMD...` (owner: harness helper).
use anyhow::Result;

/// Arguments of `cargo xtask harness`.
#[derive(clap::Args)]
pub struct Args {
    /// The command to run inside L1.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// Runs the command.
pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
