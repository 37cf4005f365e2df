//! Matrix kernels over MLX affine weights, `y[t, rows] = x[t, cols] · Wᵀ`, multi-threaded on the engine's
//! [`Pool`] and vectorized with the best instruction set found at run time (AVX-512 + VNNI, AVX2 + FMA,
//! NEON), with a scalar reference that every vector path is tested against.
//!
//! - **4-bit** rows are unpacked in registers. The codes of each chunk (`min(group, 64)` codes, half as many
//!   bytes) come out as the low nibbles (even codes) then the high nibbles (odd codes), so the activations are
//!   permuted once per call to that order. Several tokens on AVX-512 (int8, groups of 64 or 128, columns a
//!   multiple of 256) also have their chunks' blocks transposed per [`UNIT`] ([`transpose_units`]).
//! - **8-bit** rows are their own codes. **2- and 3-bit** rows are widened to 4-bit rows (64-bit word
//!   arithmetic; AVX-512 VBMI where present) and take the 4-bit kernels, where they are not stored in lanes
//!   (below). **5- and 6-bit** rows are widened to a byte per code, where they are not stored in lanes.
//!
//! - **The 4-bit rows the model applies whole** (MLPs, attention projections, `lm_head`) on AVX-512 + VNNI
//!   (int8 activations; f32 ones as three int8 slices), **2- and 8-bit** ones, and **3-, 5- and 6-bit** ones
//!   with VBMI: the rows are stored at load in the rows-in-lanes order ([`AffineMatrix::lanes`],
//!   [`lanes_codes`]; still `bits` bits a code), and every token count, one included, takes that kernel with
//!   no tile to build.
//! - **Twelve or more f32 tokens** on AVX-512 where the rows-in-lanes kernel does not take them (with AMX,
//!   groups of 32, widened 2- and 3-bit rows): rows are dequantized once into a per-thread tile
//!   ([`Dots::f32_tiles`]) instead of being unpacked again for every block of tokens; blocks of four tokens
//!   meet it with plain FMAs, and from 48 tokens sixteen tokens per register of activations transposed once
//!   per call ([`Prepared::xt`]).
//! - **Five or more f32 tokens** against rows not stored in lanes, where the CPU has AMX tiles with bf16
//!   products ([`Isa::Amx`]): the codes and the activations, split into three bf16 parts each so that every
//!   product is exact, meet in tile products (`amx`).
//!
//! Two activation paths:
//! - **f32**: codes × f32 activations, exact up to summation order. One token of 4-bit (or widened 2-/3-bit)
//!   rows in groups of 64 or 128 on AVX-512 + VNNI, any number against rows stored in lanes, and twelve or
//!   more against 4-bit-order rows without AMX, take the integer kernels instead, with the activations split
//!   into three int8 slices (steps 128² apart, see [`EXACT_RESIDUAL`]) that hold each value within
//!   2⁻²² of its group's largest: as close as f32 sums get, for 9 instead of 12 vector operations per 64 codes;
//! - **int8**: activations quantized per weight group (step `max|x| / 127`), integer dot products
//!   (u8 codes × i8, VNNI `vpdpbusd` where present), `scale·dx` applied per group, and the bias term
//!   `bias · Σx` from the exact f32 sums — llama.cpp's Q4_1 × Q8_1 scheme — plus a second int8 pass over the
//!   quantization residual (256× finer steps), folded into the same integer group sum. One int8 pass alone
//!   moved the tiny fixtures' logits by up to 1.0; with the residual they stay within 0.05 of the oracle.
//!
//! [`matmul_many`] runs several matrices (all heads of a layer, all experts a token uses) in one parallel
//! region of the kernels' [`Pool`].

mod aligned;
#[cfg(target_arch = "x86_64")]
mod amx;
mod lookahead;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::lane_sums16;

use crate::quant::affine::{AffineMatrix, widen, widened_len};
use crate::quant::bf16::Bf16Matrix;
use crate::quant::pool::Pool;
use aligned::Aligned;
use std::sync::OnceLock;

/// How activations meet the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// f32 activations: exact.
    #[default]
    F32,
    /// int8 activations per group: fast.
    Int8,
}

/// The vector instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 plus AMX tiles (bf16 products) for f32 activations of several tokens.
    Amx,
    Neon,
}

impl Isa {
    /// The best set this CPU supports; `KIMI_ISA=scalar|avx2|avx512` narrows it (for comparisons).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("KIMI_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if matches!(best, Isa::Avx2 | Isa::Avx512 | Isa::Amx) => Isa::Avx2,
                Some("avx512") if best == Isa::Amx => Isa::Avx512,
                _ => best,
            }
        })
    }

    /// Every set this CPU supports, scalar first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        match Isa::best() {
            Isa::Avx512 => v.extend([Isa::Avx2, Isa::Avx512]),
            Isa::Amx => v.extend([Isa::Avx2, Isa::Avx512, Isa::Amx]),
            Isa::Scalar => {}
            other => v.push(other),
        }
        v
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if amx::available() {
                return Isa::Amx;
            }
            if x86::has_avx512() {
                return Isa::Avx512;
            }
            if x86::has_avx2() {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Isa::Neon;
        }
        #[allow(unreachable_code)]
        Isa::Scalar
    }
}

/// Codes per unpack chunk: the low nibbles of a chunk's bytes are its even codes, the high nibbles its odd.
fn chunk4(group: usize) -> usize {
    group.min(64)
}

/// The ratio of the coarse to the fine int8 step: the residual of the coarse quantization (at most half a
/// coarse step) spans ±128 fine steps, clamped to ±127 (one fine step off at worst). A power of two, so
/// the kernels fold the coarse and the fine sums with a shift.
pub(crate) const RESIDUAL: i32 = 256;

/// The ratio of each step to the next in the three int8 slices of f32 activations (see [`Q8::s`]): the
/// residual of a slice, at most half its step, spans ±64 steps of the next, so no slice is clamped.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const EXACT_RESIDUAL: i32 = 128;

/// One token's int8 activations: `x ≈ dx · (RESIDUAL·q + r)` per group.
#[derive(Clone, Copy)]
pub(crate) struct Q8<'a> {
    pub q: &'a [i8],
    pub r: &'a [i8],
    /// Empty on the int8 path. For f32 activations on AVX-512 + VNNI, the residual of `r`: then
    /// `x ≈ dx · (EXACT_RESIDUAL²·q + EXACT_RESIDUAL·r + s)`, within `dx / 2` (2⁻²² of the group's `max|x|`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub s: &'a [i8],
    /// Whether `q` and `r` are in [`transpose_units`] order.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub units: bool,
}

/// Codes per unit of the AVX-512 several-token int8 kernel: four 64-code chunks.
pub(crate) const UNIT: usize = 256;

/// Each [`UNIT`] of `v` (four 64-code chunks of four 16-code blocks) with its blocks transposed:
/// block `j` of chunk `i` moves to block `i` of chunk `j`. The AVX-512 several-token kernel loads the
/// weights of four chunks in that order, so one register of integer sums holds four lanes per chunk and
/// one conversion and one multiply-add serve four chunks.
fn transpose_units(v: &mut [i8]) {
    let mut unit = [0i8; UNIT];
    for u in v.chunks_exact_mut(UNIT) {
        unit.copy_from_slice(u);
        for (i, chunk) in unit.chunks_exact(64).enumerate() {
            for (j, block) in chunk.chunks_exact(16).enumerate() {
                u[64 * j + 16 * i..][..16].copy_from_slice(block);
            }
        }
    }
}

/// Activations of one matrix call, permuted to the code order and (int8 path) quantized.
struct Prepared {
    tokens: usize,
    cols: usize,
    group: usize,
    /// `[t, cols]`, permuted.
    xf: Aligned<f32>,
    /// `[t, cols]`, permuted; int8 path only: `x ≈ dx · (256·xq + xr)`.
    xq: Aligned<i8>,
    /// The residual `x - 256·dx·xq`, in steps of `dx`.
    xr: Aligned<i8>,
    /// Empty, or the third int8 slice of f32 activations ([`Q8::s`]).
    xs: Aligned<i8>,
    /// Whether `xq` and `xr` are in [`transpose_units`] order.
    units: bool,
    /// Per (token, group): the fine int8 step `dx` (a 256th of the coarse one) and the exact `Σx`.
    dx: Vec<f32>,
    xsum: Vec<f32>,
    /// The f32 activations `xf` of the whole sixteens of tokens transposed for the AVX-512 tiles, in blocks of
    /// [`XT_BLOCK`] tokens (the last one 16 wide when 16 are left): block `b` is `[cols, width]`. Empty
    /// elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    xt: Aligned<f32>,
    /// The f32 activations as AMX `B` tiles (`amx::prepare`), where `Isa::Amx` takes them. Empty elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    xb: Aligned<u32>,
    /// `[t, 2, xl_stride(cols)]`: each token's coarse int8 codes, then its residual ones (`[t, 3, ..]`: f32
    /// activations' three slices, [`Q8::s`] last), in nibble order (never in units order), each slice padded
    /// to [`xl_stride`], where the AVX-512 kernels with rows in lanes take them (`x86::int8_lanes`,
    /// `x86::lanes_stored`). Empty elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    xl: Aligned<i8>,
}

/// Bytes from one slice of a token's codes to the next in [`Prepared::xl`]: `cols` and one cache line. The
/// rows-in-lanes kernel reads up to 24 slices at once (three of eight tokens); `cols` apart, a multiple of
/// 4096 bytes, they would all fall in one set of L1 (eight ways) and evict each other.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn xl_stride(cols: usize) -> usize {
    cols + 64
}

/// Tokens per block of [`Prepared::xt`]: two 512-bit registers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const XT_BLOCK: usize = 32;

