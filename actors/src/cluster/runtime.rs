//! The head's runtime: holds its own share of the plan, reaches the other nodes (a ractor_cluster session
//! for membership and checks, a data link for hidden states), and runs forward steps over batches of
//! sequences, stage by stage. A node that goes down fails the steps that need it; a background task
//! reconnects it when it comes back.

use super::control::{Hello, NodeControl, Status};
use super::link::{Link, Trust};
use super::node::{
    NODES_GROUP, Progress, Shard, control_name, load_shard, secret, start_node_server,
};
use super::units::{Activations, ComputeClock, Peers, SeqId, compute};
use super::wire::{Floats, Reply, Request, SeqTokens};
use crate::error::{Error, Result};
use crate::placement::{Plan, model_fingerprint};
use crate::weights::LoadOptions;
use candle_core::{Device, Tensor};
use ractor::ActorRef;
use ractor_cluster::NodeServerMessage;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;

pub struct StartOptions {
    pub load: LoadOptions,
    /// The head's own load progress.
    pub progress: Progress,
    /// How long to wait for other nodes to come up and load.
    pub wait: Duration,
}

pub struct Runtime {
    pub plan: Plan,
    shard: Arc<Shard>,
    peers: Arc<Peers>,
    /// Each node's load status when it joined (index = node).
    pub joined: Vec<Status>,
    _server: Option<ActorRef<NodeServerMessage>>,
    reconnect: Option<tokio::task::JoinHandle<()>>,
}

/// Traffic to one node and time spent on it, since the runtime started.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeTraffic {
    pub node: String,
    pub messages: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Time the head waited for this node's replies.
    pub wait_ns: u64,
    /// Time this node computed (its actors' math).
    pub compute_ns: u64,
}

struct Connector {
    plan: Plan,
    server: ActorRef<NodeServerMessage>,
    hello: String,
    trust: Trust,
}

impl Runtime {
    pub async fn start(plan: Plan, opts: StartOptions) -> Result<Runtime> {
        let secret = secret(&plan)?;
        let peers = Arc::new(Peers {
            links: Default::default(),
            names: plan.nodes.iter().map(|n| n.name.clone()).collect(),
        });
        let head = plan.nodes[0].clone();
        let server = if plan.is_distributed() {
            Some(start_node_server(&head.name, &head.address, &secret).await?)
        } else {
            None
        };
        let connector = server.as_ref().map(|s| {
            let hello = Hello {
                from: head.name.clone(),
                model: model_fingerprint(&head.model_dir).unwrap_or_default(),
                plan: plan.hash(),
            };
            Arc::new(Connector {
                plan: plan.clone(),
                server: s.clone(),
                hello: serde_json::to_string(&hello).unwrap_or_default(),
                trust: Trust {
                    secret: secret.clone(),
                    plan: plan.hash(),
                },
            })
        });
        // Every node loads at once: ours here, theirs in their processes while we connect.
        let load = load_shard(
            &plan,
            0,
            opts.load,
            peers.clone(),
            Arc::new(ComputeClock::default()),
            Arc::new(Activations::for_plan(&plan)),
            opts.progress,
        );
        let joins = futures::future::join_all((1..plan.nodes.len()).map(|i| {
            let c = connector.clone();
            async move {
                match c {
                    Some(c) => c.join(i, opts.wait).await,
                    None => Err(Error::Cluster("no cluster server".into())),
                }
            }
        }));
        let (shard, joins) = futures::join!(load, joins);
        let shard = shard?;
        let mut joined = vec![Status {
            node: head.name.clone(),
            ready: true,
            bytes: shard.bytes,
            total: plan.node_bytes(0),
            secs: shard.secs,
            rss: super::node::resident_bytes(),
            ..Status::default()
        }];
        for (i, j) in joins.into_iter().enumerate() {
            let (link, status) = j?;
            peers.links.insert(i + 1, link);
            joined.push(status);
        }
        if let Some(server) = &server {
            watch_sessions(server, peers.clone());
        }
        let reconnect = connector.map(|c| tokio::spawn(reconnect_loop(c, peers.clone())));
        Ok(Runtime {
            plan,
            shard: Arc::new(shard),
            peers,
            joined,
            _server: server,
            reconnect,
        })
    }

