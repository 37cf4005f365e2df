//! Multi-head latent attention (MLA), DeepSeek-V3's attention, in the absorbed form throughout:
//! queries are mapped into the latent space through `embed_q`, attend over the cached latents
//! `[latent | k_pe]` as one shared key/value head (MQA), and the output leaves through `unembed_out`.
//! Prefill and decode use the same math. A step of many new tokens of one sequence (a prefill) splits the
//! heads over the kernels' pool and applies `embed_q` and `unembed_out` in f32 from dequantized weights, which
//! on the int8 activation path is the more exact of the two; a step of a few against a long cache (decode)
//! splits the keys.
//!
//! Shapes: `T` tokens in the step (all sequences), `L` tokens of one sequence in the step, `P` already cached,
//! `N = P + L`, `h` heads, `r` = `kv_lora_rank`, `n` = `qk_nope_head_dim`, `e` = `qk_rope_head_dim`, `v` = `v_head_dim`.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::cache::LatentCache;
use crate::model::exp::exp;
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::rope::Rope;
use crate::quant::kernels::Input;
use crate::quant::pool::Pool;
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use std::ops::Range;

/// mlx-lm and HF give the LoRA norms a fixed epsilon, independent of `rms_norm_eps`.
const LORA_NORM_EPS: f32 = 1e-6;

enum QProj {
    Plain(Linear),
    LoRa { a: Linear, norm: RmsNorm, b: Linear },
}

/// Per-head matrices `[h, out, in]` applied head by head: `[h, L, in]` → `[h, L, out]`.
enum HeadLinear {
    Dense(Tensor),
    /// Matrices the engine's kernels read (affine, bf16), all heads in one parallel region.
    Kernel(Vec<Linear>),
}

impl HeadLinear {
    fn from_heads(heads: Vec<Linear>) -> Result<HeadLinear> {
        if !heads.iter().any(|l| matches!(l, Linear::Dense(_))) {
            return Ok(HeadLinear::Kernel(heads));
        }
        let dense: Vec<Tensor> = heads
            .iter()
            .map(|l| {
                Ok(Tensor::from_vec(
                    l.to_f32()?,
                    (l.out_dim(), l.in_dim()),
                    &Device::Cpu,
                )?)
            })
            .collect::<Result<_>>()?;
        Ok(HeadLinear::Dense(Tensor::stack(&dense, 0)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            HeadLinear::Dense(w) => Ok(x.contiguous()?.matmul(&w.transpose(1, 2)?)?),
            HeadLinear::Kernel(heads) => {
                // One copy of all heads' rows in, one tensor out: per-head tensors cost more than a decode
                // step's products on these narrow matrices.
                let (h, l, _) = x.dims3()?;
                if h != heads.len() || h == 0 {
                    return Err(Error::Invalid(format!(
                        "{h} heads of input for {} head matrices",
                        heads.len()
                    )));
                }
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let per = xs.len() / h;
                let items: Vec<(&Linear, Input)> = heads
                    .iter()
                    .zip(xs.chunks_exact(per.max(1)).map(Input::all))
                    .collect();
                let out: Vec<f32> = Linear::apply_many(&items)?.concat();
                let o = heads[0].out_dim();
                Ok(Tensor::from_vec(out, (h, l, o), &Device::Cpu)?)
            }
        }
    }

    /// Heads `heads` as f32 `[hh, out, in]` (dequantized if quantized).
    fn heads_f32(&self, heads: Range<usize>) -> Result<Tensor> {
        match self {
            HeadLinear::Dense(w) => Ok(w.narrow(0, heads.start, heads.len())?),
            HeadLinear::Kernel(all) => {
                let first = all
                    .first()
                    .ok_or_else(|| Error::Invalid("attention has no heads".into()))?;
                let (o, i) = (first.out_dim(), first.in_dim());
                let mut w = vec![0f32; heads.len() * o * i];
                for (l, dst) in all[heads.clone()].iter().zip(w.chunks_exact_mut(o * i)) {
                    l.to_f32_into(dst)?;
                }
                Ok(Tensor::from_vec(w, (heads.len(), o, i), &Device::Cpu)?)
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            HeadLinear::Dense(w) => w.elem_count() * 4,
            HeadLinear::Kernel(heads) => heads.iter().map(|l| l.weight_bytes()).sum(),
        }
    }
}

/// The rows of one sequence in a step's batch, and that sequence's cache for this layer.
pub struct Segment<'a> {
    pub rows: Range<usize>,
    /// How many of its last rows the layer's output keeps: all of them, except in the model's last layer,
    /// which needs only the rows whose logits are wanted (as llama.cpp does). The cache takes every row.
    pub outputs: usize,
    pub cache: &'a mut LatentCache,
}

impl Segment<'_> {
    /// The rows whose outputs are kept.
    fn kept(&self) -> Range<usize> {
        self.rows.end - self.outputs.min(self.rows.len())..self.rows.end
    }
}

