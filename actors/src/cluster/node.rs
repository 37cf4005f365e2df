//! A node: loads exactly the units its share of the plan names, starts an actor for each, answers the head
//! on the data link, and registers a `Node` control actor with ractor_cluster (membership, the shared
//! secret as its cookie, model and plan checks, load status).

use super::control::{NodeActor, NodeState, Status};
use super::link::{self, Handler};
use super::units::*;
use super::wire::{Floats, Reply, Request, SeqTokens};
use crate::error::{Error, Result};
use crate::model::Head;
use crate::model::attention::Attention;
use crate::model::mlp::Mlp;
use crate::model::moe::{Assignment, ExpertGroup, Router, load_shared};
use crate::placement::{Plan, Share, model_fingerprint};
use crate::weights::{LoadOptions, Weights};
use candle_core::{Device, Tensor};
use ractor::{Actor, ActorRef};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The pg group every node's control actor joins.
pub const NODES_GROUP: &str = "kimi-nodes";

pub fn control_name(node: &str) -> String {
    format!("kimi-node-{node}")
}

/// What a node holds, as actors.
pub struct Shard {
    pub head: Option<Arc<Head>>,
    pub attention: BTreeMap<usize, ActorRef<AttentionMsg>>,
    pub ffn: BTreeMap<usize, ActorRef<FfnMsg>>,
    pub experts: BTreeMap<usize, ActorRef<ExpertsMsg>>,
    pub clock: Arc<ComputeClock>,
    pub activations: Arc<Activations>,
    pub bytes: u64,
    pub secs: f64,
}

/// Load progress: weight bytes resident so far, of the total, and matrices loaded.
pub type Progress = Arc<dyn Fn(u64, u64, u64) + Send + Sync>;

struct Units {
    head: Option<Head>,
    attention: Vec<Attention>,
    ffn: Vec<(usize, FfnUnit)>,
    experts: Vec<ExpertGroup>,
}

enum FfnUnit {
    Dense(Mlp),
    Moe(Router, Option<Mlp>),
}

/// Loads node `me`'s share of `plan` (on the blocking pool) and starts its actors. Routers reach experts on
/// other nodes through `peers`.
pub async fn load_shard(
    plan: &Plan,
    me: usize,
    opts: LoadOptions,
    peers: Arc<Peers>,
    clock: Arc<ComputeClock>,
    activations: Arc<Activations>,
    progress: Progress,
) -> Result<Shard> {
    let t0 = Instant::now();
    let share = plan.share(me);
    let total = plan.node_bytes(me);
    let dir = plan.nodes[me].model_dir.clone();
    let (units, bytes, width) = {
        let share = share.clone();
        blocking(move || load_units(&dir, &share, opts, total, progress)).await?
    };
    let mut shard = Shard {
        activations: activations.clone(),
        head: units.head.map(Arc::new),
        attention: BTreeMap::new(),
        ffn: BTreeMap::new(),
        experts: BTreeMap::new(),
        clock: clock.clone(),
        bytes,
        secs: 0.0,
    };
    let spawn_err = |e: ractor::SpawnErr| Error::Cluster(format!("starting an actor: {e}"));
    for g in units.experts {
        let layer = g.layer;
        let (a, _) = Actor::spawn(None, ExpertGroupActor, (Arc::new(g), clock.clone()))
            .await
            .map_err(spawn_err)?;
        shard.experts.insert(layer, a);
    }
    for a in units.attention {
        let layer = a.layer;
        let (r, _) = Actor::spawn(None, AttentionActor, (Arc::new(a), width, clock.clone()))
            .await
            .map_err(spawn_err)?;
        shard.attention.insert(layer, r);
    }
    for (layer, f) in units.ffn {
        let r = match f {
            FfnUnit::Dense(m) => {
                Actor::spawn(None, DenseActor, (layer, Arc::new(m), clock.clone()))
                    .await
                    .map_err(spawn_err)?
                    .0
            }
            FfnUnit::Moe(router, shared) => {
                let expert_node = plan.layers[layer].experts.clone();
                let mut targets = BTreeMap::new();
                for &n in &expert_node {
                    if targets.contains_key(&n) {
                        continue;
                    }
                    let t = if n == me {
                        let local = shard.experts.get(&layer).ok_or_else(|| {
                            Error::Cluster(format!(
                                "layer {layer}: experts placed here but not loaded"
                            ))
                        })?;
                        ExpertTarget::Local(local.clone())
                    } else {
                        ExpertTarget::Remote(n)
                    };
                    targets.insert(n, t);
                }
                let args = RouterArgs {
                    layer,
                    activations: activations.clone(),
                    router: Arc::new(router),
                    shared: shared.map(Arc::new),
                    expert_node,
                    targets,
                    peers: peers.clone(),
                    clock: clock.clone(),
                };
                Actor::spawn(None, RouterActor, args)
                    .await
                    .map_err(spawn_err)?
                    .0
            }
        };
        shard.ffn.insert(layer, r);
    }
    shard.secs = t0.elapsed().as_secs_f64();
    Ok(shard)
}

