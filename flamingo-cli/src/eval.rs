//! placeholder
#[derive(Debug, clap::Args)]
pub struct Args {}
pub fn run(_d: flamingo_kernels::Device, _a: Args) -> anyhow::Result<()> { anyhow::bail!("not yet") }
