//! Decode and prefill speed against the machine's memory roofline: decode reads every active weight once per
//! token, so `bytes per token × tokens/s` over the read bandwidth says how close to the ceiling it runs.

use crate::error::Result;
use crate::generate::argmax;
use crate::model::Model;
use crate::quant::pool::Pool;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Mean bytes of weights read per decoded token (attention, dense and shared MLPs, router gates, the
    /// experts actually routed to, one embedding row, lm_head).
    pub weight_bytes_per_token: f64,
    /// `weight_bytes_per_token × decode_tok_s`.
    pub weight_gb_s: f64,
    /// Measured in-process: a sum over ≥ 1 GiB on all threads, best of three.
    pub read_bandwidth_gb_s: f64,
    /// `weight_gb_s / read_bandwidth_gb_s`.
    pub roofline_fraction: f64,
}

/// Sums 1 GiB of u64 on every thread of the kernels' pool; returns the best of three passes in GB/s.
pub fn read_bandwidth_gb_s() -> f64 {
    let n = (1usize << 30) / 8;
    // Distinct non-zero values: a zeroed allocation could be backed by one shared zero page.
    let v: Vec<u64> = (1..=n as u64).collect();
    let chunks: Vec<&[u64]> = v.chunks(1 << 16).collect();
    (0..3)
        .map(|_| {
            let total = AtomicU64::new(0);
            let t = Instant::now();
            Pool::global().run(chunks.len(), &|i| {
                let s = chunks[i].iter().fold(0u64, |a, &b| a.wrapping_add(b));
                total.fetch_add(s, Ordering::Relaxed);
            });
            std::hint::black_box(total.load(Ordering::Relaxed));
            (n * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Prefill passes timed; the report gives their median.
const PREFILL_PASSES: usize = 3;

/// Prefills `prompt_tokens` pseudo-random tokens (the median of three passes), then decodes `decode_tokens`
/// greedily, one at a time.
pub fn run(model: &Model, prompt_tokens: usize, decode_tokens: usize) -> Result<BenchReport> {
    let prompt = bench_prompt(prompt_tokens, model.config.vocab_size as u64);
    // Warm-up: first-touch allocations and thread start-up stay out of the timings.
    let mut warm = model.new_cache()?;
    model.step(&prompt[..prompt.len().min(4)], &mut warm, false)?;
    model.step(&prompt[..1], &mut warm, false)?;

    // One prefill takes a fraction of a second: the median of a few, each on an empty cache, steadies it.
    let mut prefills = Vec::with_capacity(PREFILL_PASSES);
    let mut last = None;
    for _ in 0..PREFILL_PASSES {
        let mut cache = model.new_cache()?;
        let t = Instant::now();
        let (logits, _) = model.step(&prompt, &mut cache, false)?;
        prefills.push(t.elapsed().as_secs_f64());
        last = Some((logits, cache));
    }
    let Some((logits, mut cache)) = last else {
        unreachable!("PREFILL_PASSES > 0")
    };
    prefills.sort_by(f64::total_cmp);
    let prefill = prefills[PREFILL_PASSES / 2];
    let mut next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
    let (mut bytes, t) = (0usize, Instant::now());
    for _ in 0..decode_tokens {
        let (logits, b) = model.step(&[next], &mut cache, false)?;
        bytes += b;
        next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
    }
    let decode = t.elapsed().as_secs_f64();
    let decode_tok_s = decode_tokens as f64 / decode.max(1e-9);
    let per_token = bytes as f64 / decode_tokens.max(1) as f64;
    let read_bandwidth_gb_s = read_bandwidth_gb_s();
    let weight_gb_s = per_token * decode_tok_s / 1e9;
    Ok(BenchReport {
        prompt_tokens: prompt.len(),
        decode_tokens,
        prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
        decode_tok_s,
        weight_bytes_per_token: per_token,
        weight_gb_s,
        read_bandwidth_gb_s,
        roofline_fraction: weight_gb_s / read_bandwidth_gb_s,
    })
}

/// Per node, per decoded token.
#[derive(Debug, Clone, Serialize)]
pub struct NodeBench {
    pub node: String,
    pub messages: f64,
    pub bytes: f64,
    /// Time the head waited on this node's link (0 for the head itself).
    pub wait_ms: f64,
    /// Time this node computed.
    pub compute_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterBenchReport {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub nodes: Vec<NodeBench>,
}

/// The same measurement through the actors of a placement: prefill, then greedy decoding one token at a
/// time, with each node's traffic and compute per decoded token.
pub async fn run_cluster(
    rt: &crate::cluster::runtime::Runtime,
    prompt_tokens: usize,
    decode_tokens: usize,
) -> Result<ClusterBenchReport> {
    let prompt = bench_prompt(prompt_tokens, vocab_of(rt));
    rt.step(&[(1, prompt[..prompt.len().min(4)].to_vec())], false)
        .await?;
    rt.release(&[1]).await;
    let t = Instant::now();
    let logits = rt.step(&[(2, prompt.clone())], false).await?;
    let prefill = t.elapsed().as_secs_f64();
    let mut next = argmax(&logits[0]);
    let before = rt.traffic().await;
    let t = Instant::now();
    for _ in 0..decode_tokens {
        let logits = rt.step(&[(2, vec![next])], false).await?;
        next = argmax(&logits[0]);
    }
    let decode = t.elapsed().as_secs_f64();
    let after = rt.traffic().await;
    rt.release(&[2]).await;
    let per = decode_tokens.max(1) as f64;
    let nodes = before
        .iter()
        .zip(&after)
        .map(|(b, a)| NodeBench {
            node: a.node.clone(),
            messages: (a.messages - b.messages) as f64 / per,
            bytes: ((a.bytes_out + a.bytes_in) - (b.bytes_out + b.bytes_in)) as f64 / per,
            wait_ms: (a.wait_ns - b.wait_ns) as f64 / 1e6 / per,
            compute_ms: (a.compute_ns.saturating_sub(b.compute_ns)) as f64 / 1e6 / per,
        })
        .collect();
    Ok(ClusterBenchReport {
        prompt_tokens: prompt.len(),
        decode_tokens,
        prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
        decode_tok_s: decode_tokens as f64 / decode.max(1e-9),
        nodes,
    })
}

fn vocab_of(rt: &crate::cluster::runtime::Runtime) -> u64 {
    crate::config::ModelConfig::load(&rt.plan.nodes[0].model_dir)
        .map_or(1000, |c| c.vocab_size as u64)
}

/// Pseudo-random prompt ids below `vocab`.
fn bench_prompt(n: usize, vocab: u64) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n.max(1))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab) as u32
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ConcurrencyReport {
    pub concurrency: usize,
    pub decode_tokens: usize,
    /// All streams' tokens over the wall time.
    pub total_tok_s: f64,
    /// Mean of each stream's own decode rate.
    pub per_stream_tok_s: f64,
    pub mean_ttft_ms: f64,
}

/// `n` streams at once through the scheduler (continuous batching), each prefilling its own prompt and
/// decoding `decode_tokens` tokens.
pub async fn run_concurrent(
    rt: std::sync::Arc<crate::cluster::runtime::Runtime>,
    n: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
) -> Result<ConcurrencyReport> {
    use crate::cluster::scheduler::{Event, Scheduler, SchedulerArgs, SchedulerMsg, Submit};
    use crate::generate::SamplingParams;
    let vocab = vocab_of(&rt);
    let args = SchedulerArgs {
        runtime: rt,
        prefix_budget: 0,
        kv_bytes_per_token: 1,
        stats: Default::default(),
    };
    let (scheduler, _) = ractor::Actor::spawn(None, Scheduler, args)
        .await
        .map_err(|e| crate::Error::Cluster(format!("starting the scheduler: {e}")))?;
    let t = Instant::now();
    let mut streams = Vec::new();
    for i in 0..n.max(1) {
        let mut prompt = bench_prompt(prompt_tokens + i, vocab);
        prompt.drain(..i); // distinct prompts: no prefix sharing
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Submit {
            prompt,
            max_tokens: decode_tokens.max(1),
            sampling: SamplingParams::default(),
            eos: Vec::new(),
            events,
        };
        scheduler
            .call(|r| SchedulerMsg::Submit(Box::new(req), r), None)
            .await
            .map_err(|e| crate::Error::Cluster(format!("submitting: {e}")))?;
        streams.push(rx);
    }
    let mut finishes = Vec::new();
    for mut rx in streams {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Done(f) => {
                    finishes.push(f);
                    break;
                }
                Event::Error(e) => return Err(crate::Error::Cluster(e)),
                Event::Token(_) => {}
            }
        }
    }
    let wall = t.elapsed().as_secs_f64();
    scheduler.stop(None);
    let k = finishes.len().max(1) as f64;
    Ok(ConcurrencyReport {
        concurrency: n,
        decode_tokens,
        total_tok_s: finishes.iter().map(|f| f.completion_tokens).sum::<usize>() as f64
            / wall.max(1e-9),
        per_stream_tok_s: finishes.iter().map(|f| f.decode_tok_s()).sum::<f64>() / k,
        mean_ttft_ms: finishes
            .iter()
            .map(|f| f.ttft.as_secs_f64() * 1e3)
            .sum::<f64>()
            / k,
    })
}
