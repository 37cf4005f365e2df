//! One actor per unit of the model on this node: `Attention(l)` (its weights and the latent KV cache of every
//! live sequence), `Router(l)` (gate, shared expert, and the fan-out to expert groups wherever they live),
//! `Dense(l)` (the MLP of the first layers) and `ExpertGroup(l)` (the experts of layer `l` held here).
//! Handlers run the math through [`compute`]: in place while a worker of the async runtime stays free,
//! else on the blocking pool, so a busy actor never stalls the runtime.

use super::link::Link;
use super::wire::{Floats, Reply, Request, Routed};
use crate::error::{Error, Result};
use crate::model::attention::{Attention, Segment};
use crate::model::cache::LatentCache;
use crate::model::mlp::Mlp;
use crate::model::moe::{Assignment, ExpertGroup, Router};
use candle_core::{Device, Tensor};
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tracing::Instrument;

/// A sequence's id, unique on the head.
pub type SeqId = u64;

/// Replies carry errors as text: they may have crossed a process boundary.
pub type Answer<T> = std::result::Result<T, String>;

/// Runs `f` on the blocking pool; a panic becomes an error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Cluster(format!("compute task failed: {e}")))?
}

/// Set while a computation runs on the thread that asked for it (see [`compute`]).
static COMPUTING_IN_PLACE: AtomicBool = AtomicBool::new(false);

/// Runs `f`, the math of one actor message; a panic becomes an error. A decode step hands some 25 of these
/// from actor to actor, and moving each to the blocking pool costs two wake-ups across threads (the pool
/// thread's, then the waiting task's): on the bench model with one process, decode ran at ~77 tok/s that
/// way against ~90 with the math in place. So one computation at a time runs on the calling thread itself;
/// any other, and every one on a runtime with fewer than two workers, goes to the blocking pool, so a worker
/// always stays free for the links and their heartbeats.
pub async fn compute<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let spare_worker = tokio::runtime::Handle::try_current().is_ok_and(|h| {
        h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && h.metrics().num_workers() >= 2
    });
    if !spare_worker
        || COMPUTING_IN_PLACE
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return blocking(f).await;
    }
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            COMPUTING_IN_PLACE.store(false, Ordering::Release);
        }
    }
    let _done = Done;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::Cluster(format!("compute task panicked: {what}"))
    })?
}

/// Time spent computing on this node (for `bench`).
#[derive(Default, Debug)]
pub struct ComputeClock {
    pub ns: std::sync::atomic::AtomicU64,
}

