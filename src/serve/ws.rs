//! `/v1/ws`: one JSON request at a time per socket, tokens streamed as they are produced.
//!
//! Client → server: `{"messages": [...], "tools": [...]}` or `{"prompt": "..."}`, with optional `max_tokens`,
//! `temperature`, `top_p`, `seed`, `stop`; or `{"type": "cancel"}`.
//! Server → client: `{"type":"token","text":"…","id":N}` per token, then
//! `{"type":"done","usage":{"prompt_tokens":…,"completion_tokens":…},"timings":{"ttft_ms":…,"decode_tok_s":…},"finish_reason":…}`;
//! failures as `{"type":"error","message":"…"}` (the socket stays open).

use super::AppState;
use super::generation::{Out, Params, Prompt, Running};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest request message accepted (bigger ones get an error frame; the socket stays open).
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WsRequest {
    #[serde(rename = "type")]
    kind: Option<String>,
    messages: Option<Value>,
    tools: Option<Value>,
    prompt: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

pub async fn upgrade(State(st): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    // The transport limit sits above ours, so an oversized request gets an error frame, not a dropped socket.
    ws.max_message_size(4 * MAX_MESSAGE)
        .on_upgrade(move |socket| session(st, socket))
}

fn error(message: impl Into<String>) -> Message {
    Message::Text(
        json!({"type": "error", "message": message.into()})
            .to_string()
            .into(),
    )
}

async fn session(st: Arc<AppState>, mut socket: WebSocket) {
    let mut running: Option<Running> = None;
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else {
                    break; // closed or broken: dropping `running` cancels its generation
                };
                let reply = match msg {
                    Message::Text(t) if t.len() > MAX_MESSAGE => {
                        Some(error(format!("the message is {} bytes; the limit is {MAX_MESSAGE}", t.len())))
                    }
                    Message::Text(t) => handle(&st, t.as_str(), &mut running).await,
                    Message::Binary(_) => Some(error("binary frames are not supported: send JSON text")),
                    Message::Close(_) => break,
                    _ => None,
                };
                if let Some(r) = reply
                    && socket.send(r).await.is_err()
                {
                    break;
                }
            }
            out = next(&mut running) => {
                let frame = match out {
                    Some(Out::Token { text, id }) => json!({"type": "token", "text": text, "id": id}),
                    Some(Out::Done { finish, reason }) => {
                        let prompt = running.as_ref().map_or(0, |r| r.prompt_tokens);
                        running = None;
                        json!({
                            "type": "done",
                            "finish_reason": reason.as_str(),
                            "usage": {"prompt_tokens": prompt, "completion_tokens": finish.completion_tokens},
                            "timings": {"ttft_ms": finish.ttft.as_secs_f64() * 1e3, "decode_tok_s": finish.decode_tok_s()},
                        })
                    }
                    Some(Out::Error(e)) => {
                        running = None;
                        json!({"type": "error", "message": e})
                    }
                    None => {
                        running = None;
                        json!({"type": "error", "message": "the generation ended unexpectedly"})
                    }
                };
                if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The next output of the running generation (pending forever when there is none).
async fn next(running: &mut Option<Running>) -> Option<Out> {
    match running {
        Some(r) => r.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One client message: a request, or a cancel. Returns a frame to send back, if any.
async fn handle(st: &AppState, text: &str, running: &mut Option<Running>) -> Option<Message> {
    let req: WsRequest = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => return Some(error(format!("invalid request: {e}"))),
    };
    if let Some(kind) = &req.kind {
        if kind != "cancel" {
            return Some(error(format!("unknown message type `{kind}`")));
        }
        return match running.take() {
            Some(r) => {
                st.generator.cancel(r.id);
                Some(Message::Text(
                    json!({"type": "cancelled"}).to_string().into(),
                ))
            }
            None => Some(error("nothing to cancel")),
        };
    }
    if running.is_some() {
        return Some(error(
            "a generation is running on this socket: wait for `done` or send {\"type\":\"cancel\"}",
        ));
    }
    let prompt = match (req.messages, req.prompt) {
        (Some(messages), None) => Prompt::Chat {
            messages,
            tools: req.tools,
        },
        (None, Some(p)) => Prompt::Text(p),
        (Some(_), Some(_)) => return Some(error("give `messages` or `prompt`, not both")),
        (None, None) => return Some(error("give `messages` or `prompt`")),
    };
    let params = Params {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.map(Stop::into_vec).unwrap_or_default(),
    };
    match st.generator.start(prompt, params).await {
        Ok(r) => {
            *running = Some(r);
            None
        }
        Err(e) => Some(error(e.message)),
    }
}
