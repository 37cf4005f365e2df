//! Turning a request into a running sequence and its output into text events: validation (an [`ApiError`]
//! naming the problem), the prompt (chat template or plain text), whole UTF-8 characters only, stop strings,
//! and cancellation when the client goes away.

use super::ApiError;
use engine::cluster::scheduler::{Event, Finish, SchedulerMsg, Submit};
use engine::cluster::units::SeqId;
use engine::generate::{SamplingParams, StopReason};
use engine::tokenizer::Tokenizer;
use engine::tokenizer::tool_calls::{ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END};
use ractor::ActorRef;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Default completion length when a request gives none.
const DEFAULT_MAX_TOKENS: usize = 256;

pub enum Prompt {
    Chat {
        messages: Value,
        tools: Option<Value>,
    },
    Text(String),
}

#[derive(Default)]
pub struct Params {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// What a running generation sends.
#[derive(Debug)]
pub enum Out {
    /// Text of one token (empty while a character or a possible stop string is incomplete).
    Token {
        text: String,
        id: u32,
    },
    Done {
        finish: Finish,
        reason: FinishReason,
    },
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub struct Running {
    pub id: SeqId,
    pub rx: mpsc::Receiver<Out>,
    pub prompt_tokens: usize,
}

pub struct Generator {
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub context: usize,
    /// Whether the chat template renders `tool_calls` of assistant messages itself.
    template_has_tool_calls: bool,
}

impl Generator {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        scheduler: ActorRef<SchedulerMsg>,
        context: usize,
    ) -> Generator {
        let template_has_tool_calls = tokenizer
            .chat_template()
            .is_some_and(|t| t.contains("tool_calls"));
        Generator {
            tokenizer,
            scheduler,
            context,
            template_has_tool_calls,
        }
    }

    /// Validates, renders and submits; the returned receiver yields the output until `Done` or `Error`.
    /// Dropping it cancels the generation and frees its caches.
    pub async fn start(&self, prompt: Prompt, params: Params) -> Result<Running, ApiError> {
        let ids = match prompt {
            Prompt::Text(t) => {
                if t.is_empty() {
                    return Err(ApiError::bad("`prompt` is empty"));
                }
                let mut ids: Vec<u32> = self.tokenizer.bos.into_iter().collect();
                ids.extend(
                    self.tokenizer
                        .encode(&t)
                        .map_err(|e| ApiError::bad(e.to_string()))?,
                );
                ids
            }
            Prompt::Chat { messages, tools } => {
                let messages = self.check_messages(messages)?;
                let tools = match tools {
                    Some(Value::Array(a)) if a.is_empty() => None,
                    Some(t @ Value::Array(_)) => Some(t),
                    Some(Value::Null) | None => None,
                    Some(_) => return Err(ApiError::bad("`tools` must be an array")),
                };
                let text = self
                    .tokenizer
                    .render_chat(&messages, tools.as_ref())
                    .map_err(|e| ApiError::bad(e.to_string()))?;
                self.tokenizer
                    .encode(&text)
                    .map_err(|e| ApiError::bad(e.to_string()))?
            }
        };
        let room = self.context.saturating_sub(ids.len());
        if room == 0 {
            return Err(ApiError::bad(format!(
                "the prompt is {} tokens; the context is {} tokens",
                ids.len(),
                self.context
            )));
        }
        let max_tokens = match params.max_tokens {
            None => DEFAULT_MAX_TOKENS.min(room),
            Some(n) if n <= 0 => {
                return Err(ApiError::bad(format!(
                    "`max_tokens` must be at least 1, got {n}"
                )));
            }
            Some(n) if n as u64 > room as u64 => {
                return Err(ApiError::bad(format!(
                    "`max_tokens` {n} does not fit: the prompt is {} tokens and the context {} tokens",
                    ids.len(),
                    self.context
                )));
            }
            Some(n) => n as usize,
        };
        let sampling = SamplingParams {
            temperature: params.temperature.unwrap_or(0.0) as f32,
            top_p: params.top_p.unwrap_or(1.0) as f32,
            top_k: 0,
            seed: params.seed,
        };
        if !(0.0..=2.0).contains(&sampling.temperature) {
            return Err(ApiError::bad(format!(
                "`temperature` must be in [0, 2], got {}",
                sampling.temperature
            )));
        }
        sampling
            .validate()
            .map_err(|e| ApiError::bad(e.to_string()))?;
        if params.stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad("`stop` strings must not be empty"));
        }
        if params.stop.len() > 4 {
            return Err(ApiError::bad("at most 4 `stop` strings"));
        }

