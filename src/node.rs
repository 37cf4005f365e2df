//! `kimi-actors node`: a worker process holding its share of a placement.

use crate::load::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use engine::cluster::node::{Progress, run_node};
use engine::placement::Plan;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct NodeArgs {
    #[arg(long)]
    placement: PathBuf,
    /// This node's name in the placement.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    model: ModelArgs,
}

pub async fn run(a: NodeArgs) -> Result<()> {
    let plan = Plan::load(&a.placement, a.model.model.as_deref())
        .with_context(|| format!("placement {}", a.placement.display()))?;
    let me = plan
        .node_index(&a.name)
        .context("no such node in the placement")?;
    let (bar, progress) = crate::cluster::load_bar(&a.name, plan.node_bytes(me));
    let b = bar.clone();
    let done: Progress = Arc::new(move |bytes, total, tensors| {
        progress(bytes, total, tensors);
        if bytes >= total {
            b.finish();
        }
    });
    run_node(plan, &a.name, a.model.options(), done)
        .await
        .with_context(|| format!("node `{}`", a.name))
}
