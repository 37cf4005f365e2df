//! The token loop on the head. The `Scheduler` holds the live sequences and runs one forward step per
//! iteration over all of them (new sequences prefill while others decode: continuous batching). Each request
//! has a `Sequence` actor: its sampler, its stop rules and its client's event stream.
//!
//! Finished sequences keep their latent KV cache in a prompt-prefix cache bounded by a memory budget: a new
//! prompt that starts with cached tokens (the history of a multi-turn chat) starts from a copy of them and
//! prefills only the rest.

use super::runtime::Runtime;
use super::units::SeqId;
use crate::generate::{Sampler, SamplingParams, StopReason};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Counters for the page and `/metrics`.
#[derive(Default, Debug)]
pub struct SchedulerStats {
    pub live: AtomicU64,
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Prompt tokens served from the prefix cache instead of prefilled.
    pub prefix_tokens: AtomicU64,
    pub prefix_cached_bytes: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens produced per second over recent steps (an f32 in the low bits).
    pub tok_s: AtomicU64,
}

impl SchedulerStats {
    pub fn tok_s(&self) -> f64 {
        f32::from_bits(self.tok_s.load(Ordering::Relaxed) as u32) as f64
    }
}

pub struct SchedulerArgs {
    pub runtime: Arc<Runtime>,
    /// Bytes of cached KV the prefix cache may keep.
    pub prefix_budget: u64,
    /// Bytes of latent KV one token takes across all layers.
    pub kv_bytes_per_token: u64,
    pub stats: Arc<SchedulerStats>,
}

/// Prompts must share at least this many tokens with a cached sequence to reuse it.
const MIN_PREFIX: usize = 4;

struct Retained {
    id: SeqId,
    tokens: Vec<u32>,
    used: u64,
}

/// Finished sequences whose caches are kept, least recently used first out.
struct PrefixCache {
    entries: Vec<Retained>,
    budget: u64,
    per_token: u64,
    tick: u64,
}

impl PrefixCache {
    fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.tokens.len() as u64 * self.per_token)
            .sum()
    }

    /// The cached sequence sharing the longest prefix with `prompt`, and that length (at most all but the
    /// last prompt token, which must be fed to get logits).
    fn lookup(&mut self, prompt: &[u32]) -> Option<(SeqId, usize)> {
        self.tick += 1;
        let limit = prompt.len().saturating_sub(1);
        let (i, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    i,
                    e.tokens
                        .iter()
                        .zip(prompt)
                        .take(limit)
                        .take_while(|(a, b)| a == b)
                        .count(),
                )
            })
            .max_by_key(|&(_, n)| n)?;
        if len < MIN_PREFIX {
            return None;
        }
        self.entries[i].used = self.tick;
        Some((self.entries[i].id, len))
    }

    /// Keeps a finished sequence; returns the sequences to release (evicted, or this one if it cannot fit).
    fn insert(&mut self, id: SeqId, tokens: Vec<u32>) -> Vec<SeqId> {
        self.tick += 1;
        if tokens.len() as u64 * self.per_token > self.budget || tokens.len() < MIN_PREFIX {
            return vec![id];
        }
        self.entries.push(Retained {
            id,
            tokens,
            used: self.tick,
        });
        let mut out = Vec::new();
        while self.bytes() > self.budget {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .unwrap_or((0, &self.entries[0]));
            out.push(self.entries.remove(i).id);
        }
        out
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
    /// Tokens already in the caches.
    fed: Vec<u32>,
}

pub struct Scheduler;