        let prompt_tokens = ids.len();
        let (events, mut erx) = mpsc::unbounded_channel();
        let submit = Submit {
            prompt: ids,
            max_tokens,
            sampling,
            eos: self.tokenizer.eos.clone(),
            events,
        };
        let id = self
            .scheduler
            .call(|r| SchedulerMsg::Submit(Box::new(submit), r), None)
            .await
            .map_err(|e| ApiError::unavailable(format!("the scheduler is down: {e}")))?;
        let id = match id {
            ractor::rpc::CallResult::Success(id) => id,
            _ => return Err(ApiError::unavailable("the scheduler did not answer")),
        };
        let (tx, rx) = mpsc::channel(64);
        let tok = self.tokenizer.clone();
        let scheduler = self.scheduler.clone();
        let span = tracing::info_span!("generation", seq = id, prompt_tokens, max_tokens);
        tokio::spawn(
            async move {
                let mut text = tok.stream();
                let mut stops = StopMatcher::new(params.stop);
                while let Some(ev) = erx.recv().await {
                    let out = match ev {
                        Event::Token(t) => {
                            let piece = match text.push(t) {
                                Ok(p) => p,
                                Err(e) => {
                                    let _ = tx.send(Out::Error(e.to_string())).await;
                                    break;
                                }
                            };
                            let (emit, stopped) = stops.push(&piece);
                            if stopped {
                                let _ = scheduler.cast(SchedulerMsg::Cancel(id));
                                let _ = tx.send(Out::Token { text: emit, id: t }).await;
                                // The finish as of now: stopped by a stop string.
                                let _ = tx
                                    .send(Out::Done {
                                        finish: stops.finish_now(),
                                        reason: FinishReason::Stop,
                                    })
                                    .await;
                                return;
                            }
                            stops.count_token();
                            Out::Token { text: emit, id: t }
                        }
                        Event::Done(finish) => {
                            let tail = stops.finish(&text.finish());
                            if !tail.is_empty() {
                                let _ = tx
                                    .send(Out::Token {
                                        text: tail,
                                        id: u32::MAX,
                                    })
                                    .await;
                            }
                            tracing::info!(
                                completion_tokens = finish.completion_tokens,
                                ttft_ms = finish.ttft.as_secs_f64() * 1e3,
                                decode_tok_s = finish.decode_tok_s(),
                                "done"
                            );
                            let reason = match finish.stop {
                                StopReason::MaxTokens => FinishReason::Length,
                                _ => FinishReason::Stop,
                            };
                            let _ = tx.send(Out::Done { finish, reason }).await;
                            return;
                        }
                        Event::Error(e) => Out::Error(e),
                    };
                    let is_error = matches!(out, Out::Error(_));
                    if tx.send(out).await.is_err() {
                        // The client went away: stop generating and free the caches.
                        let _ = scheduler.cast(SchedulerMsg::Cancel(id));
                        tracing::info!("client gone, cancelled");
                        return;
                    }
                    if is_error {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Running {
            id,
            rx,
            prompt_tokens,
        })
    }

    pub fn cancel(&self, id: SeqId) {
        let _ = self.scheduler.cast(SchedulerMsg::Cancel(id));
    }

    /// Messages must be a non-empty array of `{role, content}`; assistant tool calls are rendered in Kimi's
    /// format when the template cannot render them itself.
    fn check_messages(&self, messages: Value) -> Result<Value, ApiError> {
        let Value::Array(list) = messages else {
            return Err(ApiError::bad("`messages` must be an array"));
        };
        if list.is_empty() {
            return Err(ApiError::bad("`messages` is empty"));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.into_iter().enumerate() {
            let Value::Object(mut m) = m else {
                return Err(ApiError::bad(format!("messages[{i}] must be an object")));
            };
            match m.get("role").and_then(|r| r.as_str()) {
                Some("system" | "user" | "assistant" | "tool") => {}
                Some(r) => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}].role `{r}` is not system, user, assistant or tool"
                    )));
                }
                None => return Err(ApiError::bad(format!("messages[{i}].role is missing"))),
            }
            let calls = m.get("tool_calls").cloned();
            match (m.get("content"), &calls) {
                (Some(Value::String(_)) | Some(Value::Array(_)), _) => {}
                (None | Some(Value::Null), Some(_)) => {
                    m.insert("content".into(), Value::String(String::new()));
                }
                (None, None) => {
                    return Err(ApiError::bad(format!("messages[{i}].content is missing")));
                }
                (Some(_), _) => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}].content must be a string or an array of parts"
                    )));
                }
            }
            if let (Some(Value::Array(calls)), false) = (&calls, self.template_has_tool_calls) {
                let mut section = String::from(SECTION_BEGIN);
                for c in calls {
                    let id = c.get("id").and_then(|v| v.as_str()).unwrap_or_default();
                    let args = c
                        .pointer("/function/arguments")
                        .and_then(|v| v.as_str())
                        .unwrap_or("{}");
                    section.push_str(&format!("{CALL_BEGIN}{id}{ARG_BEGIN}{args}{CALL_END}"));
                }
                section.push_str(SECTION_END);
                let content = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string();
                m.insert("content".into(), json!(content + &section));
            }
            out.push(Value::Object(m));
        }
        Ok(Value::Array(out))
    }
}

/// Holds back text that may be the start of a stop string; reports the first stop string found.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
    tokens: usize,
    started: std::time::Instant,
    first: Option<std::time::Instant>,
}

impl StopMatcher {
    fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops,
            held: String::new(),
            tokens: 0,
            started: std::time::Instant::now(),
            first: None,
        }
    }

    fn count_token(&mut self) {
        self.tokens += 1;
        self.first.get_or_insert_with(std::time::Instant::now);
    }

    /// Adds text; returns what can be emitted and whether a stop string was hit (text from it on is dropped).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| {
                        self.held.is_char_boundary(self.held.len() - n)
                            && s.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// End of generation: the held text (no stop string completed) plus `tail`.
    fn finish(&mut self, tail: &str) -> String {
        let (mut out, stopped) = self.push(tail);
        if !stopped {
            out.push_str(&std::mem::take(&mut self.held));
        }
        out
    }

    /// A `Finish` for a generation ended by a stop string (the sequence's own report never comes).
    fn finish_now(&self) -> Finish {
        let now = std::time::Instant::now();
        let first = self.first.unwrap_or(now);
        Finish {
            stop: StopReason::Stopped,
            prompt_tokens: 0,
            completion_tokens: self.tokens + 1,
            ttft: first - self.started,
            decode: now - first,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_tokens_are_caught() {
        let mut m = StopMatcher::new(vec!["\n\nKING".into()]);
        let mut out = String::new();
        for t in ["Hello", " world", "\n", "\nKI", "NG.", " more"] {
            let (e, stopped) = m.push(t);
            out.push_str(&e);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "Hello world");
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a E"), ("a ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish("EN"), "EN");
    }
}
