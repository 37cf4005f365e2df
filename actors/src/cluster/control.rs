//! The control plane: one `Node` actor per process, reachable over ractor_cluster. The head greets it (the
//! model fingerprint and plan hash must match) and polls its load status.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// The head's greeting: both sides must agree on the model and the plan.
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub from: String,
    pub model: String,
    pub plan: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub error: Option<String>,
    pub bytes: u64,
    pub total: u64,
    pub secs: f64,
    pub rss: u64,
    /// Time this node has spent computing since it started.
    pub compute_ns: u64,
    /// Expert choices of the routers on this node, per layer and expert.
    pub activations: Vec<Vec<u64>>,
}

#[derive(RactorClusterMessage)]
pub enum NodeControl {
    /// JSON [`Hello`] → `""` when accepted, else the reason.
    #[rpc]
    Hello(String, RpcReplyPort<String>),
    /// JSON [`Status`].
    #[rpc]
    Status(RpcReplyPort<String>),
}

pub struct NodeActor;

pub struct NodeState {
    pub name: String,
    pub model: String,
    pub plan: String,
    pub status: Arc<Mutex<Status>>,
    pub clock: Arc<super::units::ComputeClock>,
    pub activations: Arc<super::units::Activations>,
}

impl Actor for NodeActor {
    type Msg = NodeControl;
    type State = NodeState;
    type Arguments = NodeState;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        st: NodeState,
    ) -> std::result::Result<NodeState, ActorProcessingErr> {
        Ok(st)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut NodeState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            NodeControl::Hello(json, reply) => {
                let _span = tracing::info_span!("hello", node = st.name).entered();
                let verdict = match serde_json::from_str::<Hello>(&json) {
                    Err(e) => format!("malformed hello: {e}"),
                    Ok(h) if h.model != st.model => format!(
                        "node `{}` has a different model (fingerprint {} here, {} on `{}`)",
                        st.name, st.model, h.model, h.from
                    ),
                    Ok(h) if h.plan != st.plan => format!(
                        "node `{}` resolved a different placement (plan {} here, {} on `{}`)",
                        st.name, st.plan, h.plan, h.from
                    ),
                    Ok(_) => String::new(),
                };
                if !verdict.is_empty() {
                    tracing::warn!(%verdict, "refused the head");
                }
                let _ = reply.send(verdict);
            }
            NodeControl::Status(reply) => {
                let mut s = st.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                s.rss = super::node::resident_bytes();
                s.compute_ns = st.clock.ns.load(std::sync::atomic::Ordering::Relaxed);
                s.activations = st.activations.snapshot();
                let _ = reply.send(serde_json::to_string(&s).unwrap_or_default());
            }
        }
        Ok(())
    }
}