fn load_units(
    dir: &std::path::Path,
    share: &Share,
    opts: LoadOptions,
    total: u64,
    progress: Progress,
) -> Result<(Units, u64, usize)> {
    let w = Weights::open_with(dir, opts)?;
    let tick = || progress(w.loaded_bytes(), total, w.loaded_tensors());
    let mut units = Units {
        head: None,
        attention: Vec::new(),
        ffn: Vec::new(),
        experts: Vec::new(),
    };
    if share.head {
        units.head = Some(Head::load(&w)?);
        tick();
    }
    for &l in &share.layers {
        units.attention.push(Attention::load(&w, l)?);
        let f = if w.config.is_moe_layer(l) {
            FfnUnit::Moe(Router::load(&w, l)?, load_shared(&w, l)?)
        } else {
            FfnUnit::Dense(Mlp::load(
                &w,
                &format!("model.layers.{l}.mlp"),
                w.config.intermediate_size,
            )?)
        };
        units.ffn.push((l, f));
        tick();
    }
    for (&l, ids) in &share.experts {
        units
            .experts
            .push(ExpertGroup::load(&w, l, ids.iter().copied())?);
        tick();
    }
    Ok((units, w.loaded_bytes(), w.config.kv_width()))
}

impl Shard {
    /// Runs layers `range` (all held here) over the sequences' new tokens `x` (rows in `seqs` order); the
    /// last layer of the range keeps the last `outputs[i]` rows of sequence `i` (see [`Segment::outputs`]).
    pub async fn run_layers(
        &self,
        range: std::ops::Range<usize>,
        seqs: &[(SeqId, usize)],
        outputs: &[usize],
        mut x: Tensor,
    ) -> Result<Tensor> {
        if outputs.len() != seqs.len() {
            return Err(Error::Cluster(format!(
                "{} output counts for {} sequences",
                outputs.len(),
                seqs.len()
            )));
        }
        if let Some(((seq, n), k)) = seqs
            .iter()
            .zip(outputs)
            .find(|((_, n), k)| !(1..=*n).contains(*k))
        {
            return Err(Error::Cluster(format!(
                "sequence {seq}: {k} rows to keep of {n} new tokens"
            )));
        }
        for l in range.clone() {
            let attn = self
                .attention
                .get(&l)
                .ok_or_else(|| Error::Cluster(format!("layer {l} is not held here")))?;
            let ffn = self
                .ffn
                .get(&l)
                .ok_or_else(|| Error::Cluster(format!("layer {l} is not held here")))?;
            let seqs = seqs.to_vec();
            let outputs = if l + 1 == range.end {
                outputs.to_vec()
            } else {
                seqs.iter().map(|s| s.1).collect()
            };
            let (h, m) = ask(attn, &format!("attention {l}"), |reply| {
                AttentionMsg::Forward {
                    seqs,
                    outputs,
                    x,
                    reply,
                }
            })
            .await?;
            let y = ask(ffn, &format!("mlp {l}"), |reply| FfnMsg::Forward {
                x: m,
                reply,
            })
            .await?;
            x = (h + y)?;
        }
        Ok(x)
    }