    /// One forward step. `batch[i] = (sequence, its new tokens)`; returns logits rows: the last position of
    /// each sequence, or (`all_positions`) every row.
    pub async fn step(
        &self,
        batch: &[(SeqId, Vec<u32>)],
        all_positions: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let span = tracing::debug_span!("step", seqs = batch.len());
        self.step_inner(batch, all_positions).instrument(span).await
    }

    async fn step_inner(
        &self,
        batch: &[(SeqId, Vec<u32>)],
        all_positions: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let head = self
            .shard
            .head
            .clone()
            .ok_or_else(|| Error::Cluster("this node is not the head".into()))?;
        let tokens: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let seqs: Vec<(SeqId, usize)> = batch.iter().map(|(s, t)| (*s, t.len())).collect();
        if seqs.iter().any(|s| s.1 == 0) {
            return Err(Error::Invalid(
                "a step needs at least one token per sequence".into(),
            ));
        }
        let h = head.clone();
        let mut x = compute(move || h.embed(&tokens)).await?;
        let layers = self.plan.layers.len();
        for (node, range) in self.plan.stages() {
            // The model's last layer computes only the rows whose logits are wanted.
            let outputs: Vec<usize> = seqs
                .iter()
                .map(|&(_, n)| {
                    if range.end == layers && !all_positions {
                        1
                    } else {
                        n
                    }
                })
                .collect();
            x = if node == 0 {
                self.shard.run_layers(range, &seqs, &outputs, x).await?
            } else {
                let link = self.peers.link(node)?;
                let cols = x.dims2()?.1;
                let req = Request::Layers {
                    start: range.start as u32,
                    end: range.end as u32,
                    seqs: seqs
                        .iter()
                        .zip(&outputs)
                        .map(|(&(seq, n), &k)| SeqTokens {
                            seq,
                            tokens: n as u32,
                            outputs: k as u32,
                        })
                        .collect(),
                    cols: cols as u32,
                    hidden: Floats::from_f32(&x.flatten_all()?.to_vec1::<f32>()?),
                };
                let rows: usize = outputs.iter().sum();
                match link.call(req).await? {
                    Reply::Hidden { data, .. } if data.len() == rows * cols => {
                        Tensor::from_vec(data.to_f32(), (rows, cols), &Device::Cpu)?
                    }
                    Reply::Hidden { data, .. } => {
                        return Err(Error::Cluster(format!(
                            "node {node} sent {} values for {rows} rows of {cols}",
                            data.len()
                        )));
                    }
                    other => return Err(Error::Cluster(format!("unexpected reply {other:?}"))),
                }
            };
        }
        // `x`: the rows the last layer kept, every position or each sequence's last.
        Ok(compute(move || head.logits(&x)).await?.to_vec2()?)
    }

    /// Drops sequences' caches everywhere.
    pub async fn release(&self, seqs: &[SeqId]) {
        self.shard.release(seqs);
        for e in self.peers.links.iter() {
            let link = e.value().clone();
            let req = Request::Release {
                seqs: seqs.to_vec(),
            };
            if let Err(err) = link.call(req).await {
                tracing::debug!(node = link.node, error = %err, "release");
            }
        }
    }

    /// Starts sequence `to` with the first `len` cached tokens of `from`, on every node.
    pub async fn fork(&self, from: SeqId, to: SeqId, len: usize) -> Result<()> {
        self.shard.fork(from, to, len).await;
        for e in self.peers.links.iter() {
            let link = e.value().clone();
            link.call(Request::Fork {
                from,
                to,
                len: len as u32,
            })
            .await?;
        }
        Ok(())
    }

