//! `kimi-actors placement`: print the resolved plan, or why it is refused.

use anyhow::{Context, Result};
use clap::Args;
use engine::placement::Plan;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlacementArgs {
    #[arg(long)]
    placement: PathBuf,
    /// Use this model directory for every node.
    #[arg(long)]
    model: Option<PathBuf>,
}

pub fn run(a: PlacementArgs) -> Result<()> {
    let plan = Plan::load(&a.placement, a.model.as_deref())
        .with_context(|| format!("placement {}", a.placement.display()))?;
    print!("{}", plan.describe());
    Ok(())
}
