//! `kimi-actors serve`: the WebSocket token stream (`/v1/ws`), the OpenAI-compatible API
//! (`/v1/chat/completions`, `/v1/models`), `/health`, `/metrics`, and a page at `/` with a chat and a live view
//! of the cluster.

mod generation;
mod openai;
mod page;
mod ws;

use crate::cluster::{self, ClusterArgs};
use crate::load::{self, ModelArgs};
use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use engine::cluster::runtime::Runtime;
use engine::cluster::scheduler::{Scheduler, SchedulerArgs, SchedulerStats};
use generation::Generator;
use ractor::Actor;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::Instrument;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Require this key on every endpoint (`Authorization: Bearer KEY`, or `?api_key=KEY`).
    #[arg(long, env = "KIMI_API_KEY")]
    api_key: Option<String>,
    /// Longest prompt + completion, in tokens (default: the model's, at most 32768).
    #[arg(long)]
    context: Option<usize>,
    /// Memory for the prompt-prefix cache, in MB.
    #[arg(long, default_value_t = 256)]
    prefix_cache_mb: u64,
}

pub struct AppState {
    pub runtime: Arc<Runtime>,
    pub generator: Generator,
    pub stats: Arc<SchedulerStats>,
    pub model_id: String,
    api_key: Option<String>,
    requests: AtomicU64,
    errors: AtomicU64,
    next_request: AtomicU64,
    started: std::time::Instant,
}

/// An error answer: a status and a message naming the problem (OpenAI's error shape).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body =
            json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}});
        (self.status, axum::Json(body)).into_response()
    }
}

pub async fn run(a: ServeArgs) -> Result<()> {
    let plan = cluster::plan(&a.cluster, &a.model)?;
    let tokenizer = Arc::new(load::tokenizer(&plan.nodes[0].model_dir)?);
    let config =
        engine::ModelConfig::load(&plan.nodes[0].model_dir).context("reading the model config")?;
    let head = cluster::start(&a.cluster, &a.model).await?;
    let runtime = head.runtime.clone();
    let stats = Arc::new(SchedulerStats::default());
    let args = SchedulerArgs {
        runtime: runtime.clone(),
        prefix_budget: a.prefix_cache_mb << 20,
        kv_bytes_per_token: (config.num_hidden_layers * config.kv_width() * 4) as u64,
        stats: stats.clone(),
    };
    let (scheduler, _) = Actor::spawn(Some("scheduler".into()), Scheduler, args)
        .await
        .context("starting the scheduler")?;
    let context = a
        .context
        .unwrap_or(config.max_position_embeddings.min(32768));
    let model_id = plan.nodes[0]
        .model_dir
        .file_name()
        .map_or("model".to_string(), |n| n.to_string_lossy().to_string());
    let state = Arc::new(AppState {
        generator: Generator::new(tokenizer, scheduler, context),
        runtime,
        stats,
        model_id,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        next_request: AtomicU64::new(1),
        started: std::time::Instant::now(),
    });
    let app = Router::new()
        .route("/", get(page::index))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/cluster", get(page::cluster))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr().context("the listening address")?;
    eprintln!(
        "serving {} on http://{addr}/ ({} nodes)",
        state.model_id,
        state.runtime.plan.nodes.len()
    );
    let _keep_children = head;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")
}

/// Every request: a span with its id, the API key check, and counters.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let id = st.next_request.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path());
    async move {
        st.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = &st.api_key
            && !authorized(req.headers(), req.uri().query(), key)
        {
            st.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused: missing or wrong API key");
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "a valid API key is required (Authorization: Bearer KEY, or ?api_key=KEY)"
                    .into(),
            }
            .into_response();
        }
        let t = std::time::Instant::now();
        let res = next.run(req).await;
        if res.status().is_client_error() || res.status().is_server_error() {
            st.errors.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            status = res.status().as_u16(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "answered"
        );
        res
    }
    .instrument(span)
    .await
}

fn authorized(headers: &HeaderMap, query: Option<&str>, key: &str) -> bool {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let param = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("api_key=")));
    header == Some(key) || param == Some(key)
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let nodes: Vec<_> = st
        .runtime
        .nodes_up()
        .into_iter()
        .map(|(n, up)| json!({"node": n, "up": up}))
        .collect();
    let all_up = st.runtime.nodes_up().iter().all(|(_, up)| *up);
    let status = if all_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({"status": if all_up { "ok" } else { "degraded" }, "model": st.model_id, "nodes": nodes}))).into_response()
}

/// Prometheus text format.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = &st.stats;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    metric(
        "kimi_http_requests_total",
        "counter",
        "HTTP requests received.",
        one(st.requests.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_http_errors_total",
        "counter",
        "HTTP requests answered with an error status.",
        one(st.errors.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_generations_total",
        "counter",
        "Generations started.",
        one(s.requests.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_prompt_tokens_total",
        "counter",
        "Prompt tokens received.",
        one(s.prompt_tokens.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_completion_tokens_total",
        "counter",
        "Tokens generated.",
        one(s.completion_tokens.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_prefix_cache_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache.",
        one(s.prefix_tokens.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_prefix_cache_bytes",
        "gauge",
        "Bytes of KV held by the prefix cache.",
        one(s.prefix_cached_bytes.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_active_sequences",
        "gauge",
        "Sequences being generated.",
        one(s.live.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_steps_total",
        "counter",
        "Forward steps run.",
        one(s.steps.load(Ordering::Relaxed) as f64),
    );
    metric(
        "kimi_tokens_per_second",
        "gauge",
        "Recent generation throughput, all sequences.",
        one(s.tok_s()),
    );
    metric(
        "kimi_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        one(st.started.elapsed().as_secs_f64()),
    );
    let up: Vec<(String, f64)> = st
        .runtime
        .nodes_up()
        .into_iter()
        .map(|(n, up)| (format!("{{node=\"{n}\"}}"), if up { 1.0 } else { 0.0 }))
        .collect();
    metric(
        "kimi_node_up",
        "gauge",
        "Whether the node is reachable.",
        up,
    );
    let rss: Vec<(String, f64)> = st
        .runtime
        .statuses()
        .await
        .into_iter()
        .map(|s| (format!("{{node=\"{}\"}}", s.node), s.rss as f64))
        .collect();
    metric(
        "kimi_node_resident_bytes",
        "gauge",
        "Resident memory of the node's process.",
        rss,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}
