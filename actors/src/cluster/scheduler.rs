//! The token loop on the head. The `Scheduler` holds the live sequences and runs one forward step per
//! iteration over all of them (new sequences prefill while others decode: continuous batching). Each request
//! has a `Sequence` actor: its sampler, its stop rules and its client's event stream.

use super::runtime::Runtime;
use super::units::SeqId;
use crate::generate::{Sampler, SamplingParams, StopReason};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

/// A generation request.
pub struct Submit {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops at any of these (not emitted).
    pub eos: Vec<u32>,
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Done(Finish),
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Submit → first token.
    pub ttft: Duration,
    /// First token → last token.
    pub decode: Duration,
}

impl Finish {
    pub fn decode_tok_s(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }

    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64().max(1e-9)
    }
}

pub enum SchedulerMsg {
    Submit(Box<Submit>, RpcReplyPort<SeqId>),
    /// The client went away or asked to stop: drop the sequence and free its caches.
    Cancel(SeqId),
    /// Run one step over the live sequences.
    Tick,
}
impl ractor::Message for SchedulerMsg {}

struct Live {
    id: SeqId,
    actor: ActorRef<SequenceMsg>,
    /// Tokens to feed at the next step (the prompt, then the last sampled token).
    pending: Vec<u32>,
}

pub struct Scheduler;

pub struct SchedulerState {
    runtime: Arc<Runtime>,
    live: Vec<Live>,
    next: SeqId,
    ticking: bool,
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = Arc<Runtime>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        runtime: Arc<Runtime>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SchedulerState {
            runtime,
            live: Vec::new(),
            next: 1,
            ticking: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit(req, reply) => {
                let id = st.next;
                st.next += 1;
                let pending = req.prompt.clone();
                let (actor, _) = Actor::spawn(None, Sequence, *req).await?;
                st.live.push(Live { id, actor, pending });
                let _ = reply.send(id);
                if !st.ticking {
                    st.ticking = true;
                    myself.cast(SchedulerMsg::Tick)?;
                }
            }
            SchedulerMsg::Cancel(id) => {
                if let Some(i) = st.live.iter().position(|l| l.id == id) {
                    let l = st.live.remove(i);
                    l.actor.stop(None);
                    st.runtime.release(&[id]).await;
                }
            }
            SchedulerMsg::Tick => {
                if st.live.is_empty() {
                    st.ticking = false;
                    return Ok(());
                }
                let span = tracing::debug_span!("tick", live = st.live.len());
                step(st).instrument(span).await;
                myself.cast(SchedulerMsg::Tick)?;
            }
        }
        Ok(())
    }
}

async fn step(st: &mut SchedulerState) {
    let batch: Vec<(SeqId, Vec<u32>)> = st.live.iter().map(|l| (l.id, l.pending.clone())).collect();
    let logits = match st.runtime.step(&batch, false).await {
        Ok(l) => l,
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(error = %message, "step failed");
            let ids: Vec<SeqId> = st.live.iter().map(|l| l.id).collect();
            for l in st.live.drain(..) {
                let _ = l.actor.cast(SequenceMsg::Fail(message.clone()));
            }
            st.runtime.release(&ids).await;
            return;
        }
    };
    let mut finished = Vec::new();
    for (l, row) in st.live.iter_mut().zip(logits) {
        let next = l.actor.call(|r| SequenceMsg::Logits(row, r), None).await;
        match next {
            Ok(ractor::rpc::CallResult::Success(Some(tok))) => l.pending = vec![tok],
            _ => finished.push(l.id),
        }
    }
    if !finished.is_empty() {
        st.live.retain(|l| {
            let done = finished.contains(&l.id);
            if done {
                l.actor.stop(None);
            }
            !done
        });
        st.runtime.release(&finished).await;
    }
}

pub enum SequenceMsg {
    /// The logits after the sequence's last token → the next token to feed, or `None` when it is done.
    Logits(Vec<f32>, RpcReplyPort<Option<u32>>),
    Fail(String),
}
impl ractor::Message for SequenceMsg {}

pub struct Sequence;

pub struct SequenceState {
    req: Submit,
    sampler: Sampler,
    generated: usize,
    started: Instant,
    first: Option<Instant>,
}

impl SequenceState {
    fn finish(&self, stop: StopReason) -> Finish {
        let now = Instant::now();
        Finish {
            stop,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.generated,
            ttft: self.first.unwrap_or(now) - self.started,
            decode: now - self.first.unwrap_or(now),
        }
    }
}

impl Actor for Sequence {
    type Msg = SequenceMsg;
    type State = SequenceState;
    type Arguments = Submit;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        req: Submit,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SequenceState {
            sampler: Sampler::new(req.sampling.clone()),
            req,
            generated: 0,
            started: Instant::now(),
            first: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SequenceMsg::Logits(row, reply) => {
                let tok = st.sampler.sample(&row);
                if st.first.is_none() {
                    st.first = Some(Instant::now());
                }
                let next = if st.req.eos.contains(&tok) {
                    let _ = st.req.events.send(Event::Done(st.finish(StopReason::Eos)));
                    None
                } else {
                    st.generated += 1;
                    if st.req.events.send(Event::Token(tok)).is_err() {
                        None // the client is gone
                    } else if st.generated >= st.req.max_tokens {
                        let _ = st
                            .req
                            .events
                            .send(Event::Done(st.finish(StopReason::MaxTokens)));
                        None
                    } else {
                        Some(tok)
                    }
                };
                let _ = reply.send(next);
            }
            SequenceMsg::Fail(message) => {
                let _ = st.req.events.send(Event::Error(message));
            }
        }
        Ok(())
    }
}