pub struct Attention {
    pub layer: usize,
    input_norm: RmsNorm,
    q: QProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    embed_q: HeadLinear,
    unembed_out: HeadLinear,
    o_proj: Linear,
    post_norm: RmsNorm,
    rope: Rope,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    rank: usize,
    scale: f64,
}

impl Attention {
    pub fn load(w: &Weights, layer: usize) -> Result<Attention> {
        let c = &w.config;
        let p = format!("model.layers.{layer}");
        let a = format!("{p}.self_attn");
        let (h, n, e, r, v) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.kv_lora_rank,
            c.v_head_dim,
        );
        let q = match c.q_lora_rank {
            None => QProj::Plain(w.matrix(&format!("{a}.q_proj"), h * (n + e), c.hidden_size)?),
            Some(qr) => QProj::LoRa {
                a: w.matrix(&format!("{a}.q_a_proj"), qr, c.hidden_size)?,
                norm: RmsNorm::load(w, &format!("{a}.q_a_layernorm.weight"), qr, LORA_NORM_EPS)?,
                b: w.matrix(&format!("{a}.q_b_proj"), h * (n + e), qr)?,
            },
        };
        let (embed_q, unembed_out) = load_head_projections(w, &a, c)?;
        Ok(Attention {
            layer,
            input_norm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            q,
            kv_a: w.matrix(&format!("{a}.kv_a_proj_with_mqa"), r + e, c.hidden_size)?,
            kv_norm: RmsNorm::load(w, &format!("{a}.kv_a_layernorm.weight"), r, LORA_NORM_EPS)?,
            embed_q,
            unembed_out,
            o_proj: w.matrix(&format!("{a}.o_proj"), c.hidden_size, h * v)?,
            post_norm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            rope: Rope::new(c),
            heads: h,
            nope: n,
            rope_dim: e,
            rank: r,
            scale: c.attention_scale() as f64,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Plain(l) => l.weight_bytes(),
            QProj::LoRa { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
        };
        q + self.kv_a.weight_bytes()
            + self.embed_q.weight_bytes()
            + self.unembed_out.weight_bytes()
            + self.o_proj.weight_bytes()
    }

    /// `x: [T, hidden]`, the residual stream. Appends each segment's tokens to its cache and returns
    /// `(h, m)` of each segment's kept rows ([`Segment::outputs`], `K` in all): `h = x + attention(input_norm(x))`
    /// and `m = post_attention_norm(h)`, the MLP's input.
    pub fn forward(&self, x: &Tensor, segments: &mut [Segment]) -> Result<(Tensor, Tensor)> {
        let xn = self.input_norm.forward(x)?;
        let kept: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.kept())
            .map(|r| r as u32)
            .collect();
        // Queries, output projection and MLP only for the kept rows; the latents of every row.
        let (x, xq) = if kept.len() == x.dims()[0] {
            (x.clone(), xn.clone())
        } else {
            let n = kept.len();
            let rows = Tensor::from_vec(kept, n, &Device::Cpu)?;
            (x.index_select(&rows, 0)?, xn.index_select(&rows, 0)?)
        };
        // The query and latent projections in one parallel region (one preparation when all rows are kept).
        let (q, kv) = match &self.q {
            QProj::Plain(l) => {
                let mut o = Linear::forward_many(&[(l, &xq), (&self.kv_a, &xn)])?;
                let kv = o.pop();
                (o.pop(), kv)
            }
            QProj::LoRa { a, norm, b } => {
                let mut o = Linear::forward_many(&[(a, &xq), (&self.kv_a, &xn)])?;
                let kv = o.pop();
                let qa = o.pop().ok_or_else(|| {
                    crate::error::Error::Invalid("q_a_proj gave no output".into())
                })?;
                (Some(b.forward(&norm.forward(&qa)?)?), kv)
            }
        };
        let missing = || crate::error::Error::Invalid("projection gave no output".into());
        let (q, kv) = (q.ok_or_else(missing)?, kv.ok_or_else(missing)?); // [K, h·(n+e)], [T, r+e]
        let latent = self.kv_norm.forward(&kv.narrow(1, 0, self.rank)?)?; // [T, r]
        let k_pe = kv.narrow(1, self.rank, self.rope_dim)?; // [T, e]

        let mut outs = Vec::with_capacity(segments.len());
        let mut q_start = 0;
        for seg in segments.iter_mut() {
            let (start, l, k) = (seg.rows.start, seg.rows.len(), seg.kept().len());
            outs.push(self.attend(
                &q.narrow(0, q_start, k)?,
                &latent.narrow(0, start, l)?,
                &k_pe.narrow(0, start, l)?,
                seg.cache,
            )?);
            q_start += k;
        }
        let out = Tensor::cat(&outs, 0)?; // [K, h·v]
        let h = (x + self.o_proj.forward(&out)?)?;
        let m = self.post_norm.forward(&h)?;
        Ok((h, m))
    }