    /// Starts `to` with the first `len` cached tokens of `from` in every attention actor here. Returns once
    /// every actor has it queued (messages to one actor are handled in order).
    pub async fn fork(&self, from: SeqId, to: SeqId, len: usize) {
        for a in self.attention.values() {
            let _ = a.cast(AttentionMsg::Fork { from, to, len });
        }
    }

    /// Drops sequences' caches in every attention actor here.
    pub fn release(&self, seqs: &[SeqId]) {
        for a in self.attention.values() {
            let _ = a.cast(AttentionMsg::Release(seqs.to_vec()));
        }
    }

    async fn answer(&self, req: Request) -> Result<Reply> {
        match req {
            Request::Experts {
                layer,
                cols,
                hidden,
                assignments,
            } => {
                let actor = self
                    .experts
                    .get(&(layer as usize))
                    .ok_or_else(|| Error::Cluster(format!("no experts of layer {layer} here")))?;
                let rows = hidden.len() / cols.max(1) as usize;
                let x = Tensor::from_vec(hidden.to_f32(), (rows, cols as usize), &Device::Cpu)?;
                let assignments = assignments
                    .into_iter()
                    .map(|r| Assignment {
                        token: r.row,
                        expert: r.expert,
                        weight: r.weight,
                    })
                    .collect();
                let y = ask(actor, "expert group", |reply| ExpertsMsg::Forward {
                    x,
                    assignments,
                    shared: None,
                    reply,
                })
                .await?;
                Ok(Reply::Hidden {
                    cols,
                    data: Floats::from_f32(&y.flatten_all()?.to_vec1::<f32>()?),
                })
            }
            Request::Layers {
                start,
                end,
                seqs,
                cols,
                hidden,
            } => {
                let rows = hidden.len() / cols.max(1) as usize;
                let x = Tensor::from_vec(hidden.to_f32(), (rows, cols as usize), &Device::Cpu)?;
                let outputs: Vec<usize> = seqs.iter().map(|s| s.outputs as usize).collect();
                let seqs: Vec<(SeqId, usize)> = seqs
                    .iter()
                    .map(|s: &SeqTokens| (s.seq, s.tokens as usize))
                    .collect();
                let y = self
                    .run_layers(start as usize..end as usize, &seqs, &outputs, x)
                    .await?;
                Ok(Reply::Hidden {
                    cols,
                    data: Floats::from_f32(&y.flatten_all()?.to_vec1::<f32>()?),
                })
            }
            Request::Release { seqs } => {
                self.release(&seqs);
                Ok(Reply::Done)
            }
            Request::Fork { from, to, len } => {
                self.fork(from, to, len as usize).await;
                Ok(Reply::Done)
            }
        }
    }
}

struct ShardHandler(Arc<Shard>);

impl Handler for ShardHandler {
    fn handle(&self, req: Request) -> futures::future::BoxFuture<'static, Reply> {
        let shard = self.0.clone();
        Box::pin(async move {
            shard.answer(req).await.unwrap_or_else(|e| Reply::Failed {
                message: e.to_string(),
            })
        })
    }
}

/// Resident memory of this process.
pub fn resident_bytes() -> u64 {
    memory_stats::memory_stats().map_or(0, |m| m.physical_mem as u64)
}

