//! The page at `/` (a chat with streamed output, and a live view of the cluster) and the JSON it polls.

use super::AppState;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use engine::placement::ranges;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub async fn index() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// Nodes (what each holds, memory, whether up), throughput, and the expert-activation counts.
pub async fn cluster(State(st): State<Arc<AppState>>) -> Response {
    let rt = &st.runtime;
    let plan = &rt.plan;
    let up = rt.nodes_up();
    let statuses = rt.statuses().await;
    let nodes: Vec<_> = plan
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let share = plan.share(i);
            let mut experts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (l, es) in &share.experts {
                experts.entry(ranges(es)).or_default().push(*l);
            }
            let status = statuses.iter().find(|s| s.node == n.name);
            json!({
                "name": n.name,
                "address": n.address,
                "head": i == 0,
                "up": up.get(i).is_some_and(|u| u.1),
                "layers": ranges(&share.layers),
                "experts": experts.iter().map(|(e, ls)| json!({"experts": e, "layers": ranges(ls)})).collect::<Vec<_>>(),
                "weight_bytes": plan.node_bytes(i),
                "budget_bytes": n.memory,
                "resident_bytes": status.map_or(0, |s| s.rss),
            })
        })
        .collect();
    let s = &st.stats;
    json_response(json!({
        "model": st.model_id,
        "mode": format!("{:?}", plan.mode),
        "nodes": nodes,
        "tokens_per_second": s.tok_s(),
        "active_sequences": s.live.load(Ordering::Relaxed),
        "generations": s.requests.load(Ordering::Relaxed),
        "completion_tokens": s.completion_tokens.load(Ordering::Relaxed),
        "prefix_cache_tokens": s.prefix_tokens.load(Ordering::Relaxed),
        "activations": rt.activations().await,
    }))
}

fn json_response(v: serde_json::Value) -> Response {
    axum::Json(v).into_response()
}