    /// One sequence: `latent: [L, r]`, `k_pe: [L, e]` of its new tokens, `q: [l, h·(n+e)]` of the last `l` of
    /// them → `[l, h·v]`.
    fn attend(
        &self,
        q: &Tensor,
        latent: &Tensor,
        k_pe: &Tensor,
        cache: &mut LatentCache,
    ) -> Result<Tensor> {
        let (h, n, e, r) = (self.heads, self.nope, self.rope_dim, self.rank);
        let new = latent.dims()[0];
        let k_pe = self
            .rope
            .forward(&k_pe.reshape((1, 1, new, e))?, cache.len())?
            .reshape((new, e))?;
        cache.append(&Tensor::cat(&[latent, &k_pe], 1)?)?;
        let kv = cache.view()?; // [N, r+e]
        // From here on, the queries: `l` tokens after `past` keys.
        let l = q.dims()[0];
        let past = cache.len() - l;

        let q = q.reshape((l, h, n + e))?.transpose(0, 1)?; // [h, l, n+e]
        let q_nope = q.narrow(2, 0, n)?; // [h, l, n]
        let q_pe = self
            .rope
            .forward(&q.narrow(2, n, e)?.unsqueeze(0)?, past)?
            .squeeze(0)?; // [h, l, e]

        let values = kv.narrow(1, 0, r)?; // [N, r], rows strided by r+e
        let out = if l < HEADS_ON_POOL {
            let q_lat = self.embed_q.forward(&q_nope)?; // [h, L, r]
            let out_lat = if past + l >= KEYS_ON_POOL {
                let spans = Pool::global().threads();
                core_split_keys(
                    &q_lat,
                    &q_pe,
                    &kv,
                    past,
                    self.scale as f32,
                    spans,
                    in_place(),
                )?
            } else {
                core(&q_lat, &q_pe, &kv, &values, past, self.scale as f32)?
            };
            self.unembed_out.forward(&out_lat)? // [h, L, v]
        } else {
            // Many new tokens: a share of the heads per task on the kernels' pool, with each head's `embed_q`
            // and `unembed_out` dequantized and applied in f32 (against `L` tokens the dequantization is a
            // small cost; the kernels' per-row work on these narrow matrices is not). Several tasks a
            // thread, handed out as threads free up: with one each, a thread waited for the other's last heads.
            let tasks = (HEAD_TASKS_PER_THREAD * Pool::global().threads()).min(h);
            let part = |t: usize| -> Result<Tensor> {
                let heads = h * t / tasks..h * (t + 1) / tasks;
                let (h0, hh) = (heads.start, heads.len());
                let embed_q = self.embed_q.heads_f32(heads.clone())?; // [hh, r, n]
                let q_lat = q_nope
                    .narrow(0, h0, hh)?
                    .matmul(&embed_q.transpose(1, 2)?)?;
                let q_pe = q_pe.narrow(0, h0, hh)?;
                let out_lat = core(&q_lat, &q_pe, &kv, &values, past, self.scale as f32)?;
                let unembed_out = self.unembed_out.heads_f32(heads)?; // [hh, v, r]
                Ok(out_lat.matmul(&unembed_out.transpose(1, 2)?)?) // [hh, L, v]
            };
            let parts = Pool::global().map(tasks, &part);
            Tensor::cat(&parts.into_iter().collect::<Result<Vec<_>>>()?, 0)?
        };
        Ok(out.transpose(0, 1)?.contiguous()?.reshape((l, ()))?)
    }
}