/// The shared secret named by the plan.
pub fn secret(plan: &Plan) -> Result<String> {
    let Some(var) = &plan.secret_env else {
        return Ok(String::new());
    };
    match std::env::var(var) {
        Ok(s) if !s.is_empty() => Ok(s),
        _ => Err(Error::Config {
            path: plan.source.clone(),
            field: "secret_env".into(),
            message: format!("set the shared secret in the environment variable {var}"),
        }),
    }
}

/// Starts a ractor_cluster node server named `name` on `address`'s port, with the secret as its cookie.
pub async fn start_node_server(
    name: &str,
    address: &str,
    secret: &str,
) -> Result<ActorRef<ractor_cluster::NodeServerMessage>> {
    let sock: std::net::SocketAddr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| Error::Cluster(format!("{address}: {e}")))?
        .next()
        .ok_or_else(|| Error::Cluster(format!("{address}: no address")))?;
    let server = ractor_cluster::NodeServer::new(
        sock.port(),
        secret.to_string(),
        name.to_string(),
        sock.ip().to_string(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(sock.ip());
    let (r, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| Error::Cluster(format!("starting the cluster server on {address}: {e}")))?;
    Ok(r)
}

/// A worker process: serves node `name` of `plan` until killed.
pub async fn run_node(plan: Plan, name: &str, opts: LoadOptions, progress: Progress) -> Result<()> {
    let me = plan.node_index(name).ok_or_else(|| {
        Error::Cluster(format!(
            "{}: no node is named `{name}`",
            plan.source.display()
        ))
    })?;
    if me == 0 {
        return Err(Error::Cluster(format!(
            "`{name}` is the head: run `kimi-actors serve` for it"
        )));
    }
    let secret = secret(&plan)?;
    let info = plan.nodes[me].clone();
    let status = Arc::new(Mutex::new(Status {
        node: name.to_string(),
        total: plan.node_bytes(me),
        ..Status::default()
    }));
    let _server = start_node_server(name, &info.address, &secret).await?;
    let clock = Arc::new(ComputeClock::default());
    let activations = Arc::new(Activations::for_plan(&plan));
    let control = NodeState {
        activations: activations.clone(),
        name: name.to_string(),
        model: model_fingerprint(&info.model_dir)?,
        plan: plan.hash(),
        status: status.clone(),
        clock: clock.clone(),
    };
    let (node_ref, _) = Actor::spawn(Some(control_name(name)), NodeActor, control)
        .await
        .map_err(|e| Error::Cluster(format!("starting the node actor: {e}")))?;
    ractor::pg::join(NODES_GROUP.to_string(), vec![node_ref.get_cell()]);
    let listener = tokio::net::TcpListener::bind(&info.data_address)
        .await
        .map_err(|e| Error::Cluster(format!("data link {}: {e}", info.data_address)))?;
    tracing::info!(
        node = name,
        control = info.address,
        data = info.data_address,
        "listening"
    );

    let st = status.clone();
    let report: Progress = Arc::new(move |b, t, n| {
        st.lock().unwrap_or_else(|e| e.into_inner()).bytes = b;
        progress(b, t, n)
    });
    match load_shard(
        &plan,
        me,
        opts,
        Arc::new(Peers::default()),
        clock,
        activations,
        report,
    )
    .await
    {
        Ok(shard) => {
            {
                let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                s.ready = true;
                s.bytes = shard.bytes;
                s.secs = shard.secs;
            }
            tracing::info!(
                node = name,
                gb = shard.bytes as f64 / 1e9,
                secs = shard.secs,
                "loaded"
            );
            let trust = link::Trust {
                secret,
                plan: plan.hash(),
            };
            let handler = Arc::new(ShardHandler(Arc::new(shard)));
            link::serve(listener, name.to_string(), trust, handler).await;
            Ok(())
        }
        Err(e) => {
            status.lock().unwrap_or_else(|p| p.into_inner()).error = Some(e.to_string());
            // Stay up so the head can read the error.
            tracing::error!(error = %e, "loading failed");
            futures::future::pending::<()>().await;
            Err(e)
        }
    }
}