impl ComputeClock {
    async fn time<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let t = Instant::now();
        let r = compute(f).await;
        self.ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

// ---- Attention(l) ----

pub enum AttentionMsg {
    /// Rows of `x` are the sequences' new tokens, in order: `(h, post-attention-normed h)` of the last
    /// `outputs[i]` rows of each (see [`Segment::outputs`]).
    Forward {
        seqs: Vec<(SeqId, usize)>,
        outputs: Vec<usize>,
        x: Tensor,
        reply: RpcReplyPort<Answer<(Tensor, Tensor)>>,
    },
    /// Drops these sequences' caches.
    Release(Vec<SeqId>),
    /// Starts sequence `to` with the first `len` cached tokens of `from` (a shared prompt prefix).
    Fork { from: SeqId, to: SeqId, len: usize },
}
impl ractor::Message for AttentionMsg {}

pub struct AttentionActor;

pub struct AttentionState {
    unit: Arc<Attention>,
    width: usize,
    caches: HashMap<SeqId, LatentCache>,
    clock: Arc<ComputeClock>,
}

impl Actor for AttentionActor {
    type Msg = AttentionMsg;
    type State = AttentionState;
    type Arguments = (Arc<Attention>, usize, Arc<ComputeClock>);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        (unit, width, clock): Self::Arguments,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(AttentionState {
            unit,
            width,
            caches: HashMap::new(),
            clock,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            AttentionMsg::Forward {
                seqs,
                outputs,
                x,
                reply,
            } => {
                let layer = st.unit.layer;
                let span =
                    tracing::debug_span!("attention", layer, seqs = seqs.len(), rows = x.dims()[0]);
                let result = async {
                    // Move the sequences' caches into the compute task and back.
                    let mut caches = Vec::with_capacity(seqs.len());
                    for (s, _) in &seqs {
                        let c = match st.caches.remove(s) {
                            Some(c) => c,
                            None => LatentCache::new(st.width)?,
                        };
                        caches.push(c);
                    }
                    let unit = st.unit.clone();
                    let lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
                    let (caches, out) = st
                        .clock
                        .time(move || {
                            let mut caches = caches;
                            let mut start = 0;
                            let mut segs: Vec<Segment> = caches
                                .iter_mut()
                                .zip(lens.iter().zip(&outputs))
                                .map(|(cache, (&n, &outputs))| {
                                    let rows = start..start + n;
                                    start += n;
                                    Segment {
                                        rows,
                                        outputs,
                                        cache,
                                    }
                                })
                                .collect();
                            let out = unit.forward(&x, &mut segs);
                            Ok((caches, out))
                        })
                        .await?;
                    for ((s, _), c) in seqs.iter().zip(caches) {
                        st.caches.insert(*s, c);
                    }
                    out
                }
                .instrument(span)
                .await;
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            AttentionMsg::Release(seqs) => {
                for s in seqs {
                    st.caches.remove(&s);
                }
            }
            AttentionMsg::Fork { from, to, len } => {
                match st.caches.get(&from).map(|c| c.prefix(len)) {
                    Some(Ok(c)) => {
                        st.caches.insert(to, c);
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "copying a cached prefix"),
                    None => {}
                }
            }
        }
        Ok(())
    }
}

// ---- Router(l) and Dense(l): the MLP half of a layer ----

pub enum FfnMsg {
    /// `x`: post-attention-normed rows → the MLP output to add to the residual.
    Forward {
        x: Tensor,
        reply: RpcReplyPort<Answer<Tensor>>,
    },
}
impl ractor::Message for FfnMsg {}

pub struct DenseActor;

impl Actor for DenseActor {
    type Msg = FfnMsg;
    type State = (usize, Arc<Mlp>, Arc<ComputeClock>);
    type Arguments = (usize, Arc<Mlp>, Arc<ComputeClock>);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let FfnMsg::Forward { x, reply } = msg;
        let (layer, mlp) = (st.0, st.1.clone());
        let out =
            st.2.time(move || mlp.forward(&x))
                .instrument(tracing::debug_span!("dense", layer))
                .await;
        let _ = reply.send(out.map_err(|e| e.to_string()));
        Ok(())
    }
}

/// Where a layer's experts live, as seen by its router.
pub enum ExpertTarget {
    Local(ActorRef<ExpertsMsg>),
    Remote(usize),
}

/// The head's links to other nodes, replaced when a node reconnects.
#[derive(Default)]
pub struct Peers {
    pub links: DashMap<usize, Arc<Link>>,
    pub names: Vec<String>,
}

impl Peers {
    pub fn link(&self, node: usize) -> Result<Arc<Link>> {
        let name = self.names.get(node).map_or("?", |s| s.as_str());
        match self.links.get(&node) {
            Some(l) if l.is_alive() => Ok(l.clone()),
            _ => Err(Error::Cluster(format!("node `{name}` is down"))),
        }
    }
}

/// How often each expert of each layer was chosen (the page's heatmap).
pub struct Activations {
    pub counts: Vec<Vec<std::sync::atomic::AtomicU64>>,
}

impl Activations {
    pub fn new(layers: usize, experts: usize) -> Activations {
        Activations {
            counts: (0..layers)
                .map(|_| {
                    (0..experts)
                        .map(|_| std::sync::atomic::AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    /// Every layer of the plan, with its number of experts.
    pub fn for_plan(plan: &crate::placement::Plan) -> Activations {
        Activations::new(
            plan.layers.len(),
            plan.layers
                .iter()
                .map(|l| l.experts.len())
                .max()
                .unwrap_or(0),
        )
    }

    pub fn snapshot(&self) -> Vec<Vec<u64>> {
        self.counts
            .iter()
            .map(|l| l.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .collect()
    }
}

pub struct RouterArgs {
    pub layer: usize,
    pub activations: Arc<Activations>,
    pub router: Arc<Router>,
    pub shared: Option<Arc<Mlp>>,
    /// Node holding each expert, and how to reach each node.
    pub expert_node: Vec<usize>,
    pub targets: BTreeMap<usize, ExpertTarget>,
    pub peers: Arc<Peers>,
    pub clock: Arc<ComputeClock>,
}

pub struct RouterActor;

impl Actor for RouterActor {
    type Msg = FfnMsg;
    type State = RouterArgs;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let FfnMsg::Forward { x, reply } = msg;
        let out = route(st, x)
            .instrument(tracing::debug_span!("router", layer = st.layer))
            .await;
        let _ = reply.send(out.map_err(|e| e.to_string()));
        Ok(())
    }
}

/// Top-k per token, one message per node holding chosen experts (with only the rows routed there), the shared
/// expert computed here meanwhile, and the sum.
async fn route(st: &RouterArgs, x: Tensor) -> Result<Tensor> {
    let (t, hidden) = x.dims2()?;
    let (router, xr) = (st.router.clone(), x.clone());
    let assignments = st.clock.time(move || router.route(&xr)).await?;
    if let Some(row) = st.activations.counts.get(st.layer) {
        for a in &assignments {
            if let Some(c) = row.get(a.expert as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // Remote nodes get only the rows routed to them, with their (row, expert, weight) triples over those
    // rows; this node's experts see all rows with the original token indices.
    let mut local: Vec<Assignment> = Vec::new();
    let mut per_node: BTreeMap<usize, (Vec<u32>, Vec<Assignment>)> = BTreeMap::new();
    for a in &assignments {
        let node = st.expert_node[a.expert as usize];
        if let Some(ExpertTarget::Local(_)) = st.targets.get(&node) {
            local.push(*a);
            continue;
        }
        let (rows, assigned) = per_node.entry(node).or_default();
        let row = match rows.iter().position(|&r| r == a.token) {
            Some(i) => i,
            None => {
                rows.push(a.token);
                rows.len() - 1
            }
        };
        assigned.push(Assignment {
            token: row as u32,
            ..*a
        });
    }

    // Remote nodes start at once; this node's experts and the shared expert run while they compute.
    let mut remote = Vec::new();
    for (node, (rows, assigned)) in per_node {
        let Some(ExpertTarget::Remote(n)) = st.targets.get(&node) else {
            return Err(Error::Cluster(format!(
                "layer {}: no route to node {node}",
                st.layer
            )));
        };
        let link = st.peers.link(*n)?;
        let idx = Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu)?;
        let xs = x.index_select(&idx, 0)?;
        let layer = st.layer as u32;
        remote.push(async move {
            let (n_rows, cols) = xs.dims2()?;
            let req = Request::Experts {
                layer,
                cols: cols as u32,
                hidden: Floats::from_f32(&xs.flatten_all()?.to_vec1::<f32>()?),
                assignments: assigned
                    .iter()
                    .map(|a| Routed {
                        row: a.token,
                        expert: a.expert,
                        weight: a.weight,
                    })
                    .collect(),
            };
            match link.call(req).await? {
                Reply::Hidden { data, .. } => Ok((
                    rows,
                    Tensor::from_vec(data.to_f32(), (n_rows, cols), &Device::Cpu)?,
                )),
                other => Err(Error::Cluster(format!("unexpected reply {other:?}"))),
            }
        });
    }
    let here = async {
        let group = st.targets.values().find_map(|t| match t {
            ExpertTarget::Local(a) => Some(a.clone()),
            ExpertTarget::Remote(_) => None,
        });
        match (group, st.shared.clone()) {
            (Some(actor), shared) => {
                let x = x.clone();
                ask(&actor, "expert group", |reply| ExpertsMsg::Forward {
                    x,
                    assignments: local,
                    shared,
                    reply,
                })
                .await
            }
            (None, Some(s)) => {
                let x = x.clone();
                st.clock.time(move || s.forward(&x)).await
            }
            (None, None) => Ok(Tensor::zeros(
                (t, hidden),
                candle_core::DType::F32,
                &Device::Cpu,
            )?),
        }
    };
    // The remote requests are polled first: they go out before this node's share computes (in place, on
    // this thread, when `compute` finds it free).
    let (there, here) = futures::join!(futures::future::join_all(remote), here);
    let mut out: Vec<f32> = here?.flatten_all()?.to_vec1()?;
    for p in there {
        let (rows, y) = p?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        for (i, &r) in rows.iter().enumerate() {
            let dst = &mut out[r as usize * hidden..(r as usize + 1) * hidden];
            for (d, s) in dst.iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                *d += s;
            }
        }
    }
    Ok(Tensor::from_vec(out, (t, hidden), &Device::Cpu)?)
}

fn answer<T>(r: ractor::rpc::CallResult<Answer<T>>) -> Result<T> {
    match r {
        ractor::rpc::CallResult::Success(Ok(v)) => Ok(v),
        ractor::rpc::CallResult::Success(Err(e)) => Err(Error::Cluster(e)),
        ractor::rpc::CallResult::Timeout => Err(Error::Cluster("an actor timed out".into())),
        ractor::rpc::CallResult::SenderError => Err(Error::Cluster("an actor stopped".into())),
    }
}

/// Calls a local actor and unwraps its answer.
pub async fn ask<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    what: &str,
    make: impl FnOnce(RpcReplyPort<Answer<T>>) -> M,
) -> Result<T> {
    let r = actor
        .call(make, None)
        .await
        .map_err(|e| Error::Cluster(format!("{what}: {e}")))?;
    answer(r).map_err(|e| Error::Cluster(format!("{what}: {e}")))
}

// ---- ExpertGroup(l) ----

pub enum ExpertsMsg {
    /// `Σ weight · expert(x[row])` per row of `x`, over the given assignments (rows index `x`), plus
    /// `shared(x)` when the router on this node passes its shared expert (one parallel region for both).
    Forward {
        x: Tensor,
        assignments: Vec<Assignment>,
        shared: Option<Arc<Mlp>>,
        reply: RpcReplyPort<Answer<Tensor>>,
    },
}
impl ractor::Message for ExpertsMsg {}

pub struct ExpertGroupActor;

impl Actor for ExpertGroupActor {
    type Msg = ExpertsMsg;
    type State = (Arc<ExpertGroup>, Arc<ComputeClock>);
    type Arguments = (Arc<ExpertGroup>, Arc<ComputeClock>);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let ExpertsMsg::Forward {
            x,
            assignments,
            shared,
            reply,
        } = msg;
        let group = st.0.clone();
        let span = tracing::debug_span!(
            "experts",
            layer = group.layer,
            assignments = assignments.len()
        );
        let out =
            st.1.time(move || group.forward(&x, &assignments, shared.as_deref()))
                .instrument(span)
                .await;
        let _ = reply.send(out.map_err(|e| e.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread::ThreadId;
    use std::time::Duration;

    /// The place is one per process: these tests take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The thread of the task that asks, and the thread `compute` ran the closure on.
    async fn threads() -> (ThreadId, ThreadId) {
        let caller = std::thread::current().id();
        let ran = compute(|| Ok(std::thread::current().id())).await.unwrap();
        (caller, ran)
    }

    #[test]
    fn computes_in_place_on_a_worker_and_recovers_from_a_panic() {
        let _serial = serial();
        runtime(2).block_on(async {
            let (caller, ran) = tokio::spawn(threads()).await.unwrap();
            assert_eq!(caller, ran);
            let e = tokio::spawn(compute(|| -> Result<()> { panic!("bad shape") }))
                .await
                .unwrap();
            assert!(e.unwrap_err().to_string().contains("bad shape"));
            // The panic released the place: the next computation runs in place again.
            let (caller, ran) = tokio::spawn(threads()).await.unwrap();
            assert_eq!(caller, ran);
        });
    }

    #[test]
    fn goes_to_the_blocking_pool_without_a_spare_worker() {
        let _serial = serial();
        let one = runtime(1);
        let (caller, ran) = one.block_on(one.spawn(threads())).unwrap();
        assert_ne!(caller, ran);
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (caller, ran) = current.block_on(threads());
        assert_ne!(caller, ran);
    }

    /// Two computations that never end on their own (actors of two layers at once) must leave a worker for
    /// the timers and links: the second goes to the blocking pool.
    #[test]
    fn a_worker_stays_free_while_two_computations_run() {
        let _serial = serial();
        let rt = runtime(2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let mut held = Vec::new();
        for _ in 0..2 {
            let (release, started) = (release_rx.clone(), started_tx.clone());
            held.push(rt.spawn(compute(move || {
                let _ = started.send(());
                let _ = release.lock().unwrap().recv();
                Ok(())
            })));
            started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let (tick_tx, tick_rx) = mpsc::channel::<()>();
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tick_tx.send(());
        });
        let ticked = tick_rx.recv_timeout(Duration::from_secs(5));
        for _ in 0..2 {
            let _ = release_tx.send(());
        }
        assert!(ticked.is_ok(), "no worker was left for a timer");
        for h in held {
            rt.block_on(h).unwrap().unwrap();
        }
    }
}