    /// How often each expert of each layer was chosen since start, over every node's routers.
    pub async fn activations(&self) -> Vec<Vec<u64>> {
        let mut total = self.shard.activations.snapshot();
        for i in 1..self.plan.nodes.len() {
            if let Ok(s) = status_of(&self.plan.nodes[i].name).await {
                for (t, r) in total.iter_mut().zip(&s.activations) {
                    for (a, b) in t.iter_mut().zip(r) {
                        *a += b;
                    }
                }
            }
        }
        total
    }

    /// Each node's latest status (resident memory, bytes held); the head's is measured here.
    pub async fn statuses(&self) -> Vec<Status> {
        let mut out = vec![Status {
            node: self.plan.nodes[0].name.clone(),
            ready: true,
            bytes: self.joined[0].bytes,
            total: self.joined[0].total,
            secs: self.joined[0].secs,
            rss: super::node::resident_bytes(),
            compute_ns: self.shard.clock.ns.load(Ordering::Relaxed),
            ..Status::default()
        }];
        for i in 1..self.plan.nodes.len() {
            let s = match status_of(&self.plan.nodes[i].name).await {
                Ok(s) => s,
                Err(e) => Status {
                    node: self.plan.nodes[i].name.clone(),
                    error: Some(e.to_string()),
                    ..Status::default()
                },
            };
            out.push(s);
        }
        out
    }

    /// Traffic and compute per node so far (node 0 is the head: no link).
    pub async fn traffic(&self) -> Vec<NodeTraffic> {
        let mut out = vec![NodeTraffic {
            node: self.plan.nodes[0].name.clone(),
            compute_ns: self.shard.clock.ns.load(Ordering::Relaxed),
            ..NodeTraffic::default()
        }];
        for i in 1..self.plan.nodes.len() {
            let mut t = NodeTraffic {
                node: self.plan.nodes[i].name.clone(),
                ..NodeTraffic::default()
            };
            if let Some(l) = self.peers.links.get(&i) {
                t.messages = l.stats.messages.load(Ordering::Relaxed);
                t.bytes_out = l.stats.bytes_out.load(Ordering::Relaxed);
                t.bytes_in = l.stats.bytes_in.load(Ordering::Relaxed);
                t.wait_ns = l.stats.wait_ns.load(Ordering::Relaxed);
            }
            if let Ok(s) = status_of(&self.plan.nodes[i].name).await {
                t.compute_ns = s.compute_ns;
            }
            out.push(t);
        }
        out
    }

    /// Whether every node is reachable now.
    pub fn nodes_up(&self) -> Vec<(String, bool)> {
        (0..self.plan.nodes.len())
            .map(|i| {
                (
                    self.plan.nodes[i].name.clone(),
                    i == 0 || self.peers.link(i).is_ok(),
                )
            })
            .collect()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(r) = &self.reconnect {
            r.abort();
        }
    }
}

/// The control actor of node `name`, once its session is up.
fn control_of(name: &str) -> Option<ActorRef<NodeControl>> {
    let want = control_name(name);
    ractor::pg::get_members(&NODES_GROUP.to_string())
        .into_iter()
        .find(|c| !c.get_id().is_local() && c.get_name().as_deref() == Some(want.as_str()))
        .map(ActorRef::from)
}

async fn status_of(name: &str) -> Result<Status> {
    let node = control_of(name)
        .ok_or_else(|| Error::Cluster(format!("node `{name}` is not connected")))?;
    let r = node
        .call(NodeControl::Status, Some(Duration::from_secs(5)))
        .await
        .map_err(|e| Error::Cluster(format!("node `{name}`: {e}")))?;
    match r {
        ractor::rpc::CallResult::Success(json) => serde_json::from_str(&json)
            .map_err(|e| Error::Cluster(format!("node `{name}` status: {e}"))),
        _ => Err(Error::Cluster(format!(
            "node `{name}` did not answer its status"
        ))),
    }
}