/// Scaled dot-product attention of some heads over the cached latents: `q_lat: [hh, L, r]`,
/// `q_pe: [hh, L, e]`, `kv: [N, r+e]`, `values: [N, r]` (the latent part of `kv`); `past` tokens
/// were cached before these `L` → `[hh, L, r]`. Queries go in blocks of [`QUERY_BLOCK`], each against the
/// keys up to its last position only: a long prefill skips most of the scores the causal mask would zero.
fn core(
    q_lat: &Tensor,
    q_pe: &Tensor,
    kv: &Tensor,
    values: &Tensor,
    past: usize,
    scale: f32,
) -> Result<Tensor> {
    let (hh, l, r) = q_lat.dims3()?;
    let query = Tensor::cat(&[q_lat, q_pe], 2)?; // [hh, L, r+e]
    let mut outs = Vec::with_capacity(l.div_ceil(QUERY_BLOCK));
    for i0 in (0..l).step_by(QUERY_BLOCK) {
        let b = QUERY_BLOCK.min(l - i0);
        // Keys any query of the block sees: those cached before the step and the step's up to the block's end.
        let n = past + i0 + b;
        let q = query
            .narrow(1, i0, b)?
            .contiguous()?
            .reshape((hh * b, ()))?;
        let mut scores = q
            .matmul(&kv.narrow(0, 0, n)?.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?; // [hh·b, n]
        causal_softmax(&mut scores, n, b, past + i0, scale);
        let probs = Tensor::from_vec(scores, (hh * b, n), &Device::Cpu)?;
        outs.push(
            probs
                .matmul(&values.narrow(0, 0, n)?)?
                .reshape((hh, b, r))?,
        );
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// Queries per block of [`core`]. Measured with 8 heads on one thread: at 512 and 2048 new tokens 64 was
/// faster than 32 and 128 (12.3 against 13.5 and 13.3 ms; 147 against 159 and 161 ms).
const QUERY_BLOCK: usize = 64;

/// New tokens of one sequence's step from which the heads' attention runs on the pool (see [`Attention::attend`]).
const HEADS_ON_POOL: usize = 16;

/// Tasks per pool thread for the heads of a step of [`HEADS_ON_POOL`] or more new tokens. Bench model (16
/// heads), f32, 64-token prefill, two threads, one build alternating per pass (20 passes each, medians): one
/// → four a thread -1.5 and -1.8 % of the prefill's time; two -1.1 and -1.3 %, eight (a head a task) +1.0
/// and -0.3 %.
const HEAD_TASKS_PER_THREAD: usize = 4;

/// Keys from which a step of fewer than [`HEADS_ON_POOL`] new tokens splits them over the pool
/// ([`core_split_keys`]). Decode on the bench model after prompts of 64, 192 and 448 tokens (64 decoded, two
/// rounds): the same, +3 %, +5–13 %; after 1024 and 2048 (32 decoded, one round) 70.2 → 80.6 and 57.6 → 71.2
/// tok/s.
const KEYS_ON_POOL: usize = 128;

/// [`core`] with the keys split into `spans` tasks on the kernels' pool, for a few queries against a long
/// cache (a decode step): one gemm over all heads leaves the pool's other threads idle, and with one query
/// per head splitting the heads would leave each task packing the whole cache. Each task takes a span of
/// keys (`in_place`: [`super::span::span`], else candle's gemm): its scores, their largest per query,
/// `exp(score - largest)`, their sum and the sum of the values they weigh; the spans then join, each
/// rescaled by `exp(its largest - the overall largest)`. The values are each key's first `r` floats.
fn core_split_keys(
    q_lat: &Tensor,
    q_pe: &Tensor,
    kv: &Tensor,
    past: usize,
    scale: f32,
    spans: usize,
    in_place: bool,
) -> Result<Tensor> {
    let (hh, l, r) = q_lat.dims3()?;
    let n = kv.dims()[0];
    let rows = hh * l;
    let query = Tensor::cat(&[q_lat, q_pe], 2)?.reshape((rows, ()))?; // [hh·L, r+e]
    let tasks = spans.clamp(1, n.max(1));
    // In place: the cache's floats, read where they lie, and the queries as floats.
    let kv = kv.contiguous()?;
    let storage = in_place.then(|| kv.storage_and_layout());
    let cache = match &storage {
        Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((from, to))) => Some((
                &cpu.as_slice::<f32>()?[from..to],
                query.flatten_all()?.to_vec1::<f32>()?,
            )),
            _ => {
                return Err(Error::Invalid(
                    "the latent cache is not a CPU tensor".into(),
                ));
            }
        },
        None => None,
    };
    let part = |t: usize| -> Result<Span> {
        let keys = n * t / tasks..n * (t + 1) / tasks;
        // Query `row % L` sees the keys up to its own position: of this span, this many.
        let start = keys.start;
        let visible = |row: usize| (past + row % l + 1).saturating_sub(start);
        match &cache {
            #[cfg(target_arch = "x86_64")]
            Some((cache, q)) => {
                let d = q.len() / rows;
                Ok(super::span::span(q, cache, (d, r), keys, visible, scale))
            }
            _ => span_gemm(&query, &kv, r, keys, visible, scale),
        }
    };
    let parts = Pool::global()
        .map(tasks, &part)
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut out = vec![0f32; rows * r];
    for (row, o) in out.chunks_exact_mut(r).enumerate() {
        let largest = parts
            .iter()
            .map(|p| p.largest[row])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for p in &parts {
            if p.largest[row] == f32::NEG_INFINITY {
                continue; // this span holds none of the keys the query sees
            }
            let f = exp(p.largest[row] - largest);
            total += f * p.sums[row];
            for (d, w) in o.iter_mut().zip(&p.weighted[row * r..(row + 1) * r]) {
                *d += f * w;
            }
        }
        for d in o.iter_mut() {
            *d /= total;
        }
    }
    Ok(Tensor::from_vec(out, (hh, l, r), &Device::Cpu)?)
}

/// Whether [`core_split_keys`] reads the cache in place (`span::span`, with AVX-512) rather than through
/// candle's gemm, which packs each span per call. Decode on the bench model (f32), interleaved runs of one
/// build: 48 tokens after a prompt of 2048, three rounds, 59.7–64.3 → 70.8–77.7 tok/s; 64 after 512, two
/// rounds, 89.0–89.8 → 90.8–92.6. Then each block of keys' values weighed right after its scores (one read
/// of the cache instead of two), five rounds after 2048: median 72.0 → 76.4 (70.9–76.5 → 72.2–78.3).
fn in_place() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::span::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One span of [`core_split_keys`], per query row: the weighted sum of the values `[rows, r]`, the largest
/// scaled score and the sum of the weights (`-inf` and 0 where the row sees no key of the span).
pub(super) struct Span {
    pub weighted: Vec<f32>,
    pub largest: Vec<f32>,
    pub sums: Vec<f32>,
}

/// One span with candle's gemm: the scores of keys `keys` of `kv`, then the values they weigh. A row sees the
/// span's first `visible(row)` keys.
fn span_gemm(
    query: &Tensor,
    kv: &Tensor,
    r: usize,
    keys: Range<usize>,
    visible: impl Fn(usize) -> usize,
    scale: f32,
) -> Result<Span> {
    let nk = keys.len();
    let mut scores = query
        .matmul(&kv.narrow(0, keys.start, nk)?.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?; // [rows, nk]
    let rows = scores.len() / nk.max(1);
    let (mut largest, mut sums) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    for (row, s) in scores.chunks_exact_mut(nk).enumerate() {
        let (seen, hidden) = s.split_at_mut(visible(row).min(nk));
        (largest[row], sums[row]) = exp_from_largest(seen, scale);
        hidden.fill(0.0);
    }
    let weights = Tensor::from_vec(scores, (rows, nk), &Device::Cpu)?;
    let weighted = weights
        .matmul(&kv.narrow(0, keys.start, nk)?.narrow(1, 0, r)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Span {
        weighted,
        largest,
        sums,
    })
}

/// Rows of `n` scores `[h·L, N]` → attention probabilities, in place: each score scaled, the keys after a
/// query's position (`past + i` for query `i` of the step) masked out, and a softmax over the rest (the max,
/// `exp(x - max)`, their sum, a division: candle's `softmax_last_dim` after an additive `-inf` mask, with an
/// `exp` within 2 ulp of the standard one).
fn causal_softmax(scores: &mut [f32], n: usize, l: usize, past: usize, scale: f32) {
    for (row, s) in scores.chunks_exact_mut(n).enumerate() {
        let (seen, hidden) = s.split_at_mut((past + row % l + 1).min(n));
        let (_, sum) = exp_from_largest(seen, scale);
        for v in seen.iter_mut() {
            *v /= sum;
        }
        hidden.fill(0.0);
    }
}

/// Scores → `exp(scale·score - largest)` in place; returns `(largest, sum)` (`-inf` and 0 for no scores).
/// Sixteen partial maxima and sums, and [`exp`], so the loops vectorize (`f32::exp` is a call per score).
pub(super) fn exp_from_largest(seen: &mut [f32], scale: f32) -> (f32, f32) {
    let mut maxes = [f32::NEG_INFINITY; 16];
    let mut blocks = seen.chunks_exact_mut(16);
    for block in &mut blocks {
        for (v, m) in block.iter_mut().zip(&mut maxes) {
            *v *= scale;
            *m = m.max(*v);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for v in blocks.into_remainder() {
        *v *= scale;
        max = max.max(*v);
    }
    let max = maxes.iter().fold(max, |a, &b| a.max(b));
    let mut lanes = [0f32; 16];
    let mut blocks = seen.chunks_exact_mut(16);
    for block in &mut blocks {
        for (v, lane) in block.iter_mut().zip(&mut lanes) {
            *v = exp(*v - max);
            *lane += *v;
        }
    }
    let mut sum = 0f32;
    for v in blocks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    (max, sum + lanes.iter().sum::<f32>())
}

/// `embed_q` `[h, r, n]` and `unembed_out` `[h, v, r]`: stored under those names (MLX layout), or cut from
/// HF's `kv_b_proj` `[h·(n+v), r]` (per head: `n` key rows, then `v` value rows).
fn load_head_projections(
    w: &Weights,
    a: &str,
    c: &ModelConfig,
) -> Result<(HeadLinear, HeadLinear)> {
    let (h, n, r, v) = (
        c.num_attention_heads,
        c.qk_nope_head_dim,
        c.kv_lora_rank,
        c.v_head_dim,
    );
    if !w.has(&format!("{a}.kv_b_proj.weight")) {
        let eq = (0..h)
            .map(|i| w.stacked(&format!("{a}.embed_q"), i, h, r, n))
            .collect::<Result<Vec<_>>>()?;
        let uo = (0..h)
            .map(|i| w.stacked(&format!("{a}.unembed_out"), i, h, v, r))
            .collect::<Result<Vec<_>>>()?;
        return Ok((HeadLinear::from_heads(eq)?, HeadLinear::from_heads(uo)?));
    }
    let kv_b = w
        .matrix(&format!("{a}.kv_b_proj"), h * (n + v), r)?
        .to_f32()?;
    let per_head = Tensor::from_vec(kv_b, (h, n + v, r), &Device::Cpu)?;
    let embed_q = per_head.narrow(1, 0, n)?.transpose(1, 2)?.contiguous()?; // [h, r, n]
    let unembed_out = per_head.narrow(1, n, v)?.contiguous()?; // [h, v, r]
    Ok((HeadLinear::Dense(embed_q), HeadLinear::Dense(unembed_out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 613) as f32 / 306.5) - 1.0)
            .collect()
    }

    const SCALE: f32 = 0.3;

    /// `(q_lat [hh, l, r], q_pe [hh, l, e], kv [past + l, r + e])` of fixed pseudo-random values.
    fn inputs(
        hh: usize,
        l: usize,
        past: usize,
        r: usize,
        e: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = past + l;
        Ok((
            Tensor::from_vec(val(hh * l * r, 1), (hh, l, r), &Device::Cpu)?,
            Tensor::from_vec(val(hh * l * e, 2), (hh, l, e), &Device::Cpu)?,
            Tensor::from_vec(val(n * (r + e), 3), (n, r + e), &Device::Cpu)?,
        ))
    }

    /// Every value of `got` within 1e-5 of `want`.
    fn assert_close(got: &Tensor, want: &[f32], what: &str) -> Result<()> {
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5, "{what}, value {i}: {g} against {w}");
        }
        Ok(())
    }

    /// Attention as candle computes it over all the keys: scale, an additive `-inf` causal mask, softmax.
    fn one_masked_pass(
        q_lat: &Tensor,
        q_pe: &Tensor,
        kv: &Tensor,
        values: &Tensor,
        past: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let (hh, l, r) = q_lat.dims3()?;
        let n = kv.dims()[0];
        let query = Tensor::cat(&[q_lat, q_pe], 2)?.reshape((hh * l, ()))?;
        let mut mask = vec![0f32; hh * l * n];
        for (row, keys) in mask.chunks_exact_mut(n).enumerate() {
            keys[past + row % l + 1..].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (hh * l, n), &Device::Cpu)?;
        let scores = ((query.matmul(&kv.t()?)? * scale as f64)? + mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(values)?.reshape((hh, l, r))?;
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Queries in blocks (here 64 + 64 + 22, after 0 or 10 cached tokens) give what one pass over all the keys
    /// with candle's scale, `-inf` mask and softmax gives.
    #[test]
    fn blocks_of_queries_match_one_masked_pass() -> Result<()> {
        let (hh, l, r, e) = (2, 150, 16, 8);
        assert!(l > 2 * QUERY_BLOCK && !l.is_multiple_of(QUERY_BLOCK));
        for past in [0, 10] {
            let (q_lat, q_pe, kv) = inputs(hh, l, past, r, e)?;
            let values = kv.narrow(1, 0, r)?.contiguous()?;
            let got = core(&q_lat, &q_pe, &kv, &values, past, SCALE)?;
            let want = one_masked_pass(&q_lat, &q_pe, &kv, &values, past, SCALE)?;
            assert_close(&got, &want, &format!("past {past}"))?;
        }
        Ok(())
    }

    /// Keys split into spans give what one masked pass gives: one query per head (decode), and several new
    /// tokens whose first ones see none of the last span's keys.
    #[test]
    fn keys_in_spans_match_one_masked_pass() -> Result<()> {
        let (hh, r, e) = (3, 16, 8);
        for (l, past, spans) in [(1, 300, 2), (1, 37, 3), (5, 0, 2), (4, 9, 5), (2, 130, 1)] {
            let (q_lat, q_pe, kv) = inputs(hh, l, past, r, e)?;
            let values = kv.narrow(1, 0, r)?;
            let want = one_masked_pass(&q_lat, &q_pe, &kv, &values, past, SCALE)?;
            for in_place in [false, in_place()] {
                let got = core_split_keys(&q_lat, &q_pe, &kv, past, SCALE, spans, in_place)?;
                let what = format!("l {l}, past {past}, {spans} spans, in place {in_place}");
                assert_close(&got, &want, &what)?;
            }
        }
        Ok(())
    }

    /// The fused mask and softmax match candle's scale, additive `-inf` mask and `softmax_last_dim` (within the
    /// few ulp of our `exp`; masked keys exactly 0).
    #[test]
    fn causal_softmax_equals_scale_mask_and_candle_softmax() -> Result<()> {
        // Rows of 1 to 46 keys: blocks of sixteen and remainders.
        for (h, l, past) in [(3, 5, 0), (2, 4, 7), (4, 1, 9), (2, 6, 40), (1, 20, 0)] {
            let n = past + l;
            let scores: Vec<f32> = (0..h * l * n)
                .map(|i| ((i * 7919 % 613) as f32 / 61.3) - 5.0)
                .collect();
            let scale = 0.37f32;
            let mut mask = vec![0f32; h * l * n];
            for (row, keys) in mask.chunks_exact_mut(n).enumerate() {
                keys[past + row % l + 1..].fill(f32::NEG_INFINITY);
            }
            let t = Tensor::from_vec(scores.clone(), (h * l, n), &Device::Cpu)?;
            let m = Tensor::from_vec(mask, (h * l, n), &Device::Cpu)?;
            let want = candle_nn::ops::softmax_last_dim(&((t * scale as f64)? + m)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut got = scores;
            causal_softmax(&mut got, n, l, past, scale);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w.abs() && (*w == 0.0) == (*g == 0.0),
                    "h {h} l {l} past {past}: {g} against {w}"
                );
            }
        }
        Ok(())
    }
}