impl Prepared {
    /// Int8 slices per token in [`Prepared::xl`]: three for f32 activations, two for int8 ones (0: none).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn xl_slices(&self) -> usize {
        self.xl.len() / (self.tokens * xl_stride(self.cols)).max(1)
    }

    /// `group` and `nibbles` as in [`Weight::prep_key`]; `units`: int8 activations over 4-bit-order rows in
    /// groups of 64 or more go in [`transpose_units`] order, where the columns allow.
    #[inline(always)]
    fn new(
        x: &[f32],
        cols: usize,
        (group, nibbles, act): (usize, bool, Activations),
        units: bool,
    ) -> Prepared {
        let xsum: Vec<f32> = x.chunks_exact(group).map(lane_sum).collect();
        let xf = if nibbles {
            let c = chunk4(group);
            let mut p = Aligned::zeroed(x.len());
            for (src, dst) in x.chunks_exact(c).zip(p.chunks_exact_mut(c)) {
                for k in 0..c / 2 {
                    dst[k] = src[2 * k];
                    dst[c / 2 + k] = src[2 * k + 1];
                }
            }
            p
        } else {
            Aligned::from_slice(x)
        };
        let (mut xq, mut xr, mut dx) = (Aligned::zeroed(0), Aligned::zeroed(0), Vec::new());
        if act == Activations::Int8 {
            xq = Aligned::zeroed(xf.len());
            xr = Aligned::zeroed(xf.len());
            dx = Vec::with_capacity(xsum.len());
            let groups = xf
                .chunks_exact(group)
                .zip(xq.chunks_exact_mut(group))
                .zip(xr.chunks_exact_mut(group));
            for ((src, q), r) in groups {
                let amax = lane_max_abs(src);
                let coarse = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                let fine = coarse / RESIDUAL as f32;
                let (inv_c, inv_f) = (1.0 / coarse, 1.0 / fine);
                for ((qi, ri), v) in q.iter_mut().zip(r.iter_mut()).zip(src) {
                    let hi = round_small((v * inv_c).clamp(-127.0, 127.0));
                    *qi = hi as i8;
                    *ri =
                        round_small(((v - hi as f32 * coarse) * inv_f).clamp(-127.0, 127.0)) as i8;
                }
                dx.push(fine);
            }
        }
        let tokens = x.len() / cols;
        let units = units
            && !xq.is_empty()
            && nibbles
            && group.is_multiple_of(64)
            && cols.is_multiple_of(UNIT);
        if units {
            transpose_units(&mut xq);
            transpose_units(&mut xr);
        }
        Prepared {
            tokens,
            cols,
            group,
            xf,
            xq,
            xr,
            xs: Aligned::zeroed(0),
            units,
            dx,
            xsum,
            xt: Aligned::zeroed(0),
            xb: Aligned::zeroed(0),
            xl: Aligned::zeroed(0),
        }
    }

    /// The tokens [`Prepared::xt`] holds: the whole sixteens.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn tiled(&self) -> usize {
        self.xt.len() / self.cols
    }

    /// Token block `b` of [`Prepared::xt`]: its first token, its width (32 or 16) and its `[cols, width]` values.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn xt_block(&self, b: usize) -> (usize, usize, &[f32]) {
        let t0 = b * XT_BLOCK;
        let width = (self.tiled() - t0).min(XT_BLOCK);
        (t0, width, &self.xt[t0 * self.cols..][..width * self.cols])
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2²²`: adding 1.5·2²³ leaves the rounded
/// value in the low mantissa bits. Unlike `round_ties_even() as i32` it vectorizes.
#[inline(always)]
fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// `Σ c` in sixteen lanes, so it vectorizes.
#[inline(always)]
fn lane_sum(c: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = c.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for v in chunks {
        for i in 0..16 {
            lanes[i] += v[i];
        }
    }
    lane_total(&lanes) + tail
}

/// The sixteen lanes of [`lane_sum`], added in order.
#[inline(always)]
fn lane_total(lanes: &[f32; 16]) -> f32 {
    lanes.iter().sum::<f32>()
}

/// `max |c|` in sixteen lanes (a group of int8 activations: a multiple of 32 long).
#[inline(always)]
fn lane_max_abs(c: &[f32]) -> f32 {
    debug_assert!(c.len().is_multiple_of(16));
    let mut lanes = [0f32; 16];
    for v in c.chunks_exact(16) {
        for i in 0..16 {
            lanes[i] = lanes[i].max(v[i].abs());
        }
    }
    lanes.iter().fold(0f32, |a, &b| a.max(b))
}

impl Prepared {
    #[inline(always)]
    fn xf_of(&self, t: usize) -> &[f32] {
        &self.xf[t * self.cols..(t + 1) * self.cols]
    }

    #[inline(always)]
    fn xq_of(&self, t: usize) -> Q8<'_> {
        let r = t * self.cols..(t + 1) * self.cols;
        Q8 {
            q: &self.xq[r.clone()],
            r: &self.xr[r.clone()],
            s: self.xs.get(r).unwrap_or_default(),
            units: self.units,
        }
    }

    #[inline(always)]
    fn dx_of(&self, t: usize) -> &[f32] {
        let gpr = self.cols / self.group;
        &self.dx[t * gpr..(t + 1) * gpr]
    }

    #[inline(always)]
    fn xsum_of(&self, t: usize) -> &[f32] {
        let gpr = self.cols / self.group;
        &self.xsum[t * gpr..(t + 1) * gpr]
    }
}

/// A matrix the kernels read.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    Affine(&'a AffineMatrix),
    Bf16(&'a Bf16Matrix),
}

impl Weight<'_> {
    fn rows(&self) -> usize {
        match self {
            Weight::Affine(m) => m.rows,
            Weight::Bf16(m) => m.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Weight::Affine(m) => m.cols,
            Weight::Bf16(m) => m.cols,
        }
    }

    fn row_bytes(&self) -> usize {
        match self {
            Weight::Affine(m) => m.row_bytes(),
            Weight::Bf16(m) => m.row_bytes(),
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Weight::Affine(m) => m.weight_bytes(),
            Weight::Bf16(m) => m.weight_bytes(),
        }
    }

    /// What the prepared activations depend on: group size, 4-bit permutation, activation path; whether
    /// the rows are 4-bit as stored, which one token's int8 slices on AVX-512 meet in unit order (2- and
    /// 3-bit rows, widened on every read, keep the four-row kernel); and whether they are stored in lanes
    /// ([`AffineMatrix::lanes`]), which takes every token's codes in nibble order.
    fn prep_key(&self) -> PrepKey {
        match self {
            Weight::Affine(m) => (
                m.group,
                m.bits <= 4 || m.lanes,
                m.activations,
                m.bits == 4,
                m.lanes,
            ),
            Weight::Bf16(m) => (m.cols, false, Activations::F32, false, false),
        }
    }
}

/// See [`Weight::prep_key`].
type PrepKey = (usize, bool, Activations, bool, bool);

/// The input of a call: `x: [t, cols]`, or rows `pick` of it (each expert's tokens of a prefill, which then
/// share one preparation of `x` where the kernel reads picked rows: 4-bit rows stored in lanes).
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub x: &'a [f32],
    pub pick: Option<&'a [u32]>,
}

impl<'a> Input<'a> {
    /// All of `x`, in order.
    pub fn all(x: &'a [f32]) -> Input<'a> {
        Input { x, pick: None }
    }

    /// The call's token count, `x` having `cols` columns.
    pub fn tokens(&self, cols: usize) -> usize {
        self.pick.map_or(self.x.len() / cols.max(1), <[u32]>::len)
    }

    /// The picked rows copied out (all of `x`, borrowed, where none are picked). Panics on a pick past
    /// `x`'s rows: callers check their picks.
    pub fn gather(&self, cols: usize) -> std::borrow::Cow<'a, [f32]> {
        match self.pick {
            None => std::borrow::Cow::Borrowed(self.x),
            Some(pick) => {
                let mut rows = Vec::with_capacity(pick.len() * cols);
                for &t in pick {
                    rows.extend_from_slice(&self.x[t as usize * cols..][..cols]);
                }
                std::borrow::Cow::Owned(rows)
            }
        }
    }
}

/// One matrix application of a [`matmul_many`] call: `y[t, rows] = x[t, cols] · Wᵀ`.
pub struct Job<'a> {
    pub w: Weight<'a>,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
}

/// Output rows of one job, shared by the tasks that write disjoint rows of it.
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (distinct weight rows) of each output; the region ends before the
// outputs are read.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// Weights per task, at most. Large tasks amortize scheduling and the prefetches that run past a task's last
/// row (48 → 384 KB raised decode from ~64 to ~71 tokens/s, int8, bench model, 2 cores; 768 KB was slower).
const TASK_BYTES: usize = 384 << 10;
/// Tasks per pool thread, at least, where a call's weights allow: a lone matrix still spreads over many cores.
const TASKS_PER_THREAD: usize = 4;
/// [`TASKS_PER_THREAD`] for calls of several tokens, whose tasks cost more per byte: a region ends when its last
/// task does, and the other threads wait for it. Bench model, f32, 64-token prefill, two threads, one build
/// alternating per pass (20 passes each, medians): 4 → 16 took 220.5 → 216.3, 216.2 → 210.9 and 210.1 → 207.0
/// ms; 8, 32, 64 and 128 took -0.8, -3.3 / -0.8, -1.2 / -1.6 and +0.7 / -0.3 %.
const MANY_TOKEN_TASKS_PER_THREAD: usize = 16;
/// Below this many weight bytes in a call, threads cost more than they save.
const PARALLEL_BYTES: usize = 96 << 10;

/// `y = x · Wᵀ` with the detected instruction set.
pub fn affine_matmul(m: &AffineMatrix, x: &[f32], y: &mut [f32]) {
    matmul_many(
        Isa::detect(),
        &mut [Job {
            w: Weight::Affine(m),
            x,
            y,
        }],
    )
}

/// The same with an explicit instruction set and activation path (tests, benchmarks).
pub fn affine_matmul_isa(isa: Isa, m: &AffineMatrix, x: &[f32], y: &mut [f32], act: Activations) {
    let mut mm = m.clone();
    mm.activations = act;
    matmul_many(
        isa,
        &mut [Job {
            w: Weight::Affine(&mm),
            x,
            y,
        }],
    )
}

/// Runs every job, splitting all their rows into one set of parallel tasks (each task writes every output of
/// its rows, as [`matmul_new`] needs).
pub fn matmul_many(isa: Isa, jobs: &mut [Job]) {
    let calls: Vec<(Weight, Input)> = jobs.iter().map(|j| (j.w, Input::all(j.x))).collect();
    let outs: Vec<Out> = jobs
        .iter_mut()
        .map(|j| Out {
            ptr: j.y.as_mut_ptr(),
            len: j.y.len(),
        })
        .collect();
    run_calls(isa, &calls, &outs);
}

/// [`matmul_many`] into new outputs `[t_i, rows_i]`, uninitialized: each task writes its own rows (zeroing them
/// first where its kernel adds), where zeroed allocations would be a sequential pass over all of them (~7 MB a
/// layer in a 64-token prefill of the bench model).
pub fn matmul_new(isa: Isa, calls: &[(Weight, Input)]) -> Vec<Vec<f32>> {
    let mut ys: Vec<Vec<std::mem::MaybeUninit<f32>>> = calls
        .iter()
        .map(|(w, x)| {
            let len = x.tokens(w.cols()) * w.rows();
            let mut y = Vec::with_capacity(len);
            // SAFETY: `MaybeUninit` needs no initialization.
            unsafe { y.set_len(len) };
            y
        })
        .collect();
    let outs: Vec<Out> = ys
        .iter_mut()
        .map(|y| Out {
            ptr: y.as_mut_ptr().cast(),
            len: y.len(),
        })
        .collect();
    run_calls(isa, calls, &outs);
    ys.into_iter()
        .map(|y| {
            let mut y = std::mem::ManuallyDrop::new(y);
            // SAFETY: `run_calls` returned (a panicking task would have unwound past here), so its tasks
            // wrote every row of every output; `MaybeUninit<f32>` has `f32`'s layout.
            unsafe { Vec::from_raw_parts(y.as_mut_ptr().cast::<f32>(), y.len(), y.capacity()) }
        })
        .collect()
}

/// The work of [`matmul_many`]: `calls[i] = (W, x)` into `outs[i]`, all rows of all calls in one set of
/// tasks, each writing every output of its rows.
fn run_calls(isa: Isa, calls: &[(Weight, Input)], outs: &[Out]) {
    // Calls that share an input (gate and up of one expert, q_a and kv_a; every expert of a prefill, where
    // the kernel reads picked rows) share its preparation.
    let key = |c: &(Weight, Input)| {
        let own = c.1.pick.filter(|_| !picks_rows(isa, c.0));
        (
            c.1.x.as_ptr(),
            c.1.x.len(),
            own.map(|p| (p.as_ptr(), p.len())),
            c.0.prep_key(),
        )
    };
    let mut firsts: Vec<usize> = Vec::with_capacity(calls.len());
    let mut which: Vec<usize> = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        let found = firsts.iter().position(|&f| key(&calls[f]) == key(c));
        which.push(found.unwrap_or_else(|| {
            firsts.push(i);
            firsts.len() - 1
        }));
    }
    // The kernels read picked rows without bounds checks.
    for (w, x) in calls {
        let rows = x.x.len() / w.cols().max(1);
        assert!(
            x.pick
                .is_none_or(|p| p.iter().all(|&t| (t as usize) < rows)),
            "a call picks a row past its input's {rows}"
        );
    }
    let prepared = prepare_all(isa, calls, &firsts);
    debug_assert!(
        calls
            .iter()
            .zip(outs)
            .all(|((w, x), out)| out.len == x.tokens(w.cols()) * w.rows())
    );
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    let mut total = 0;
    let weights: usize = calls.iter().map(|(w, _)| w.weight_bytes()).sum();
    let per_thread = if calls.iter().any(|(w, x)| x.tokens(w.cols()) > 1) {
        MANY_TOKEN_TASKS_PER_THREAD
    } else {
        TASKS_PER_THREAD
    };
    let task_bytes =
        (weights / (Pool::global().threads() * per_thread)).clamp(16 << 10, TASK_BYTES);
    for (ci, (w, x)) in calls.iter().enumerate() {
        // Whole blocks of four rows (the one-token kernels' passes), so each row's arithmetic, and its result
        // to the bit, does not depend on how a call is split.
        // Rows stored in lanes: whole blocks of sixteen.
        let whole = match w {
            Weight::Affine(m) if m.lanes => 16,
            _ => 4,
        };
        let per = (task_bytes / w.row_bytes().max(1))
            .next_multiple_of(whole)
            .clamp(whole, w.rows().max(whole));
        for r0 in (0..w.rows()).step_by(per) {
            tasks.push((ci, r0, (r0 + per).min(w.rows())));
        }
        total += w.weight_bytes() * x.tokens(w.cols()).max(1);
    }
    let run = |&(ci, r0, r1): &(usize, usize, usize)| {
        let ((w, x), out) = (calls[ci], &outs[ci]);
        let px = &prepared[which[ci]];
        match (w, x.pick) {
            // SAFETY: `picks_rows`: rows stored in lanes, which `lanes_apply` allows only where the CPU has
            // AVX-512 + VNNI; `px` prepares all of `x`, and the tasks start at whole blocks of sixteen rows.
            #[cfg(target_arch = "x86_64")]
            (Weight::Affine(m), Some(pick)) if picks_rows(isa, w) => unsafe {
                x86::lanes_stored(m, px, Some(pick), out, r0..r1)
            },
            _ => {
                let rows = w.rows();
                // The rows-in-lanes kernel stores every output of its rows (whole blocks of sixteen, every
                // token, `x86::lanes_pass`); the others are zeroed first, whichever of them may add to an output.
                if !matches!(w, Weight::Affine(m) if m.lanes) {
                    for t in 0..out.len / rows.max(1) {
                        debug_assert!(t * rows + r1 <= out.len);
                        // SAFETY: in bounds; rows `r0..r1` of the output belong to this task alone.
                        unsafe { std::ptr::write_bytes(out.ptr.add(t * rows + r0), 0, r1 - r0) };
                    }
                }
                run_rows(isa, w, px, out, r0, r1)
            }
        }
    };
    let weights: Vec<Weight> = calls.iter().map(|c| c.0).collect();
    let successor = lookahead::record(&weights);
    if total < PARALLEL_BYTES {
        tasks.iter().for_each(run);
    } else {
        Pool::global().run(tasks.len(), &|i| run(&tasks[i]));
    }
    if let Some(ranges) = successor {
        Pool::global().prefetch(ranges);
    }
}

/// Whether the kernel of `w` reads a call's picked rows from a preparation of its whole input: 4-bit rows
/// stored in lanes, whose preparation ([`x86::Laned::Only`]) holds each token's slices alone and does not
/// depend on how many tokens there are. Other calls prepare their picked rows, copied out.
fn picks_rows(isa: Isa, w: Weight) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Amx) && matches!(w, Weight::Affine(m) if m.lanes)
}

/// Activation values below which the preparations run on the calling thread (a decode step's).
const PARALLEL_PREPARE: usize = 1 << 16;

/// The preparations of the inputs of `calls[firsts[i]]` (their picked rows, where the kernel does not pick
/// them), in parallel when there are many (a prefill's experts).
fn prepare_all(isa: Isa, calls: &[(Weight, Input)], firsts: &[usize]) -> Vec<Prepared> {
    let one = |f: usize| {
        let (w, x) = calls[f];
        let x = if picks_rows(isa, w) {
            std::borrow::Cow::Borrowed(x.x)
        } else {
            x.gather(w.cols())
        };
        prepare(isa, &x, w.cols(), w.prep_key())
    };
    let values = |f: usize| match calls[f] {
        (w, x) if picks_rows(isa, w) => x.x.len(),
        (w, x) => x.tokens(w.cols()) * w.cols(),
    };
    if firsts.iter().map(|&f| values(f)).sum::<usize>() < PARALLEL_PREPARE {
        return firsts.iter().map(|&f| one(f)).collect();
    }
    Pool::global().map(firsts.len(), &|i| one(firsts[i]))
}

type Scratch = (Vec<u8>, Vec<f32>, Vec<f32>);

thread_local! {
    /// Per-thread row buffers: unpacked codes, scales, biases.
    static SCRATCH: std::cell::Cell<Scratch> = const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// The dot products of one instruction set, over one row and one token.
trait Dots {
    /// Packed 4-bit row × permuted f32 activations.
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32;
    /// Packed 4-bit row × permuted int8 activations.
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32;
    /// Byte codes × f32 activations.
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32;
    /// Byte codes × int8 activations.
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32;
    /// bf16 row (little-endian bytes) × f32 activations.
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32;

    /// [`Dots::dot_bf16`] for `N` tokens at once (each weight is widened once for all of them).
    #[inline(always)]
    fn dot_bf16_xn<const N: usize>(row: &[u8], x: [&[f32]; N]) -> [f32; N] {
        std::array::from_fn(|t| Self::dot_bf16(row, x[t]))
    }

    /// [`Dots::dot_bf16_xn`] for four rows at once (each activation is loaded once for all of them), each
    /// row's sums the same as alone.
    #[inline(always)]
    fn dot_bf16_rows4_xn<const N: usize>(rows: [&[u8]; 4], x: [&[f32]; N]) -> [[f32; N]; 4] {
        std::array::from_fn(|r| Self::dot_bf16_xn(rows[r], x))
    }

    /// A 2/3/5/6-bit row in the form this set's kernels read (see [`widen`]), at the start of `out` (`cols`
    /// bytes); returns its length.
    #[inline(always)]
    fn widen(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
        widen_into(packed, bits, out)
    }

    /// [`Dots::dot4_i8`] for `N` tokens at once (the row is unpacked once for all of them); the bias term
    /// is the caller's, as for [`Dots::dot_i8_xn`].
    #[inline(always)]
    fn dot4_i8_xn<const N: usize>(
        row: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        std::array::from_fn(|i| Self::dot4_i8(row, xq[i], scales, dx[i], group))
    }

    /// Tokens `tokens` against rows `rows` of 4-bit (or widened) matrix `m`, all in one call, where this set
    /// has a kernel for that case (it then stores the outputs and returns true).
    #[inline(always)]
    fn rows_xn(
        _m: &AffineMatrix,
        _px: &Prepared,
        _out: &Out,
        _rows: std::ops::Range<usize>,
        _tokens: std::ops::Range<usize>,
    ) -> bool {
        false
    }

    /// f32 activations of [`TILE_TOKENS`] or more tokens against rows `rows` of 4-bit (or widened) matrix
    /// `m`, through rows dequantized once, where this set has a kernel for it: it stores the outputs of tokens
    /// from the first and returns how many (0: none).
    #[inline(always)]
    fn f32_tiles(
        _m: &AffineMatrix,
        _px: &Prepared,
        _out: &Out,
        _rows: std::ops::Range<usize>,
    ) -> usize {
        0
    }

    /// int8 activations of [`LANE_TOKENS`] or more tokens, or f32 ones of [`TILE_TOKENS`] or more as three
    /// int8 slices (`f32_lanes`), against rows `rows` of 4-bit matrix `m` in the MLX layout, sixteen rows per
    /// register, where this set has a kernel for it: it stores the outputs of the tokens from the first and
    /// returns how many (0: none).
    #[inline(always)]
    fn int8_lanes(
        _m: &AffineMatrix,
        _px: &Prepared,
        _out: &Out,
        _rows: std::ops::Range<usize>,
    ) -> usize {
        0
    }

    /// int8 (or f32, as three int8 slices) activations of any number of tokens against rows `rows` (whole
    /// blocks of sixteen from the first) of a matrix stored in lanes ([`AffineMatrix::lanes`]); false where
    /// this set has no kernel for it.
    #[inline(always)]
    fn lanes_stored(
        _m: &AffineMatrix,
        _px: &Prepared,
        _out: &Out,
        _rows: std::ops::Range<usize>,
    ) -> bool {
        false
    }

    /// [`Dots::dot_f32`] for `N` tokens at once.
    #[inline(always)]
    fn dot_f32_xn<const N: usize>(
        codes: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        std::array::from_fn(|i| Self::dot_f32(codes, x[i], scales, group))
    }

    /// [`Dots::dot_i8`] for `N` tokens at once (without the bias term).
    #[inline(always)]
    fn dot_i8_xn<const N: usize>(
        codes: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        std::array::from_fn(|i| Self::dot_i8(codes, xq[i], scales, dx[i], group))
    }

    /// [`Dots::dot4_f32`] for `N` tokens at once.
    #[inline(always)]
    fn dot4_f32_xn<const N: usize>(
        row: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        std::array::from_fn(|i| Self::dot4_f32(row, x[i], scales, group))
    }

    /// [`Dots::dot4_i8`] of four rows against one token (decode): the activations are read once for all.
    /// `stream`: the rows are the matrix's own, one after another (not widened copies), so a kernel may fetch
    /// the bytes that follow them ahead.
    #[inline(always)]
    fn dot4_i8_rows4(
        rows: [&[u8]; 4],
        xq: Q8,
        scales: [&[f32]; 4],
        dx: &[f32],
        group: usize,
        _stream: bool,
    ) -> [f32; 4] {
        std::array::from_fn(|i| Self::dot4_i8(rows[i], xq, scales[i], dx, group))
    }

    /// [`Dots::dot4_f32`] of four rows against one token; `stream` as in [`Dots::dot4_i8_rows4`].
    #[inline(always)]
    fn dot4_f32_rows4(
        rows: [&[u8]; 4],
        x: &[f32],
        scales: [&[f32]; 4],
        group: usize,
        _stream: bool,
    ) -> [f32; 4] {
        std::array::from_fn(|i| Self::dot4_f32(rows[i], x, scales[i], group))
    }
}

fn run_rows(isa: Isa, w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    match isa {
        // SAFETY: `Isa::detect`/`available` only offer sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx => unsafe { x86::run_rows_avx512(w, px, out, r0, r1) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::run_rows_avx2(w, px, out, r0, r1) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::run_rows_neon(w, px, out, r0, r1) },
        _ => rows::<scalar::Scalar>(w, px, out, r0, r1),
    }
}

fn prepare(isa: Isa, x: &[f32], cols: usize, key: PrepKey) -> Prepared {
    let (group, nibbles, act, packed4, lanes) = key;
    let base = (group, nibbles, act);
    // Int8 slices in unit order (where the columns allow) for several tokens, and for one against 4-bit
    // rows: the several-token kernel's two rows per pass there need ~0.75 of the four-row kernel's time
    // (one 768×2048 matrix in L2, one thread, f32 and int8).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let units = (x.len() / cols >= 2 || packed4) && !lanes;
    // f32 activations for the rows-in-lanes kernels: stored in lanes, or built per call (`f32_lanes`).
    #[cfg(target_arch = "x86_64")]
    let f32_laned =
        act == Activations::F32 && (lanes || f32_lanes(isa, x.len() / cols, packed4, group));
    match isa {
        // SAFETY: as in `run_rows`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if act == Activations::Int8 && group.is_multiple_of(64) => unsafe {
            x86::prepare_int8_avx512(
                x,
                cols,
                group,
                nibbles,
                units,
                false,
                x86::Laned::of(lanes, packed4 && x.len() / cols >= LANE_TOKENS),
            )
        },
        // f32 activations of fewer tokens than the tiles take against 4-bit-order rows, of more against 4-bit
        // rows (without AMX), or any number against rows stored in lanes: three int8 slices, as exact as f32
        // and fewer instructions per code than unpacking the codes to f32.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx
            if nibbles
                && act == Activations::F32
                && (f32_laned || exact_slices(isa, x.len() / cols, cols, group)) =>
        unsafe {
            x86::prepare_int8_avx512(
                x,
                cols,
                group,
                nibbles,
                units && !f32_laned,
                true,
                x86::Laned::of(lanes, f32_laned),
            )
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Amx
            if nibbles
                && act == Activations::F32
                && matches!(group, 64 | 128)
                && x.len() >= AMX_TOKENS * cols =>
        {
            // f32 activations of several tokens against 4-bit-order rows: the AMX tiles take all of them.
            let mut px = unsafe { x86::prepare_avx2(x, cols, base, false) };
            px.xb = unsafe { amx::prepare(&px.xf, px.tokens, cols) };
            px
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx => {
            let mut px = unsafe { x86::prepare_avx2(x, cols, base, false) };
            // f32 activations of enough tokens for the tiles (see `affine_rows`), 4-bit-order rows in the
            // groups the tiles take.
            if nibbles
                && act == Activations::F32
                && px.tokens >= LANE_TILE_TOKENS
                && matches!(group, 64 | 128)
            {
                let tokens = px.tokens / 16 * 16;
                px.xt = unsafe { x86::transpose_tokens(&px.xf[..tokens * cols], tokens, cols) };
            }
            px
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::prepare_avx2(x, cols, base, false) },
        _ => Prepared::new(x, cols, base, false),
    }
}

/// Whether `tokens` f32 tokens of `cols` columns in groups of `group` take the three int8 slices: one token in
/// groups of a multiple of 64; fewer than the tiles take in whole units ([`UNIT`]) of groups of 64 or 128.
#[cfg(target_arch = "x86_64")]
fn exact_slices(isa: Isa, tokens: usize, cols: usize, group: usize) -> bool {
    let tiles = if isa == Isa::Amx {
        AMX_TOKENS
    } else {
        TILE_TOKENS
    };
    match tokens {
        1 => group.is_multiple_of(64),
        _ => (2..tiles).contains(&tokens) && cols.is_multiple_of(UNIT) && matches!(group, 64 | 128),
    }
}

/// Whether `tokens` f32 tokens against 4-bit rows in the MLX layout take the rows-in-lanes kernel
/// (`x86::int8_lanes`, its tile built per call) as three int8 slices: [`TILE_TOKENS`] or more, groups of a
/// multiple of 64, AVX-512 + VNNI without AMX (whose tiles take them). Against the f32 tiles, two threads, µs
/// per call: sixteen 768×2048 matrices in turn at 12, 16, 32 and 64 tokens 314–335 → 230–240, 363–378 →
/// 307–309, 641–716 → 466–527, 1090–1108 → 883–986; one 2048×2048 at 64 tokens 3235–3529 → 2604–2899. Below
/// twelve the unit-order kernel is faster (at 11 tokens 213–217 against 250–259).
#[cfg(target_arch = "x86_64")]
fn f32_lanes(isa: Isa, tokens: usize, packed4: bool, group: usize) -> bool {
    isa == Isa::Avx512 && packed4 && group.is_multiple_of(64) && tokens >= TILE_TOKENS
}

/// [`widen`] into the start of `out`; returns the bytes written.
#[inline(always)]
fn widen_into(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
    let len = widened_len(packed.len() * 8 / bits as usize, bits);
    widen(packed, bits, &mut out[..len]);
    len
}

/// The row loop, instantiated once per instruction set inside a `target_feature` function so that the
/// glue (scale conversion, bias term) is compiled for that set too.
#[inline(always)]
fn rows<K: Dots>(w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    match w {
        Weight::Affine(m) => affine_rows::<K>(m, px, out, r0, r1),
        Weight::Bf16(m) => {
            // Balanced blocks of at most six tokens (as the f32 affine rows), rows inside.
            let blocks = px.tokens.div_ceil(6);
            for b in 0..blocks {
                let (t0, t1) = (px.tokens * b / blocks, px.tokens * (b + 1) / blocks);
                // No closures here: they would not inherit the caller's `target_feature`.
                match t1 - t0 {
                    1 => bf16_pass::<K, 1>(m, px, out, r0..r1, t0),
                    2 => bf16_pass::<K, 2>(m, px, out, r0..r1, t0),
                    3 => bf16_pass::<K, 3>(m, px, out, r0..r1, t0),
                    4 => bf16_pass::<K, 4>(m, px, out, r0..r1, t0),
                    5 => bf16_pass::<K, 5>(m, px, out, r0..r1, t0),
                    _ => bf16_pass::<K, 6>(m, px, out, r0..r1, t0),
                }
            }
        }
    }
}

/// Tokens `t0..t0 + N` against bf16 rows `rows`.
#[inline(always)]
fn bf16_pass<K: Dots, const N: usize>(
    m: &Bf16Matrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    t0: usize,
) {
    let rb = m.row_bytes();
    let row = |r: usize| &m.data[r * rb..(r + 1) * rb];
    let x: [&[f32]; N] = std::array::from_fn(|t| px.xf_of(t0 + t));
    let mut r = rows.start;
    // Four rows at a time: alone, each row streams all `N` tokens' activations, more than L1 holds.
    while r + 4 <= rows.end {
        let dots = K::dot_bf16_rows4_xn([row(r), row(r + 1), row(r + 2), row(r + 3)], x);
        for (i, d) in dots.iter().enumerate() {
            for (t, d) in d.iter().enumerate() {
                store(out, m.rows, r + i, t0 + t, *d);
            }
        }
        r += 4;
    }
    for r in r..rows.end {
        let dots = K::dot_bf16_xn(row(r), x);
        for (t, d) in dots.into_iter().enumerate() {
            store(out, m.rows, r, t0 + t, d);
        }
    }
}

/// f32 tokens per call from which rows are dequantized once for all of them ([`Dots::f32_tiles`]) rather than
/// unpacked in registers for every block of tokens. Measured on 768×2048, 2048×768 and 2048×2048 matrices
/// (two threads): at 8 and 10 tokens the register kernel is 8–15 % faster, at 12 the tiles are 2–4 % faster.
const TILE_TOKENS: usize = 12;

/// int8 tokens per call from which the AVX-512 kernel with rows in lanes (`x86::int8_lanes`) takes them all.
/// Measured with two threads against the unit-order kernel: 2048×2048 at 64 tokens 149 → 172 GMAC/s, 32
/// tokens +10 %, 16 the same; 2048×768 at 16 tokens +13–25 %, at 12 +4–15 %; 768×2048 at 8 tokens 20 %
/// slower, at 12–16 the same (a Xeon VM, one matrix called again and again, whose rows then sit in the other
/// core's L2 half the time). On an EPYC VM, sixteen matrices in turn, two threads, µs per call, rows in
/// lanes against unit order: 2048×2048 at 16 tokens 579–611 against 481–522 (15 % slower), at 32 the same,
/// at 64 1661–1681 against 1778–1862; 768×2048 at 16 tokens 215 against 178. The crossover depends on the
/// CPU; sixteen stays.
#[cfg(target_arch = "x86_64")]
const LANE_TOKENS: usize = 16;

/// Whether the loader stores `m`'s rows in lanes ([`AffineMatrix::lanes`]): 2-, 4- and 8-bit rows in groups
/// of a multiple of 64 on a CPU with AVX-512 + VNNI (3-, 5- and 6-bit ones with VBMI too), for int8
/// activations and for f32 ones (three int8 slices). The rows-in-lanes kernel then takes all of its tokens,
/// from one (decode) up, with no tile to build per call.
/// 2- and 3-bit rows had been widened per call (bench shape, `synth --bits B`, EPYC, f32, three interleaved
/// rounds, medians): 3-bit decode 70.8 → 100.2 tok/s, a 64-token prefill 182.2 → 250.4; int8 86.8 → 127.2
/// and 260.4 → 365.5; 2-bit 74.9 → 119.6 and 222.4 → 279.7, and with four words to 64 bytes (no VBMI) instead
/// of a pair to 32 (unpacked as 3-bit pairs are) 118.4 → 154.4 and 272.0 → 328.0. 5-, 6- and 8-bit rows had
/// been read by the byte-code kernels a row at a time (same VM, three rounds, f32): 6-bit decode 35.9 → 63.9,
/// prefill 68.6 → 236.1; 5-bit 40.7 → 80.9 and 76.8 → 225.7; 8-bit 52.2 → 56.1 and 101.2 → 259.2.
/// With AMX too, whose tiles read the MLX layout: on a Xeon VM with AMX (bench model, f32, interleaved runs
/// against the AMX tiles for five or more tokens), decode of 300 tokens 77.9–78.2 → 81.6–83.5 tok/s, a
/// 64-token prefill 258.6–260.9 → 266.2–276.4, a 2048-token one the same (229.2 → 228.5).
pub fn lanes_apply(m: &AffineMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    let bits = matches!(m.bits, 2 | 4 | 8) || (matches!(m.bits, 3 | 5 | 6) && x86::has_vbmi());
    #[cfg(not(target_arch = "x86_64"))]
    let bits = matches!(m.bits, 2 | 4 | 8);
    bits && m.group.is_multiple_of(64)
        && m.cols.is_multiple_of(m.group)
        && matches!(Isa::detect(), Isa::Avx512 | Isa::Amx)
}

/// Bytes of `m`'s codes and of its scales (or biases) stored in lanes ([`lanes_codes`], [`lanes_scales`]).
pub fn lanes_sizes(m: &AffineMatrix) -> (usize, usize) {
    let blocks = m.rows.div_ceil(16);
    (
        blocks * 2 * m.bits as usize * m.cols,
        blocks * 16 * m.groups_per_row() * m.scale_type.size(),
    )
}

/// The column of code `j` of a row in nibble order (the order the int8 activations are prepared in): per 64
/// codes, the 32 even columns, then the 32 odd ones.
fn nibble_column(j: usize) -> usize {
    let (c, o) = (j / 64, j % 64);
    64 * c + if o < 32 { 2 * o } else { 2 * (o - 32) + 1 }
}

/// `m`'s codes in the order of [`AffineMatrix::lanes`] into `dst` ([`lanes_sizes`]): rows in blocks of sixteen
/// (the last padded with zero rows), each block's 4-code words in nibble order ([`nibble_column`]):
/// - 2 and 4 bits: per `8 / bits` words, 64 bytes, row `k`'s in bytes `4k..4k + 4`, byte `j` holding code `j`
///   of each of the words, word `i` at bits `bits·i` (one shift and one AND apart);
/// - 3 bits: per pair of words, 48 bytes, row `k`'s eight codes (the first word's, then the second's) one
///   after another from bit 0 of bytes `3k..3k + 3`;
/// - 5, 6 and 8 bits: per word, `8·bits` bytes, row `k`'s four codes one after another from bit `4·bits·k`
///   (8 bits: bytes `4k..4k + 4`, as a 4-bit pair's words once unpacked).
pub fn lanes_codes(m: &AffineMatrix, dst: &mut [u8]) {
    debug_assert!(matches!(m.bits, 2..=6 | 8) && m.cols.is_multiple_of(64));
    debug_assert_eq!(dst.len(), lanes_sizes(m).0);
    // The last block, whose padding rows the conversions do not write.
    let last = dst.len().saturating_sub(2 * m.bits as usize * m.cols);
    dst[last..].fill(0);
    match m.bits {
        2 => lanes_codes2(m, dst),
        3 => lanes_codes3(m, dst),
        4 => lanes_codes4(m, dst),
        5 => lanes_codes_wide::<5>(m, dst),
        6 => lanes_codes_wide::<6>(m, dst),
        _ => lanes_codes_wide::<8>(m, dst),
    }
}

/// [`lanes_codes`] for 2-bit rows, from the packed rows: the words of a 64-code chunk ([`nibble_column`]) are
/// the even codes of its four runs of sixteen (4 bytes each; words `2t`, `2t + 1` from run `t`), then the odd
/// ones (words `8 + 2t`, `9 + 2t`).
fn lanes_codes2(m: &AffineMatrix, dst: &mut [u8]) {
    let (cols, rb) = (m.cols, m.row_bytes());
    // A word's four codes (8 bits) to bits 0..2 of four bytes.
    let spread = |w: u32| (w & 0x3) | (w & 0xc) << 6 | (w & 0x30) << 12 | (w & 0xc0) << 18;
    for (r, row) in m.packed.chunks_exact(rb).enumerate() {
        let (b, k) = (r / 16, r % 16);
        let block = &mut dst[b * 4 * cols..(b + 1) * 4 * cols];
        for (chunk, quads) in row.chunks_exact(16).zip(block.chunks_exact_mut(256)) {
            // Two words per 16 bits: the even codes of the four runs, then their odd codes.
            let mut pairs = [0u32; 8];
            for (t, run) in chunk.chunks_exact(4).enumerate() {
                let run = u32::from_le_bytes([run[0], run[1], run[2], run[3]]) as u64;
                pairs[t] = even_codes::<2, 16>(run) as u32;
                pairs[4 + t] = even_codes::<2, 16>(run >> 2) as u32;
            }
            for (q, quad) in quads.chunks_exact_mut(64).enumerate() {
                let (a, h) = (pairs[2 * q], pairs[2 * q + 1]);
                let v = spread(a & 0xff)
                    | spread(a >> 8) << 2
                    | spread(h & 0xff) << 4
                    | spread(h >> 8) << 6;
                quad[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// [`lanes_codes`] for 3-bit rows, from the packed rows: pair `q` of a 64-code chunk ([`nibble_column`]) is the
/// even codes of the chunk's codes `16q..16q + 16` for `q < 4`, else the odd ones of `16(q - 4)..`, and
/// sixteen codes are six whole bytes.
fn lanes_codes3(m: &AffineMatrix, dst: &mut [u8]) {
    let (cols, rb) = (m.cols, m.row_bytes());
    let block_bytes = 6 * cols;
    for (r, row) in m.packed.chunks_exact(rb).enumerate() {
        let (b, k) = (r / 16, r % 16);
        let block = &mut dst[b * block_bytes..(b + 1) * block_bytes];
        // A chunk is 24 bytes in, eight pairs of 48 bytes out.
        for (chunk, pairs) in row.chunks_exact(24).zip(block.chunks_exact_mut(384)) {
            for (q, pair) in pairs.chunks_exact_mut(48).enumerate() {
                let at = 6 * (q % 4);
                let mut w = [0u8; 8];
                w[..6].copy_from_slice(&chunk[at..at + 6]);
                let word = even_codes::<3, 16>(u64::from_le_bytes(w) >> (3 * (q / 4)));
                pair[3 * k..3 * k + 3].copy_from_slice(&word.to_le_bytes()[..3]);
            }
        }
    }
}

/// The `N / 2` even codes of the `N` (8 or 16) `B`-bit codes from bit 0 of `x`, one after another from bit 0:
/// pairs of codes, then of pairs (then of fours), closed up.
fn even_codes<const B: u32, const N: u32>(x: u64) -> u64 {
    /// `n` fields of `width` bits, `stride` bits apart.
    const fn every(width: u32, stride: u32, n: u32) -> u64 {
        let (mut m, mut i) = (0, 0);
        while i < n {
            m |= (u64::MAX >> (64 - width)) << (stride * i);
            i += 1;
        }
        m
    }
    const { assert!((N == 8 || N == 16) && N * B <= 64) };
    let x = x & const { every(B, 2 * B, N / 2) };
    let x = (x | x >> B) & const { every(2 * B, 4 * B, N / 4) };
    let x = (x | x >> (2 * B)) & const { every(4 * B, 8 * B, N / 8) };
    if N == 8 {
        return x;
    }
    (x | x >> (4 * B)) & const { every(8 * B, 16 * B, 1) }
}

/// [`lanes_codes`] for 5-, 6- and 8-bit rows, from the packed rows: word `w` of a 64-code chunk
/// ([`nibble_column`]) is the even codes of the chunk's codes `8w..8w + 8` for `w < 8`, else the odd ones of
/// `8(w - 8)..`, and eight codes are `B` whole bytes. Rows go in order, so a 5-bit row whose word starts
/// mid-byte completes the byte its predecessor began.
fn lanes_codes_wide<const B: u32>(m: &AffineMatrix, dst: &mut [u8]) {
    let (cols, rb, b) = (m.cols, m.row_bytes(), B as usize);
    let block_bytes = 2 * b * cols;
    for (r, row) in m.packed.chunks_exact(rb).enumerate() {
        let k = r % 16;
        let block = &mut dst[r / 16 * block_bytes..(r / 16 + 1) * block_bytes];
        // The row's word spans `n` bytes from byte `at` (5 bits: from bit 4 of it where `k` is odd).
        let (at, shift, n) = (4 * b * k / 8, 4 * b * k % 8, b.div_ceil(2));
        // A chunk is `8·B` bytes in, sixteen words of `8·B` bytes out.
        for (chunk, words) in row.chunks_exact(8 * b).zip(block.chunks_exact_mut(128 * b)) {
            for (w, word) in words.chunks_exact_mut(8 * b).enumerate() {
                let from = b * (w % 8);
                let mut eight = [0u8; 8];
                eight[..b].copy_from_slice(&chunk[from..from + b]);
                let codes = even_codes::<B, 8>(u64::from_le_bytes(eight) >> (B * (w as u32 / 8)));
                let v = (codes << shift).to_le_bytes();
                if shift == 0 {
                    word[at..at + n].copy_from_slice(&v[..n]);
                } else {
                    word[at] |= v[0];
                    word[at + 1..at + n].copy_from_slice(&v[1..n]);
                }
            }
        }
    }
}

/// [`lanes_codes`] for 4-bit rows, a 32-bit word of the row at a time (a code at a time, the bench model
/// loaded in ~2.2 s instead of ~0.65).
fn lanes_codes4(m: &AffineMatrix, dst: &mut [u8]) {
    let (cols, rb) = (m.cols, m.row_bytes());
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (r, row) in m.packed.chunks_exact(rb).enumerate() {
        let (b, k) = (r / 16, r % 16);
        let block = &mut dst[b * 8 * cols..(b + 1) * 8 * cols];
        // A 64-code chunk is 32 bytes, two codes each (the even code in the low nibble). In nibble order its
        // words 0–7 are the low nibbles of bytes 0–31 and words 8–15 the high ones: pair `q` (words `2q`,
        // `2q + 1`) is bytes `8q..8q + 8` for `q < 4` (low nibbles), else bytes `8(q - 4)..` (high ones).
        for (c, src) in row.chunks_exact(32).enumerate() {
            for q in 0..8 {
                let at = 8 * (q % 4);
                let (a, h) = (word(&src[at..]), word(&src[at + 4..]));
                let v = if q < 4 {
                    (a & 0x0f0f_0f0f) | (h & 0x0f0f_0f0f) << 4
                } else {
                    (a >> 4 & 0x0f0f_0f0f) | (h & 0xf0f0_f0f0)
                };
                let to = 64 * (8 * c + q) + 4 * k;
                block[to..to + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Row `r` of `m`, stored in lanes, as a byte per code in column order ([`lanes_codes`] undone).
pub fn lanes_row_codes(m: &AffineMatrix, r: usize, codes: &mut [u8]) {
    let (cols, bits, k) = (m.cols, m.bits as usize, r % 16);
    let block = &m.packed[r / 16 * 2 * bits * cols..(r / 16 + 1) * 2 * bits * cols];
    let mask = (1u32 << m.bits) - 1;
    // Code `j` of word `w` (in nibble order) from bit 0 of `v`.
    let mut put = |w: usize, j: usize, v: u32| codes[nibble_column(4 * w + j)] = (v & mask) as u8;
    if bits == 3 {
        for (p, pair) in block.chunks_exact(48).enumerate() {
            let v = u32::from_le_bytes([pair[3 * k], pair[3 * k + 1], pair[3 * k + 2], 0]);
            for i in 0..8 {
                put(2 * p + i / 4, i % 4, v >> (3 * i));
            }
        }
    } else if bits > 4 {
        // As `lanes_codes_wide` put them.
        let (at, shift, n) = (4 * bits * k / 8, 4 * bits * k % 8, bits.div_ceil(2));
        for (w, word) in block.chunks_exact(8 * bits).enumerate() {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&word[at..at + n]);
            let v = u64::from_le_bytes(v) >> shift;
            for j in 0..4 {
                put(w, j, (v >> (bits * j)) as u32);
            }
        }
    } else {
        let per = 8 / bits;
        for (q, words) in block.chunks_exact(64).enumerate() {
            for j in 0..4 {
                let byte = words[4 * k + j] as u32;
                for i in 0..per {
                    put(per * q + i, j, byte >> (bits * i));
                }
            }
        }
    }
}

/// `m` (2- to 6- or 8-bit, groups of a multiple of 64) stored in lanes as the loader stores it ([`lanes_codes`],
/// [`lanes_scales`]), in owned buffers (tests, benchmarks). The buffers start as `0xaa`, so a byte the
/// conversions leave unwritten shows.
pub fn stored_in_lanes(m: &AffineMatrix) -> AffineMatrix {
    assert!(
        matches!(m.bits, 2..=6 | 8) && m.group.is_multiple_of(64) && m.cols.is_multiple_of(m.group),
        "rows in lanes are 2- to 6- or 8-bit in groups of a multiple of 64, not {} bits in groups of {}",
        m.bits,
        m.group
    );
    let (nc, ns) = lanes_sizes(m);
    let (mut packed, mut scales, mut biases) = (vec![0xaa; nc], vec![0xaa; ns], vec![0xaa; ns]);
    lanes_codes(m, &mut packed);
    lanes_scales(m, &m.scales, &mut scales);
    lanes_scales(m, &m.biases, &mut biases);
    AffineMatrix {
        packed: crate::weights::Buf::owned(packed),
        scales: crate::weights::Buf::owned(scales),
        biases: crate::weights::Buf::owned(biases),
        lanes: true,
        ..m.clone()
    }
}

/// `m`'s scales or biases (`src`, row-major) in the order of [`AffineMatrix::lanes`] into `dst`
/// ([`lanes_sizes`]): per block of sixteen rows and group, the sixteen rows' values in `m`'s scale type (zero
/// for the padding rows).
pub fn lanes_scales(m: &AffineMatrix, src: &[u8], dst: &mut [u8]) {
    let (gpr, size) = (m.groups_per_row(), m.scale_type.size());
    debug_assert!(src.len() == m.rows * gpr * size && dst.len() == lanes_sizes(m).1);
    let last = dst.len().saturating_sub(16 * gpr * size);
    dst[last..].fill(0);
    for (r, row) in src.chunks_exact(gpr * size).enumerate() {
        let (b, k) = (r / 16, r % 16);
        for (g, v) in row.chunks_exact(size).enumerate() {
            let to = ((b * gpr + g) * 16 + k) * size;
            dst[to..to + size].copy_from_slice(v);
        }
    }
}

/// f32 tokens per call from which the AVX-512 tiles put sixteen tokens in each register (their whole sixteens;
/// the register kernels take the rest) instead of summing the lanes of four-by-four blocks. Measured with two
/// threads on sixteen 768×2048 and 2048×768 matrices: at 16 and 32 tokens the lanes were 10–20 % slower, at
/// 48 3–7 % faster; at 64 tokens 1–8 % faster there and 8–17 % on one 2048×2048, 4096×2048 or 2048×4096.
#[cfg(target_arch = "x86_64")]
const LANE_TILE_TOKENS: usize = 48;

/// f32 tokens per call from which `Isa::Amx` takes the AMX tiles (all the tokens, groups of 64 or 128).
/// Measured with two threads on 200 768×2048 or 2048×768 experts (from DRAM, as a prefill reads them): at
/// 2, 3 and 4 tokens the AVX-512 kernels were 20–30, 12–19 and 0–6 % faster, at 5 tokens the tiles 11–16 %
/// faster, at 8 22–51 %, at 12 51–62 %; on one 2048×2048 or 4096×2048 matrix at 64 tokens 33–36 %.
#[cfg(target_arch = "x86_64")]
const AMX_TOKENS: usize = amx::TOKENS_PER_TILE;

#[inline(always)]
fn affine_rows<K: Dots>(m: &AffineMatrix, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    if m.lanes {
        // `lanes_apply` stores rows in lanes only where this kernel exists.
        assert!(
            K::lanes_stored(m, px, out, r0..r1),
            "a matrix stored in lanes met an instruction set without its kernel"
        );
        return;
    }
    // The tiles may leave tokens from `first` on (past their whole sixteens) to the register kernels below.
    let first =
        if m.bits <= 4 && px.xq.is_empty() && (px.tokens >= TILE_TOKENS || !px.xb.is_empty()) {
            K::f32_tiles(m, px, out, r0..r1)
        } else if m.bits <= 4 && !px.xl.is_empty() {
            K::int8_lanes(m, px, out, r0..r1)
        } else {
            0
        };
    if first == px.tokens {
        return;
    }
    // The loop runs here, not in a `with` closure: closures do not inherit `target_feature`.
    let (mut codes, mut scales, mut biases) = SCRATCH.with(|s| s.take());
    let gpr = m.groups_per_row();
    // 2- and 3-bit rows are widened to 4 bits and take the 4-bit kernels; 5- and 6-bit rows to bytes.
    let nibbles = m.bits <= 4;
    let rb = m.row_bytes();
    codes.resize(4 * m.cols, 0);
    scales.resize(4 * gpr, 0.0);
    biases.resize(4 * gpr, 0.0);
    let g = px.group;
    let all: &[u8] = &m.packed;
    let mut r = r0;
    // One token (decode) on 4-bit (or widened) rows, not in unit order: four rows per pass share the
    // activations and the loop overhead.
    if px.tokens == 1 && nibbles && !px.units {
        while r + 4 <= r1 {
            m.rows_scales(r..r + 4, &mut scales, &mut biases);
            let mut wb = 0;
            if m.bits != 4 {
                for (i, dst) in codes.chunks_exact_mut(m.cols).enumerate() {
                    let row = &all[(r + i) * rb..(r + i + 1) * rb];
                    wb = K::widen(row, m.bits, dst);
                }
            }
            let rows: [&[u8]; 4] = std::array::from_fn(|i| match m.bits {
                4 => &all[(r + i) * rb..(r + i + 1) * rb],
                _ => &codes[i * m.cols..i * m.cols + wb],
            });
            let sc: [&[f32]; 4] = std::array::from_fn(|i| &scales[i * gpr..(i + 1) * gpr]);
            let dots = if px.xq.is_empty() {
                K::dot4_f32_rows4(rows, px.xf_of(0), sc, g, m.bits == 4)
            } else {
                K::dot4_i8_rows4(rows, px.xq_of(0), sc, px.dx_of(0), g, m.bits == 4)
            };
            for (i, d) in dots.into_iter().enumerate() {
                let b = &biases[i * gpr..(i + 1) * gpr];
                store(out, m.rows, r + i, 0, d + bias_dot(b, px.xsum_of(0)));
            }
            r += 4;
        }
    }
    // Several tokens per pass over a row (prefill, batched decode), in balanced blocks of at most
    // eight or six (`width` below), so no token runs alone. Blocks outside, rows inside: a block's
    // activations stay in L1 while the task's rows (tens of KB) come again from L2 for each block.
    let left = px.tokens - first;
    // (One token in unit order takes the same kernel, as a block of one.)
    let multi = left >= 2 || (nibbles && px.units);
    // f32 tokens take 4 bytes of L1 per column each: eight of them on rows of up to 1024 columns (2048×768
    // experts, 7 and 8 tokens, two threads: 13–15 % faster than two blocks), six on wider rows (768×2048: eight
    // in one block were ~20 % slower). int8 tokens in unit order (AVX-512) go in blocks of at most five: from
    // six, a block's sums and scales no longer fit the registers and its token loop is not unrolled (768×2048,
    // two threads, eight tokens: 117 µs in one block, 100 in two of four; bench-shape prefill ×1.07). Elsewhere
    // eight int8 tokens fit (AVX2: blocks of five made a two-layer prefill 160 → 182 ms).
    let width = match (px.xq.is_empty(), px.units) {
        (true, _) if m.cols > 1024 => 6,
        (false, true) => 5,
        _ => 8,
    };
    let blocks = if multi { left.div_ceil(width) } else { 1 };
    for b in 0..blocks {
        let (t0, t1) = (first + left * b / blocks, first + left * (b + 1) / blocks);
        if multi && nibbles && K::rows_xn(m, px, out, r..r1, t0..t1) {
            continue;
        }
        for r in r..r1 {
            m.rows_scales(r..r + 1, &mut scales[..gpr], &mut biases[..gpr]);
            let (row_s, row_b) = (&scales[..gpr], &biases[..gpr]);
            let packed = &all[r * rb..(r + 1) * rb];
            let row: &[u8] = match m.bits {
                4 | 8 => packed,
                b => {
                    let wb = K::widen(packed, b, &mut codes[..m.cols]);
                    &codes[..wb]
                }
            };
            // No closures here: they would not inherit the caller's `target_feature`.
            if multi {
                match t1 - t0 {
                    2 => tokens_pass::<K, 2>(m, px, out, row, row_s, row_b, r, t0),
                    3 => tokens_pass::<K, 3>(m, px, out, row, row_s, row_b, r, t0),
                    4 => tokens_pass::<K, 4>(m, px, out, row, row_s, row_b, r, t0),
                    5 => tokens_pass::<K, 5>(m, px, out, row, row_s, row_b, r, t0),
                    6 => tokens_pass::<K, 6>(m, px, out, row, row_s, row_b, r, t0),
                    7 => tokens_pass::<K, 7>(m, px, out, row, row_s, row_b, r, t0),
                    _ => tokens_pass::<K, 8>(m, px, out, row, row_s, row_b, r, t0),
                }
                continue;
            }
            for t in t0..t1 {
                let dot = match (px.xq.is_empty(), nibbles) {
                    (true, true) => K::dot4_f32(row, px.xf_of(t), row_s, g),
                    (true, false) => K::dot_f32(row, px.xf_of(t), row_s, g),
                    (false, true) => K::dot4_i8(row, px.xq_of(t), row_s, px.dx_of(t), g),
                    (false, false) => K::dot_i8(row, px.xq_of(t), row_s, px.dx_of(t), g),
                };
                store(out, m.rows, r, t, dot + bias_dot(row_b, px.xsum_of(t)));
            }
        }
    }
    SCRATCH.with(|s| s.replace((codes, scales, biases)));
}

/// Tokens `t0..t0 + N` against row `r` (`row`: 4-bit, or widened to 4 bits or to a byte per code; with its
/// scales and biases) in one pass.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tokens_pass<K: Dots, const N: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    row: &[u8],
    row_s: &[f32],
    row_b: &[f32],
    r: usize,
    t0: usize,
) {
    let g = px.group;
    let xf = || std::array::from_fn(|k| px.xf_of(t0 + k));
    let (xq, dx) = (
        || std::array::from_fn(|k| px.xq_of(t0 + k)),
        || std::array::from_fn(|k| px.dx_of(t0 + k)),
    );
    // Rows of 4 bits or fewer come as nibbles (widened to 4 bits), wider ones as a byte per code.
    let dots: [f32; N] = match (px.xq.is_empty(), m.bits <= 4) {
        (true, true) => K::dot4_f32_xn(row, xf(), row_s, g),
        (true, false) => K::dot_f32_xn(row, xf(), row_s, g),
        (false, true) => K::dot4_i8_xn(row, xq(), row_s, dx(), g),
        (false, false) => K::dot_i8_xn(row, xq(), row_s, dx(), g),
    };
    for (k, d) in dots.into_iter().enumerate() {
        store(
            out,
            m.rows,
            r,
            t0 + k,
            d + bias_dot(row_b, px.xsum_of(t0 + k)),
        );
    }
}

/// Writes output `(t, r)`.
#[inline(always)]
fn store(out: &Out, rows: usize, r: usize, t: usize, v: f32) {
    let i = t * rows + r;
    debug_assert!(i < out.len);
    // SAFETY: `i` is in bounds and row `r` belongs to the calling task alone.
    unsafe { *out.ptr.add(i) = v };
}

/// Adds `v` to output `(t, r)`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn add(out: &Out, rows: usize, r: usize, t: usize, v: f32) {
    let i = t * rows + r;
    debug_assert!(i < out.len);
    // SAFETY: as in `store`.
    unsafe { *out.ptr.add(i) += v };
}

/// `Σ_g bias_g · Σx_g`, in eight lanes so it vectorizes.
#[inline(always)]
fn bias_dot(biases: &[f32], xsum: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (b8, x8) = (biases.chunks_exact(8), xsum.chunks_exact(8));
    let tail: f32 = b8
        .remainder()
        .iter()
        .zip(x8.remainder())
        .map(|(b, x)| b * x)
        .sum();
    for (b, x) in b8.zip(x8) {
        for i in 0..8 {
            lanes[i] += b[i] * x[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::affine::ScaleType;

    fn matrix(rows: usize, cols: usize, bits: u32, group: usize, seed: u64) -> AffineMatrix {
        let mut s = seed;
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        AffineMatrix::quantize(&w, rows, cols, bits, group)
    }

    fn activations(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0)
            .collect()
    }

    /// The reference: dequantize, then an f64 dot product.
    fn reference(m: &AffineMatrix, x: &[f32]) -> Vec<f32> {
        let d = m.dequantize();
        let t = x.len() / m.cols;
        let mut y = vec![0f32; t * m.rows];
        for ti in 0..t {
            for r in 0..m.rows {
                y[ti * m.rows + r] = (0..m.cols)
                    .map(|c| x[ti * m.cols + c] as f64 * d[r * m.cols + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    /// `m` with its scales and biases stored as `st`.
    fn with_scale_type(m: &AffineMatrix, st: ScaleType) -> AffineMatrix {
        let n = m.rows * m.groups_per_row();
        let store = |b: &[u8]| {
            let values = (0..n).map(|i| ScaleType::F32.read(b, i));
            let bytes: Vec<u8> = match st {
                ScaleType::F32 => values.flat_map(f32::to_le_bytes).collect(),
                ScaleType::Bf16 => values
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                ScaleType::F16 => values
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            crate::weights::Buf::owned(bytes)
        };
        AffineMatrix {
            scales: store(&m.scales),
            biases: store(&m.biases),
            scale_type: st,
            ..m.clone()
        }
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn every_isa_matches_the_reference_for_every_width_and_group() {
        // 600 rows × 384 columns crosses the parallel threshold for the wider formats; one token takes the
        // four-rows-per-pass path (37 rows leave a tail of one); seven and eight tokens one block, eleven
        // blocks of 5 and 6, fifteen int8 tokens blocks of 7 and 8. On AVX-512, 15 and 21 f32 tokens take the
        // four-by-four tiles (15: blocks of 4, 4, 4 and 3), 50 the tiles with tokens in lanes for a block of 32
        // and one of 16 and the register kernel for the last 2 (37 rows leave partial tiles and row blocks).
        let cols = 384;
        for (t, bits) in [1, 6, 7, 8, 11, 15, 21, 50]
            .into_iter()
            .flat_map(|t| crate::config::SUPPORTED_BITS.map(|b| (t, b)))
        {
            let x = activations(t * cols);
            for group in crate::config::SUPPORTED_GROUPS {
                for (rows, st) in [
                    (37, ScaleType::F32),
                    (600, ScaleType::F32),
                    (37, ScaleType::Bf16),
                ] {
                    let seed = bits as u64 * 1000 + group as u64;
                    let m = with_scale_type(&matrix(rows, cols, bits, group, seed), st);
                    let want = reference(&m, &x);
                    let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                    for isa in Isa::available() {
                        let mut y = vec![0f32; t * rows];
                        affine_matmul_isa(isa, &m, &x, &mut y, Activations::F32);
                        let err = max_err(&y, &want);
                        assert!(
                            err < 1e-4 * scale,
                            "{isa:?} f32 bits {bits} g {group} {st:?}: {err}"
                        );
                        affine_matmul_isa(isa, &m, &x, &mut y, Activations::Int8);
                        let err = max_err(&y, &want);
                        assert!(
                            err < 2e-2 * scale,
                            "{isa:?} int8 bits {bits} g {group} {st:?}: {err}"
                        );
                    }
                }
            }
        }
    }

    /// `isa`'s f32 path is as exact as `than`'s: its largest error against f64 sums, relative to the largest
    /// output, is below 1e-6 and within 4× of `than`'s.
    fn assert_as_exact(m: &AffineMatrix, x: &[f32], [than, isa]: [Isa; 2], case: &str) {
        let want = reference(m, x);
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let [base, got] = [than, isa].map(|isa| {
            let mut y = vec![0f32; want.len()];
            affine_matmul_isa(isa, m, x, &mut y, Activations::F32);
            max_err(&y, &want) / scale
        });
        assert!(
            got < 1e-6 && got < 4.0 * base.max(1e-7),
            "{case}: {isa:?} {got}, {than:?} {base}"
        );
    }

    #[test]
    fn amx_tiles_are_as_exact_as_f32_sums() {
        // Every bit width the tiles take (2 and 3 widened), both groups, tokens that fill a `B` tile (5), leave
        // a partial one (6, 7, 17), many (64) or more than a group of 65 (70); 37 rows leave a partial block
        // of 16, and 150 rows at five tokens make three passes of rows (64, 64, 22), the last two fetched
        // while the one before runs. The three bf16 parts make every product exact: the error is f32
        // summation's, as the AVX-512 f32 kernels'. (With two parts it was 3.2e-6: this test fails.)
        if !Isa::available().contains(&Isa::Amx) {
            eprintln!("no AMX here: skipped");
            return;
        }
        for (t, bits, group, cols, rows) in [
            (5, 4, 64, 384, 37),
            (5, 4, 64, 384, 150),
            (6, 4, 128, 384, 37),
            (7, 3, 64, 512, 37),
            (17, 2, 128, 384, 37),
            (64, 4, 64, 2048, 37),
            (5, 4, 64, 4608, 37),
            (70, 3, 128, 384, 37),
        ] {
            let x = activations(t * cols);
            let m = with_scale_type(&matrix(rows, cols, bits, group, 7), ScaleType::Bf16);
            let case = format!("t {t} bits {bits} g {group} {rows}×{cols}");
            assert_as_exact(&m, &x, [Isa::Avx512, Isa::Amx], &case);
        }
    }

    /// Fewer f32 tokens than the tiles take meet 4-bit-order rows on AVX-512 + VNNI as three int8 slices (more
    /// tokens 4-bit rows, in the rows-in-lanes kernel):
    /// within 2⁻²² of each group's `max|x|` per value, so the outputs are as close to f64 sums as the f32
    /// kernels' (without the third slice, 2⁻¹⁵ of `max|x|`, they were ~100× farther and this test fails).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f32_tokens_in_three_int8_slices_are_as_exact_as_f32_sums() {
        if !x86::has_avx512() {
            return;
        }
        // One token on 2- and 3-bit rows (widened): four rows per pass, 37 rows leave one to the one-row
        // kernel. Several tokens, or one on 4-bit rows: two rows per pass in unit order, 37 leave one; 11
        // tokens make two blocks (5 + 6), 9 two of 4 + 5. 384 columns are not whole units of 256: one token
        // stays out of unit order there, several on f32. From twelve tokens 4-bit rows take the rows-in-lanes
        // kernel with the slices in nibble order (12: blocks of 6 + 6, 50: nine blocks of 5–6, 37 rows a
        // partial block of sixteen); 2- and 3-bit rows in the MLX layout take the f32 tiles there.
        for (t, bits, group, cols, rows, slices) in [
            (1, 4, 64, 2048, 37, true),
            (1, 4, 128, 768, 40, true),
            (1, 4, 64, 384, 37, true),
            (1, 3, 64, 384, 37, true),
            (1, 2, 128, 512, 37, true),
            (2, 4, 64, 2048, 37, true),
            (4, 4, 128, 768, 40, true),
            (8, 4, 64, 512, 37, true),
            (9, 3, 64, 768, 37, true),
            (11, 2, 128, 512, 38, true),
            (3, 4, 64, 384, 37, false),
            (12, 4, 64, 2048, 37, true),
            (50, 4, 128, 768, 40, true),
            (12, 3, 64, 512, 37, true),
            (16, 2, 128, 384, 37, true),
        ] {
            let mut x = activations(t * cols);
            // Values far below their group's largest, and an all-zero group.
            x[3] = 1e-6;
            x[group..2 * group].fill(0.0);
            let m = with_scale_type(&matrix(rows, cols, bits, group, 11), ScaleType::Bf16);
            let px = prepare(
                Isa::Avx512,
                &x,
                cols,
                (group, true, Activations::F32, bits == 4, false),
            );
            let laned = t >= TILE_TOKENS && bits == 4;
            let slices = slices && (t < TILE_TOKENS || laned);
            assert_eq!(px.xs.len(), if slices { t * cols } else { 0 }, "t {t}");
            assert_eq!(
                px.xl.len(),
                if laned { 3 * t * xl_stride(cols) } else { 0 },
                "t {t}"
            );
            let units = slices && !laned && (t >= 2 || bits == 4) && cols.is_multiple_of(UNIT);
            assert_eq!(px.units, units, "t {t} bits {bits} {cols}");
            let case = format!("t {t} bits {bits} g {group} {rows}×{cols}");
            assert_as_exact(&m, &x, [Isa::Avx2, Isa::Avx512], &case);
        }
    }

    /// One token against 4-bit rows in unit order (two rows per pass) gives what the four-row kernel gives
    /// for the same slices, up to the order of the float sums: int8 and f32 activations, both groups, an
    /// odd row count and columns of one or eight units.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn one_token_in_unit_order_matches_the_four_row_kernel() {
        if !x86::has_avx512() {
            return;
        }
        for (group, cols, rows) in [(64, 2048, 37), (128, 256, 40), (64, 768, 600)] {
            let x = activations(cols);
            let m = with_scale_type(&matrix(rows, cols, 4, group, 5), ScaleType::Bf16);
            for act in [Activations::Int8, Activations::F32] {
                let [four, units] = [false, true].map(|packed4| {
                    let px = prepare(Isa::Avx512, &x, cols, (group, true, act, packed4, false));
                    assert_eq!(px.units, packed4, "g {group} {cols} {act:?}");
                    let mut y = vec![0f32; rows];
                    let out = Out {
                        ptr: y.as_mut_ptr(),
                        len: y.len(),
                    };
                    run_rows(Isa::Avx512, Weight::Affine(&m), &px, &out, 0, rows);
                    y
                });
                let scale = four.iter().fold(1f32, |a, v| a.max(v.abs()));
                let err = max_err(&units, &four);
                assert!(err < 1e-6 * scale, "g {group} {rows}×{cols} {act:?}: {err}");
            }
        }
    }

    /// The three slices hold every value within half the finest step, `max|x| / (127 · 2¹⁵)` of its group,
    /// and the finer two never reach their clamp.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn three_int8_slices_hold_each_value_within_half_the_finest_step() {
        if !x86::has_avx512() {
            return;
        }
        for (cols, group) in [(2048, 64), (768, 128)] {
            let mut x = activations(cols);
            x[7] = -x[7] * 1e4;
            x[group + 1] = 3e-9;
            x[2 * group..3 * group].fill(0.0);
            let f = Prepared::new(&x, cols, (group, true, Activations::F32), false).xf;
            // SAFETY: checked above.
            let px = unsafe {
                x86::prepare_int8_avx512(&x, cols, group, true, false, true, x86::Laned::No)
            };
            let k = EXACT_RESIDUAL;
            for (i, v) in f.iter().enumerate() {
                let (q, r, s) = (px.xq[i] as i32, px.xr[i] as i32, px.xs[i] as i32);
                assert!(r.abs() <= k / 2 && s.abs() <= k / 2, "{i}: r {r} s {s}");
                let dx = px.dx[i / group];
                let got = dx as f64 * (k * k * q + k * r + s) as f64;
                let amax = f[i / group * group..][..group]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                assert_eq!(
                    dx,
                    if amax > 0.0 {
                        amax / 127.0 / 128.0 / 128.0
                    } else {
                        1.0 / 16384.0
                    }
                );
                assert!(
                    (got - *v as f64).abs() <= 0.5 * dx as f64,
                    "{i}: {v} as {got}"
                );
            }
        }
    }

    #[test]
    fn wide_rows_in_column_spans_match_the_reference() {
        // 4608 columns: the f32 several-token kernel runs them in spans of 2048 (and a partial one), the
        // four-by-four tiles (12 to 47 tokens) in spans of 512, adding each span's sums to the last, the tiles
        // with tokens in lanes (48 or more) in spans of 128, each continuing the last's sums; 2- and 3-bit rows
        // are widened again for each span.
        let cols = 4608;
        for (t, bits, group) in [
            (6, 4, 64),
            (15, 4, 128),
            (5, 3, 64),
            (2, 2, 128),
            (13, 3, 64),
            (50, 4, 128),
            (49, 3, 64),
        ] {
            let x = activations(t * cols);
            let m = with_scale_type(&matrix(37, cols, bits, group, 9), ScaleType::Bf16);
            let want = reference(&m, &x);
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            for isa in Isa::available() {
                let mut y = vec![0f32; t * m.rows];
                affine_matmul_isa(isa, &m, &x, &mut y, Activations::F32);
                let err = max_err(&y, &want);
                assert!(
                    err < 1e-4 * scale,
                    "{isa:?} t {t} bits {bits} g {group}: {err}"
                );
            }
        }
    }

    /// AVX2 and NEON take a row's codes once for a block of tokens (prefill) and once per token alone
    /// (decode; AVX2 f32 four rows at once): each token's outputs are the same to the bit either way. 256
    /// columns take blocks of eight f32 tokens at most (11 = 5 + 6); 2- and 3-bit rows widened to 4 bits,
    /// 6-bit ones to bytes (byte rows take blocks of tokens too: f32 on AVX2, f32 and int8 on NEON).
    #[test]
    fn token_blocks_equal_one_token_at_a_time() {
        let (rows, cols, t) = (21, 256, 11);
        let x = activations(t * cols);
        let isas = Isa::available().into_iter();
        for isa in isas.filter(|i| matches!(i, Isa::Avx2 | Isa::Neon)) {
            for (bits, group) in [
                (4, 32),
                (4, 64),
                (4, 128),
                (2, 64),
                (3, 32),
                (8, 64),
                (6, 128),
            ] {
                let m = matrix(rows, cols, bits, group, 9);
                for act in [Activations::F32, Activations::Int8] {
                    let mut all = vec![0f32; t * rows];
                    affine_matmul_isa(isa, &m, &x, &mut all, act);
                    for k in 0..t {
                        let mut one = vec![0f32; rows];
                        affine_matmul_isa(isa, &m, &x[k * cols..(k + 1) * cols], &mut one, act);
                        assert_eq!(
                            one,
                            all[k * rows..(k + 1) * rows],
                            "{isa:?} bits {bits} g {group} {act:?} token {k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int8_paths_agree_with_the_scalar_int8_reference() {
        // Integer dot products are exact, so only the f32 accumulation order may differ. Rows of one, two
        // and four groups; one token (the four-row pass) and passes of 2, 3, 4, 5, 6 (11 = 5 + 6), 7 and 8
        // (15 = 7 + 8) tokens; 2- and 3-bit rows widened to 4 bits, 6-bit rows to bytes;
        // 96 columns leave the VBMI widening a 32-code tail; 256 and 1280 columns take the AVX-512 kernel
        // of 256-code units, 1280 with more than sixteen groups of 64 (a full and a partial set of scales).
        let rows = 19;
        let cases = [1, 2, 3, 4, 5, 11, 15]
            .into_iter()
            .flat_map(|t| [4, 8, 3, 2, 6].map(|b| (t, b)))
            .flat_map(|(t, b)| [64, 96, 128, 256, 1280].map(|c| (t, b, c)));
        for (t, bits, cols) in cases {
            let x = activations(t * cols);
            let groups = [32, 64, 128].into_iter().filter(|g| cols % g == 0);
            // Checkpoints store scales as bf16 or f16 (converted as they are read) as well as f32.
            let types = [ScaleType::F32, ScaleType::Bf16, ScaleType::F16];
            for (group, st) in groups.flat_map(|g| types.map(|st| (g, st))) {
                let m = with_scale_type(&matrix(rows, cols, bits, group, 5), st);
                let mut want = vec![0f32; t * rows];
                affine_matmul_isa(Isa::Scalar, &m, &x, &mut want, Activations::Int8);
                for isa in Isa::available() {
                    let mut y = vec![0f32; t * rows];
                    affine_matmul_isa(isa, &m, &x, &mut y, Activations::Int8);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{isa:?} bits {bits} g {group} {st:?} cols {cols} t {t}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// 2- to 6- and 8-bit rows (3, 5 and 6 where the CPU has VBMI).
    #[cfg(target_arch = "x86_64")]
    fn lane_bits() -> Vec<u32> {
        [2, 3, 4, 5, 6, 8]
            .into_iter()
            .filter(|&b| !matches!(b, 3 | 5 | 6) || x86::has_vbmi())
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_rows_stored_in_lanes_agree_with_the_scalar_int8_reference() {
        // Rows stored in lanes at load (`lanes_codes`, `lanes_scales`) take every token count, from one up:
        // blocks of 8 tokens and tails, rows that are and are not whole blocks of sixteen, groups of 64 and
        // 128, every scale type, 2 to 6 and 8 bits; 600 × 2048 splits into several tasks, each from a block's
        // first row.
        if !Isa::available().contains(&Isa::Avx512) {
            return;
        }
        let cases = [
            (1, 37, 2048),
            (2, 16, 64),
            (3, 600, 2048),
            (5, 37, 192),
            (8, 33, 128),
            (9, 37, 256),
            (17, 20, 128),
        ];
        for (t, rows, cols) in cases {
            let x = activations(t * cols);
            let groups = [64, 128].into_iter().filter(|g| cols % g == 0);
            let types = [ScaleType::F32, ScaleType::Bf16, ScaleType::F16];
            let each = groups.flat_map(|g| types.map(|st| (g, st)));
            for ((group, st), bits) in
                each.flat_map(|c| lane_bits().into_iter().map(move |b| (c, b)))
            {
                let m = with_scale_type(&matrix(rows, cols, bits, group, 11), st);
                let mut want = vec![0f32; t * rows];
                affine_matmul_isa(Isa::Scalar, &m, &x, &mut want, Activations::Int8);
                let stored = stored_in_lanes(&m);
                // Read back in the MLX layout (as the dequantizing readers do), the same weights; the
                // buffers started as garbage, and the padding rows' scales are zero.
                assert!(
                    stored.dequantize() == m.dequantize(),
                    "{bits}-bit g {group} {st:?} rows {rows}"
                );
                let (gpr, size) = (cols / group, st.size());
                let last = &stored.scales[stored.scales.len() - 16 * gpr * size..];
                let real = (rows - 1) % 16 + 1;
                let mut padding = last
                    .chunks_exact(size)
                    .enumerate()
                    .filter(|(i, _)| i % 16 >= real);
                assert!(
                    padding.all(|(_, v)| v.iter().all(|&b| b == 0)),
                    "rows {rows}"
                );
                let mut y = vec![0f32; t * rows];
                affine_matmul_isa(Isa::Avx512, &stored, &x, &mut y, Activations::Int8);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{bits}-bit g {group} {st:?} rows {rows} cols {cols} t {t}, output {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// f32 tokens against rows stored in lanes, as three int8 slices, are as close to f64 sums as the AVX2 f32
    /// kernels on the MLX layout: one token (decode) up to 17 (balanced blocks of at most six: 5 + 6 + 6, and
    /// 4 + 5 for nine), groups of 64 and 128 (whose integer sums are converted every 64 codes: over 128 they
    /// would overflow; codes over 15 convert their coarse slice's sums apart), rows that are not whole blocks of
    /// sixteen, a task split of 600 rows, 2 to 6 and 8 bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f32_rows_stored_in_lanes_are_as_exact_as_f32_sums() {
        if !x86::has_avx512() {
            return;
        }
        // `top`: every code 15 against positive activations near their group's largest, the integer sums
        // at their bound (over a whole group of 128 they would overflow).
        for (t, group, cols, rows, top) in [
            (1, 64, 2048, 37, false),
            (1, 128, 768, 40, false),
            (2, 128, 256, 16, true),
            (4, 64, 768, 600, false),
            (6, 128, 512, 33, false),
            (9, 64, 192, 37, true),
            (17, 128, 384, 20, false),
        ] {
            for bits in lane_bits() {
                let mut x = activations(t * cols);
                let mut m = with_scale_type(&matrix(rows, cols, bits, group, 13), ScaleType::Bf16);
                if top {
                    x.iter_mut().for_each(|v| *v = 1.0 - v.abs() / 64.0);
                    m.packed = crate::weights::Buf::owned(vec![0xff; m.packed.len()]);
                } else {
                    // Values far below their group's largest, and an all-zero group.
                    x[3] = 1e-6;
                    x[group..2 * group].fill(0.0);
                }
                let case = format!("{bits}-bit t {t} g {group} {rows}×{cols} top {top}");
                let want = reference(&m, &x);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let stored = stored_in_lanes(&m);
                let [base, got] = [(Isa::Avx2, &m), (Isa::Avx512, &stored)].map(|(isa, m)| {
                    let mut y = vec![0f32; want.len()];
                    affine_matmul_isa(isa, m, &x, &mut y, Activations::F32);
                    max_err(&y, &want) / scale
                });
                assert!(
                    got < 1e-6 && got < 4.0 * base.max(1e-7),
                    "{case}: {got}, AVX2 {base}"
                );
            }
        }
    }

    #[test]
    fn int8_rows_in_lanes_agree_with_the_scalar_int8_reference() {
        // From `LANE_TOKENS` int8 tokens on, AVX-512 takes 4-bit rows in the MLX layout sixteen to a register
        // (`x86::int8_lanes`; 2- and 3-bit rows there take the unit-order kernels):
        // blocks of 8 tokens and a tail (23 = 8 + 8 + 7, 40), 37 rows (two full blocks of sixteen and five),
        // columns that are and are not whole 256-code units, groups of 64 and 128, every scale type.
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx512() {
            let laned = |t: usize, packed4: bool| {
                let key = (64, true, Activations::Int8, packed4, false);
                !prepare(Isa::Avx512, &activations(t * 256), 256, key)
                    .xl
                    .is_empty()
            };
            assert!(laned(LANE_TOKENS, true) && !laned(LANE_TOKENS - 1, true));
            assert!(!laned(64, false));
        }
        let rows = 37;
        let cases = [(9, 256), (16, 64), (23, 192), (40, 1280), (16, 2048)]
            .into_iter()
            .flat_map(|(t, c)| [4, 3, 2].map(|b| (t, c, b)));
        for (t, cols, bits) in cases {
            let x = activations(t * cols);
            let groups = [64, 128].into_iter().filter(|g| cols % g == 0);
            let types = [ScaleType::F32, ScaleType::Bf16, ScaleType::F16];
            for (group, st) in groups.flat_map(|g| types.map(|st| (g, st))) {
                let m = with_scale_type(&matrix(rows, cols, bits, group, 7), st);
                let mut want = vec![0f32; t * rows];
                affine_matmul_isa(Isa::Scalar, &m, &x, &mut want, Activations::Int8);
                for isa in Isa::available() {
                    let mut y = vec![0f32; t * rows];
                    affine_matmul_isa(isa, &m, &x, &mut y, Activations::Int8);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{isa:?} bits {bits} g {group} {st:?} cols {cols} t {t}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rows_match_the_f32_reference_on_every_isa() {
        // One token, and eleven: blocks of five and six (and a tail of columns past the last sixteen).
        for t in [1, 11] {
            bf16_rows_match_the_f32_reference(t);
        }
    }

    fn bf16_rows_match_the_f32_reference(t: usize) {
        // Rows in fours, and a task's last two alone (tasks split rows in fours).
        let (rows, cols) = (302, 200);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| half::bf16::from_f32((i % 97) as f32 / 50.0 - 1.0).to_f32())
            .collect();
        let m = Bf16Matrix::from_f32(&w, rows, cols);
        let x = activations(t * cols);
        let want: Vec<f32> = (0..t)
            .flat_map(|ti| (0..rows).map(move |r| (ti, r)))
            .map(|(ti, r)| {
                (0..cols)
                    .map(|c| x[ti * cols + c] as f64 * w[r * cols + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        for isa in Isa::available() {
            let mut y = vec![0f32; t * rows];
            matmul_many(
                isa,
                &mut [Job {
                    w: Weight::Bf16(&m),
                    x: &x,
                    y: &mut y,
                }],
            );
            assert!(
                max_err(&y, &want) < 1e-3,
                "{isa:?} t {t}: {}",
                max_err(&y, &want)
            );
            // Each token's sums, bit for bit, as alone (in fours of rows or not, blocks of tokens or not).
            for (ti, x) in x.chunks_exact(cols).enumerate() {
                let mut alone = vec![0f32; rows];
                let job = Job {
                    w: Weight::Bf16(&m),
                    x,
                    y: &mut alone,
                };
                matmul_many(isa, &mut [job]);
                assert_eq!(
                    &y[ti * rows..][..rows],
                    &alone[..],
                    "{isa:?} t {t}: token {ti}"
                );
            }
        }
    }

    /// The AVX-512 int8 preparation writes what the portable one writes, bit for bit, in both orders.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_int8_preparation_equals_the_portable_one() {
        if !x86::has_avx512() {
            return;
        }
        for (tokens, cols, group, nibbles) in [
            (1, 2048, 64, true),
            (3, 2048, 64, true),
            (5, 768, 64, true),
            (2, 1280, 128, true),
            (4, 192, 64, true),
            (3, 512, 64, false),
            (2, 256, 128, false),
        ] {
            let mut x = activations(tokens * cols);
            x[5] = 0.0;
            // An all-zero group takes the unit step.
            x[(tokens - 1) * cols..(tokens - 1) * cols + group].fill(0.0);
            for units in [false, true] {
                let want = Prepared::new(&x, cols, (group, nibbles, Activations::Int8), units);
                // SAFETY: checked above.
                let got = unsafe {
                    x86::prepare_int8_avx512(
                        &x,
                        cols,
                        group,
                        nibbles,
                        units,
                        false,
                        x86::Laned::Also,
                    )
                };
                let case = format!("{tokens}×{cols} g{group} nibbles {nibbles} units {units}");
                assert_eq!(got.units, want.units, "{case}");
                assert_eq!(*got.xq, *want.xq, "{case}");
                assert_eq!(*got.xr, *want.xr, "{case}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.dx), bits(&want.dx), "{case}");
                assert_eq!(bits(&got.xsum), bits(&want.xsum), "{case}");
                // Every token's codes also in nibble order (4-bit-order rows only), coarse then residual,
                // each slice padded with zeros to `xl_stride`.
                let plain = Prepared::new(&x, cols, (group, nibbles, Activations::Int8), false);
                let rows = plain.xq.chunks_exact(cols).zip(plain.xr.chunks_exact(cols));
                let pad = [0i8; 64];
                let pad = &pad[..xl_stride(cols) - cols];
                let xl: Vec<i8> = rows
                    .flat_map(|(q, r)| [q, pad, r, pad].into_iter().flatten().copied())
                    .collect();
                assert_eq!(&*got.xl, if nibbles { &xl[..] } else { &[] }, "{case}");
            }
        }
    }

    #[test]
    fn picked_rows_equal_the_same_rows_copied_out() {
        let picks: [Vec<u32>; 4] = [
            vec![3],
            vec![19, 0, 7, 7, 2],
            (0..13).rev().collect(),
            (0..20).collect(),
        ];
        // Groups of 64 and of 128 (columns not a multiple of 256).
        for (cols, group) in [(256, 64), (384, 128)] {
            let x = activations(20 * cols);
            for act in [Activations::F32, Activations::Int8] {
                // 4-bit rows (stored in lanes where this CPU reads them so: the kernel picks the rows from
                // one preparation of `x`), and 3-bit ones (their picked rows copied out and prepared).
                let ms: Vec<AffineMatrix> = [(40, 4), (48, 4), (36, 3)]
                    .into_iter()
                    .enumerate()
                    .map(|(i, (rows, bits))| {
                        let mut m = matrix(rows, cols, bits, group, 7 + i as u64);
                        if lanes_apply(&m) {
                            m = stored_in_lanes(&m);
                        }
                        m.activations = act;
                        m
                    })
                    .collect();
                let isas: Vec<Isa> = if ms.iter().any(|m| m.lanes) {
                    vec![Isa::detect()]
                } else {
                    Isa::available()
                };
                for isa in isas {
                    let calls: Vec<(Weight, Input)> = ms
                        .iter()
                        .flat_map(|m| picks.iter().map(move |p| (m, p)))
                        .map(|(m, p)| {
                            let input = Input {
                                x: &x,
                                pick: Some(p),
                            };
                            (Weight::Affine(m), input)
                        })
                        .collect();
                    let got = matmul_new(isa, &calls);
                    for ((w, input), y) in calls.iter().zip(&got) {
                        let rows = input.gather(cols);
                        let want = matmul_new(isa, &[(*w, Input::all(&rows))]).remove(0);
                        let case =
                            format!("{isa:?}, {act:?}, {cols}/{group}, pick {:?}", input.pick);
                        assert_eq!(y, &want, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn many_jobs_in_one_region_equal_one_by_one() {
        // Five jobs prepare their inputs on the calling thread; 80 jobs of 6–9 tokens (pairs sharing an
        // input, as gate and up do) have more than `PARALLEL_PREPARE` values and prepare on the pool.
        // Also with rows stored in lanes where this CPU reads them so (row counts not multiples of sixteen).
        for (n, (lo, span), act, lanes) in [
            (5, (1, 2), Activations::F32, false),
            (80, (6, 4), Activations::F32, false),
            (80, (6, 4), Activations::Int8, false),
            (5, (1, 2), Activations::F32, true),
            (80, (6, 4), Activations::F32, true),
            (80, (6, 4), Activations::Int8, true),
        ] {
            let ms: Vec<AffineMatrix> = (0..n)
                .map(|i| {
                    let mut m = matrix(300 + i * 7, 256, 4, 64, i as u64);
                    if lanes && lanes_apply(&m) {
                        m = stored_in_lanes(&m);
                    }
                    m.activations = act;
                    m
                })
                .collect();
            let xs: Vec<Vec<f32>> = (0..n / 2)
                .map(|i| activations((lo + i % span) * 256))
                .collect();
            let values: usize = xs.iter().map(Vec::len).sum();
            assert_eq!(values >= PARALLEL_PREPARE, n > 5);
            let x_of = |i: usize| &xs[(i / 2).min(xs.len() - 1)];
            // NaN first: every output must be written.
            let mut ys: Vec<Vec<f32>> = (0..n)
                .map(|i| vec![f32::NAN; x_of(i).len() / 256 * ms[i].rows])
                .collect();
            let mut jobs: Vec<Job> = ys
                .iter_mut()
                .enumerate()
                .map(|(i, y)| Job {
                    w: Weight::Affine(&ms[i]),
                    x: x_of(i),
                    y,
                })
                .collect();
            matmul_many(Isa::detect(), &mut jobs);
            for (i, y) in ys.iter().enumerate() {
                let mut one = vec![0f32; y.len()];
                affine_matmul(&ms[i], x_of(i), &mut one);
                assert_eq!(&one, y, "{n} jobs, {act:?}, lanes {lanes}: job {i}");
            }
            // Into new outputs, after memory the allocator may hand out again was filled with NaN: every
            // value is written.
            drop(
                ys.iter()
                    .map(|y| vec![f32::NAN; y.len()])
                    .collect::<Vec<_>>(),
            );
            let calls: Vec<(Weight, Input)> = (0..n)
                .map(|i| (Weight::Affine(&ms[i]), Input::all(x_of(i))))
                .collect();
            assert_eq!(
                matmul_new(Isa::detect(), &calls),
                ys,
                "{n} jobs, {act:?}, lanes {lanes}"
            );
        }
    }
}