impl Connector {
    /// Connects to node `i`: cluster session, model and plan check, wait until loaded, data link.
    async fn join(&self, i: usize, wait: Duration) -> Result<(Arc<Link>, Status)> {
        let n = &self.plan.nodes[i];
        let deadline = Instant::now() + wait;
        let late = |what: &str| {
            Error::Cluster(format!(
                "node `{}` at {}: {what} within {:?}",
                n.name, n.address, wait
            ))
        };
        // 1. A ractor_cluster session (the cookie is the shared secret) and the node's control actor.
        let control = loop {
            if let Some(c) = control_of(&n.name) {
                break c;
            }
            if Instant::now() > deadline {
                return Err(late(
                    "no authenticated cluster session (is it running, with the same secret?)",
                ));
            }
            if let Err(e) = ractor_cluster::client_connect(&self.server, n.address.as_str()).await {
                tracing::debug!(node = n.name, error = %e, "connecting");
            }
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if control_of(&n.name).is_some() {
                    break;
                }
            }
        };
        // 2. Same model, same plan.
        let verdict = control
            .call(
                |r| NodeControl::Hello(self.hello.clone(), r),
                Some(Duration::from_secs(10)),
            )
            .await
            .map_err(|e| Error::Cluster(format!("node `{}`: {e}", n.name)))?;
        match verdict {
            ractor::rpc::CallResult::Success(v) if v.is_empty() => {}
            ractor::rpc::CallResult::Success(v) => {
                return Err(Error::Cluster(format!("refused: {v}")));
            }
            _ => {
                return Err(Error::Cluster(format!(
                    "node `{}` did not answer the greeting",
                    n.name
                )));
            }
        }
        // 3. Loaded.
        let status = loop {
            let s = status_of(&n.name).await?;
            if let Some(e) = s.error {
                return Err(Error::Cluster(format!(
                    "node `{}` failed to load: {e}",
                    n.name
                )));
            }
            if s.ready {
                break s;
            }
            if Instant::now() > deadline {
                return Err(late("not loaded"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // 4. The data link.
        let link = Link::connect(
            &n.name,
            &n.data_address,
            &self.plan.nodes[0].name,
            &self.trust,
        )
        .await?;
        tracing::info!(
            node = n.name,
            gb = status.bytes as f64 / 1e9,
            secs = status.secs,
            "joined"
        );
        Ok((link, status))
    }
}

/// ractor_cluster's node-down events: a session that closes takes its node's data link down with it.
struct SessionEvents(tokio::sync::mpsc::UnboundedSender<String>);

impl ractor_cluster::NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        let name = ses.peer_name.map(|p| p.name).unwrap_or(ses.peer_addr);
        let _ = self.0.send(name);
    }
}

fn watch_sessions(server: &ActorRef<NodeServerMessage>, peers: Arc<Peers>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = NodeServerMessage::SubscribeToEvents {
        id: "kimi-runtime".into(),
        subscription: Box::new(SessionEvents(tx)),
    };
    if let Err(e) = server.cast(sub) {
        tracing::warn!(error = %e, "subscribing to node events");
        return;
    }
    tokio::spawn(async move {
        while let Some(name) = rx.recv().await {
            tracing::warn!(node = name, "cluster session closed");
            if let Some(i) = peers.names.iter().position(|n| *n == name)
                && let Some(link) = peers.links.get(&i)
            {
                link.kill("its cluster session closed");
            }
        }
    });
}

/// Brings nodes whose link is down back once they answer again.
async fn reconnect_loop(c: Arc<Connector>, peers: Arc<Peers>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 1..c.plan.nodes.len() {
            if peers.link(i).is_ok() {
                continue;
            }
            match c.join(i, Duration::from_secs(2)).await {
                Ok((link, _)) => {
                    tracing::warn!(node = c.plan.nodes[i].name, "node is back");
                    peers.links.insert(i, link);
                }
                Err(e) => tracing::debug!(node = c.plan.nodes[i].name, error = %e, "still down"),
            }
        }
    }
}