pub struct SchedulerState {
    runtime: Arc<Runtime>,
    live: Vec<Live>,
    next: SeqId,
    ticking: bool,
    prefix: PrefixCache,
    stats: Arc<SchedulerStats>,
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        a: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SchedulerState {
            runtime: a.runtime,
            live: Vec::new(),
            next: 1,
            ticking: false,
            prefix: PrefixCache {
                entries: Vec::new(),
                budget: a.prefix_budget,
                per_token: a.kv_bytes_per_token.max(1),
                tick: 0,
            },
            stats: a.stats,
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
                let mut fed = Vec::new();
                if let Some((from, len)) = st.prefix.lookup(&req.prompt) {
                    match st.runtime.fork(from, id, len).await {
                        Ok(()) => {
                            fed = req.prompt[..len].to_vec();
                            st.stats
                                .prefix_tokens
                                .fetch_add(len as u64, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "reusing a cached prefix"),
                    }
                }
                let pending = req.prompt[fed.len()..].to_vec();
                st.stats.requests.fetch_add(1, Ordering::Relaxed);
                st.stats
                    .prompt_tokens
                    .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
                let (actor, _) = Actor::spawn(None, Sequence, *req).await?;
                st.live.push(Live {
                    id,
                    actor,
                    pending,
                    fed,
                });
                st.stats.live.store(st.live.len() as u64, Ordering::Relaxed);
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
                    st.stats.live.store(st.live.len() as u64, Ordering::Relaxed);
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
    let t = Instant::now();
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
            st.stats.live.store(0, Ordering::Relaxed);
            return;
        }
    };
    let mut finished = Vec::new();
    let mut produced = 0u64;
    for (l, row) in st.live.iter_mut().zip(logits) {
        let fed = std::mem::take(&mut l.pending);
        l.fed.extend(fed);
        let next = l.actor.call(|r| SequenceMsg::Logits(row, r), None).await;
        match next {
            Ok(ractor::rpc::CallResult::Success(Some(tok))) => {
                l.pending = vec![tok];
                produced += 1;
            }
            Ok(ractor::rpc::CallResult::Success(None)) => {
                produced += 1;
                finished.push(l.id);
            }
            _ => finished.push(l.id),
        }
    }
    st.stats.steps.fetch_add(1, Ordering::Relaxed);
    st.stats
        .completion_tokens
        .fetch_add(produced, Ordering::Relaxed);
    let rate = produced as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let old = st.stats.tok_s();
    let smoothed = if old == 0.0 {
        rate
    } else {
        0.8 * old + 0.2 * rate
    };
    st.stats
        .tok_s
        .store((smoothed as f32).to_bits() as u64, Ordering::Relaxed);
    if !finished.is_empty() {
        let mut release = Vec::new();
        st.live.retain_mut(|l| {
            if !finished.contains(&l.id) {
                return true;
            }
            l.actor.stop(None);
            release.extend(st.prefix.insert(l.id, std::mem::take(&mut l.fed)));
            false
        });
        if !release.is_empty() {
            st.runtime.release(&release).await;
        }
        st.stats
            .prefix_cached_bytes
            .store(st.prefix.bytes(), Ordering::Relaxed);
        st.stats.live.store(st.live.len() as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(budget_tokens: u64) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            budget: budget_tokens * 10,
            per_token: 10,
            tick: 0,
        }
    }

    #[test]
    fn longest_shared_prefix_wins_and_keeps_a_token_to_feed() {
        let mut c = cache(100);
        assert!(c.insert(1, vec![1, 2, 3, 4, 5, 6]).is_empty());
        assert!(c.insert(2, vec![1, 2, 3, 4, 9, 9, 9]).is_empty());
        assert_eq!(c.lookup(&[1, 2, 3, 4, 9, 9, 7]), Some((2, 6)));
        // The whole prompt is cached: all but the last token are reused.
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6]), Some((1, 5)));
        assert_eq!(c.lookup(&[1, 2, 3, 8]), None, "below the minimum prefix");
    }

    #[test]
    fn the_budget_evicts_least_recently_used() {
        let mut c = cache(12);
        assert!(c.insert(1, vec![1; 6]).is_empty());
        assert!(c.insert(2, vec![2; 6]).is_empty());
        c.lookup(&[1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(c.insert(3, vec![3; 6]), vec![2]);
        assert_eq!(
            c.insert(4, vec![4; 20]),
            vec![4],
            "larger than the whole budget"
        );
        assert_eq!(c.bytes(), 120);
    }
}
