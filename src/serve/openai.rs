//! The OpenAI-compatible API: `POST /v1/chat/completions` (one JSON body, or SSE chunks ending with
//! `data: [DONE]` when `stream` is true) and `GET /v1/models`. Tools go into the chat template; the model's
//! tool-call section comes back as `tool_calls`.

use super::generation::{FinishReason, Out, Params, Prompt};
use super::ws::Stop;
use super::{ApiError, AppState};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use engine::tokenizer::tool_calls::{Piece, ToolCall, ToolCallParser};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The request fields of OpenAI's API; those we do not implement are refused unless at their neutral value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Value,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    user: Option<String>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    response_format: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    include_usage: Option<bool>,
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": now(), "owned_by": "kimi-actors"}]
    }))
    .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unsupported(field: &str) -> ApiError {
    ApiError::bad(format!("`{field}` is not supported"))
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<axum::Json<ChatRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(axum::Json(r)) => r,
        Err(e) => return ApiError::bad(e.body_text()).into_response(),
    };
    match start(&st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn start(st: &AppState, req: ChatRequest) -> Result<Response, ApiError> {
    if let Some(m) = &req.model
        && m != &st.model_id
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` does not exist; this server has `{}`",
                st.model_id
            ),
        });
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only `n` = 1 is supported"));
    }
    if req.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("presence_penalty"));
    }
    if req.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("frequency_penalty"));
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        return Err(unsupported("logprobs"));
    }
    if let Some(f) = &req.response_format
        && f.get("type").and_then(|t| t.as_str()) != Some("text")
    {
        return Err(unsupported("response_format other than text"));
    }
    if let Some(c) = &req.tool_choice
        && c != "auto"
        && c != "none"
    {
        return Err(unsupported("tool_choice other than \"auto\" or \"none\""));
    }
    let _ = (req.parallel_tool_calls, &req.user);
    let tools = if req.tool_choice.as_ref().is_some_and(|c| c == "none") {
        None
    } else {
        req.tools
    };
    let params = Params {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.map(Stop::into_vec).unwrap_or_default(),
    };
    let running = st
        .generator
        .start(
            Prompt::Chat {
                messages: req.messages,
                tools,
            },
            params,
        )
        .await?;
    let id = format!("chatcmpl-{}", running.id);
    if req.stream {
        let usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(stream(id, st.model_id.clone(), running, usage).into_response());
    }
    let prompt_tokens = running.prompt_tokens;
    let mut rx = running.rx;
    let mut parser = ToolCallParser::new();
    let (mut content, mut calls) = (String::new(), Vec::new());
    let mut collect = |pieces: Vec<Piece>| {
        for p in pieces {
            match p {
                Piece::Content(c) => content.push_str(&c),
                Piece::Call(c) => calls.push(c),
            }
        }
    };
    let (finish, reason) = loop {
        match rx.recv().await {
            Some(Out::Token { text, .. }) => collect(parser.push(&text)),
            Some(Out::Done { finish, reason }) => break (finish, reason),
            Some(Out::Error(e)) => return Err(ApiError::unavailable(e)),
            None => return Err(ApiError::unavailable("the generation ended unexpectedly")),
        }
    };
    collect(parser.finish());
    let message = json!({
        "role": "assistant",
        "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) },
        "tool_calls": if calls.is_empty() { Value::Null } else { json!(calls.iter().map(call_json).collect::<Vec<_>>()) },
    });
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": st.model_id,
        "choices": [{"index": 0, "message": strip_nulls(message), "finish_reason": finish_reason(reason, !calls.is_empty())}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": finish.completion_tokens,
            "total_tokens": prompt_tokens + finish.completion_tokens
        },
    });
    Ok(axum::Json(body).into_response())
}

fn finish_reason(r: FinishReason, tool_calls: bool) -> &'static str {
    if tool_calls && r == FinishReason::Stop {
        "tool_calls"
    } else {
        r.as_str()
    }
}

fn call_json(c: &ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

fn strip_nulls(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|k, x| !x.is_null() || k == "content");
    }
    v
}

/// SSE chunks: the role, content deltas, each complete tool call as one delta, the finish, `[DONE]`.
fn stream(
    id: String,
    model: String,
    running: super::generation::Running,
    include_usage: bool,
) -> impl IntoResponse {
    let created = now();
    let prompt_tokens = running.prompt_tokens;
    let chunk = move |delta: Value, finish: Option<&str>| -> Event {
        let data = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Event::default().data(data.to_string())
    };
    let s = async_stream(running.rx, move |out, parser, calls| {
        let mut events = Vec::new();
        match out {
            Step::First => events.push(chunk(json!({"role": "assistant", "content": ""}), None)),
            Step::Text(text) => {
                for p in parser.push(&text) {
                    events.push(piece_event(&chunk, p, calls));
                }
            }
            Step::Done(reason, completion_tokens) => {
                for p in parser.finish() {
                    events.push(piece_event(&chunk, p, calls));
                }
                events.push(chunk(json!({}), Some(finish_reason(reason, *calls > 0))));
                if include_usage {
                    let mut e = json!({"id": "", "object": "chat.completion.chunk", "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}});
                    e["created"] = json!(created);
                    events.push(Event::default().data(e.to_string()));
                }
                events.push(Event::default().data("[DONE]"));
            }
            Step::Error(e) => {
                events
                    .push(Event::default().data(
                        json!({"error": {"message": e, "type": "server_error"}}).to_string(),
                    ));
                events.push(Event::default().data("[DONE]"));
            }
        }
        events
    });
    Sse::new(s)
}

fn piece_event(
    chunk: &impl Fn(Value, Option<&str>) -> Event,
    p: Piece,
    calls: &mut usize,
) -> Event {
    match p {
        Piece::Content(c) => chunk(json!({"content": c}), None),
        Piece::Call(c) => {
            let mut v = call_json(&c);
            v["index"] = json!(*calls);
            *calls += 1;
            chunk(json!({"tool_calls": [v]}), None)
        }
    }
}

enum Step {
    First,
    Text(String),
    Done(FinishReason, usize),
    Error(String),
}

/// Maps the generation's outputs to SSE events through `f` (with the tool-call parser's state).
fn async_stream(
    mut rx: tokio::sync::mpsc::Receiver<Out>,
    mut f: impl FnMut(Step, &mut ToolCallParser, &mut usize) -> Vec<Event> + Send + 'static,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut parser = ToolCallParser::new();
        let mut calls = 0usize;
        let send = |events: Vec<Event>| {
            let tx = tx.clone();
            async move {
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if !send(f(Step::First, &mut parser, &mut calls)).await {
            return;
        }
        loop {
            let step = match rx.recv().await {
                Some(Out::Token { text, .. }) => Step::Text(text),
                Some(Out::Done { finish, reason }) => Step::Done(reason, finish.completion_tokens),
                Some(Out::Error(e)) => Step::Error(e),
                None => Step::Error("the generation ended unexpectedly".into()),
            };
            let last = !matches!(step, Step::Text(_));
            // A closed client drops `rx` here, which cancels the generation.
            if !send(f(step, &mut parser, &mut calls)).await || last {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(out)
}
