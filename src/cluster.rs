//! Starting the head: resolve the placement (or the one-process default), start `--spawn-local` children,
//! load with a progress bar, and report every node's load.

use crate::load::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use engine::cluster::node::Progress;
use engine::cluster::runtime::{Runtime, StartOptions};
use engine::placement::{Plan, human};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// Placement file (default: configs/local.toml, everything in this process).
    #[arg(long)]
    pub placement: Option<PathBuf>,
    /// Start the placement's other nodes as child processes of this one (all on this machine).
    #[arg(long, requires = "placement")]
    pub spawn_local: bool,
    /// Seconds to wait for the other nodes to come up and load.
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
}

/// A running head, and the child processes it started (killed when this is dropped).
pub struct Head {
    pub runtime: Arc<Runtime>,
    _children: Vec<tokio::process::Child>,
}

/// The bundled one-process placement, the default.
pub fn default_placement() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/local.toml")
}

/// A progress bar of bytes and matrices loaded on stderr (hidden when stderr is not a terminal).
pub fn load_bar(node: &str, total: u64) -> (ProgressBar, Progress) {
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "loading {prefix} [{bar:30}] {bytes}/{total_bytes}, {msg} {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(node.to_string());
    let b = bar.clone();
    let progress: Progress = Arc::new(move |done, _, tensors| {
        b.set_position(done);
        b.set_message(format!("{tensors} tensors"));
    });
    (bar, progress)
}

pub fn plan(cluster: &ClusterArgs, model: &ModelArgs) -> Result<Plan> {
    let p = cluster.placement.clone().unwrap_or_else(default_placement);
    Plan::load(&p, model.model.as_deref()).with_context(|| format!("placement {}", p.display()))
}

/// Waits until one of the spawned `children` (nodes `names`) exits; never returns if none does.
async fn first_exit(children: &mut [tokio::process::Child], names: &[String]) -> anyhow::Error {
    loop {
        for (c, name) in children.iter_mut().zip(names) {
            match c.try_wait() {
                Ok(Some(status)) => {
                    return anyhow::anyhow!(
                        "node `{name}` exited ({status}) before joining the head"
                    );
                }
                Ok(None) => {}
                Err(e) => return anyhow::anyhow!("watching node `{name}`: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn start(cluster: &ClusterArgs, model: &ModelArgs) -> Result<Head> {
    let plan = plan(cluster, model)?;
    let mut children = Vec::new();
    if cluster.spawn_local {
        engine::quant::pool::set_spin(Duration::ZERO);
        let exe = std::env::current_exe().context("locating this executable")?;
        let placement = cluster
            .placement
            .as_ref()
            .context("--spawn-local needs --placement")?;
        for n in &plan.nodes[1..] {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("node")
                .arg("--placement")
                .arg(placement)
                .arg("--name")
                .arg(&n.name);
            cmd.args(model.forwarded());
            // All nodes share this machine's cores: spinning kernel workers would take them from each other.
            cmd.env("KIMI_SPIN_US", "0");
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting node `{}`", n.name))?;
            tracing::info!(node = n.name, pid = child.id(), "spawned");
            children.push(child);
        }
    }
    let (bar, progress) = load_bar(&plan.nodes[0].name, plan.node_bytes(0));
    let opts = StartOptions {
        load: model.options(),
        progress,
        wait: Duration::from_secs(cluster.wait),
    };
    let names: Vec<String> = plan.nodes[1..].iter().map(|n| n.name.clone()).collect();
    // A spawned node that exits before joining (its port taken, its model missing) fails the start at once,
    // instead of after `--wait`; its own error is on the inherited stderr.
    let runtime = tokio::select! {
        r = Runtime::start(plan, opts) => r.context("starting the model")?,
        e = first_exit(&mut children, &names) => return Err(e),
    };
    bar.finish_and_clear();
    if runtime.plan.is_distributed() {
        for s in &runtime.joined {
            eprintln!(
                "node {}: loaded {} in {:.1} s, resident memory {}",
                s.node,
                human(s.bytes),
                s.secs,
                human(s.rss)
            );
        }
    }
    Ok(Head {
        runtime: Arc::new(runtime),
        _children: children,
    })
}
