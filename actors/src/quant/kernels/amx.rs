//! AMX tiles for f32 activations of several tokens (`AMX_TOKENS` or more) against 4-bit rows (2- and 3-bit
//! rows widened to 4 bits) in groups of 64 or 128: x86-64 with AMX-TILE and AMX-BF16 (Sapphire Rapids and later), on Linux,
//! where the process asks the kernel for the tile state once.
//!
//! `tdpbf16ps` multiplies pairs of bf16 values and adds the products into f32 sums. The codes 0..15 are
//! exact in bf16, and each f32 activation is split into three bf16 parts whose sum is exactly it
//! (`x = x₁ + x₂ + x₃`, each part the bf16 nearest to what the earlier ones left), so every product is exact
//! and only f32 sums round, as on the f32 path elsewhere.
//!
//! Per 64-code chunk (a group of 64, or half a group of 128), in the 4-bit kernels' chunk order (the low
//! nibbles, then the high ones):
//! - `A` tiles: sixteen rows' codes as bf16, 32 per row: one tile for the low nibbles, one for the high;
//! - `B` tiles ([`prepare`]): the activations, sixteen columns of 32 values (as bf16 pairs): five tokens'
//!   three parts side by side, so one tile product serves five tokens;
//! - each tile product `C = A·B` (rows × columns) leaves the tile scaled by its rows' group scales and is
//!   added to per-thread sums; a token's three parts are added at the end, with the bias term `bias · Σx`.

use super::aligned::Aligned;
use super::{Out, Prepared, store};
use crate::quant::affine::AffineMatrix;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows of a tile: rows of weights per `A` tile, pairs of values per `B` tile.
const ROWS: usize = 16;
/// Tokens per `B` tile: sixteen columns hold five tokens' three parts (the last column is zero).
pub(super) const TOKENS_PER_TILE: usize = 5;
/// 32-bit values in a tile (16 rows of 64 bytes).
const TILE: usize = 256;

/// Whether this CPU has AMX tiles with bf16 products and the kernel lets this process use them (asked once).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !super::x86::has_avx512() {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = __cpuid_count(7, 0).edx;
        edx >> 22 & 1 == 1 && edx >> 24 & 1 == 1 && request_tiles()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without it
/// the first tile instruction faults.
#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// `ldtilecfg`'s 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0 and 1, or 6 and 7 (alternately): `A` (low and high nibbles); 2 and 3: `B` (the same); 4 or 5
/// (alternately): `C`. Each 16 rows of 64 bytes.
static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

// The tile instructions. Rust has no stable intrinsics for them; the assembler knows them. Each block may
// read or write memory as its operands say, and they stay in program order (none is `pure`).

#[inline(always)]
unsafe fn tile_config(cfg: &TileConfig) {
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg, options(nostack, readonly)) };
}

#[inline(always)]
unsafe fn tile_release() {
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Tile `T` ← 16 rows of 64 bytes from `p`, 64 bytes apart.
#[inline(always)]
unsafe fn tile_load<const T: u8>(p: *const u32) {
    unsafe {
        asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) 64usize,
            options(nostack, readonly))
    };
}

/// Tile `T` → 16 rows of 64 bytes at `p`.
#[inline(always)]
unsafe fn tile_store<const T: u8>(p: *mut f32) {
    unsafe {
        asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) 64usize,
            options(nostack))
    };
}

#[inline(always)]
unsafe fn tile_zero<const T: u8>() {
    unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) };
}

/// `C += A · B` over bf16 pairs, f32 sums.
#[inline(always)]
unsafe fn tile_dot<const C: u8, const A: u8, const B: u8>() {
    unsafe {
        asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
            options(nostack, nomem))
    };
}

/// Sixteen f32 values rounded to bf16 (to nearest, ties to even), in the low half of each lane, and what
/// they leave (`v` minus the rounded values, exact).
#[inline]
#[target_feature(enable = "avx512f")]
fn bf16_part(v: __m512) -> (__m512i, __m512) {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd),
        _mm512_set1_epi32(0xffff_0000u32 as i32),
    );
    let left = _mm512_sub_ps(v, _mm512_castsi512_ps(rounded));
    (_mm512_srli_epi32::<16>(rounded), left)
}

/// The `B` tiles of permuted f32 activations `xf` (`[tokens, cols]`, `cols` a multiple of 64): for block `b`
/// of [`TOKENS_PER_TILE`] tokens, chunk `c`, half `h` (low nibbles' values, then high), tile
/// `(b · chunks + c) · 2 + h`, whose row `k` column `3·i + p` holds part `p` of token `5b + i`'s values
/// `2k` and `2k + 1` of that half, as a bf16 pair.
///
/// # Safety
/// Needs AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn prepare(xf: &[f32], tokens: usize, cols: usize) -> Aligned<u32> {
    assert!(cols.is_multiple_of(64) && xf.len() == tokens * cols);
    let (chunks, blocks) = (cols / 64, tokens.div_ceil(TOKENS_PER_TILE));
    let mut xb = Aligned::<u32>::zeroed(blocks * chunks * 2 * TILE);
    // Word `2i` of the 64 words of two registers: each lane's bf16, the lanes paired in order.
    let pairs = _mm512_set_epi16(
        62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18,
        16, 14, 12, 10, 8, 6, 4, 2, 0,
    );
    for b in 0..blocks {
        let t0 = b * TOKENS_PER_TILE;
        let n = (tokens - t0).min(TOKENS_PER_TILE);
        for c in 0..chunks {
            for h in 0..2 {
                // Column `3i + p`: 16 pairs (token t0 + i, part p); the tile is their transpose.
                let mut columns = [_mm512_setzero_ps(); 16];
                for i in 0..n {
                    let at = (t0 + i) * cols + 64 * c + 32 * h;
                    // SAFETY: `at + 32 <= xf.len()`.
                    let (mut lo, mut hi) = unsafe {
                        (
                            _mm512_loadu_ps(xf.as_ptr().add(at)),
                            _mm512_loadu_ps(xf.as_ptr().add(at + 16)),
                        )
                    };
                    for p in 0..3 {
                        let (bl, rl) = bf16_part(lo);
                        let (bh, rh) = bf16_part(hi);
                        (lo, hi) = (rl, rh);
                        columns[3 * i + p] =
                            _mm512_castsi512_ps(_mm512_permutex2var_epi16(bl, pairs, bh));
                    }
                }
                let tile = ((b * chunks + c) * 2 + h) * TILE;
                for (k, row) in super::x86::transpose16(columns).into_iter().enumerate() {
                    // SAFETY: row `k` of tile `tile`, inside `xb`.
                    unsafe {
                        _mm512_storeu_ps(xb.as_mut_ptr().add(tile + 16 * k) as *mut f32, row)
                    };
                }
            }
        }
    }
    xb
}

/// The bf16 values of the codes: word `i` is `i mod 16` (a word's low five bits pick it, so a byte's high
/// nibble above its low one does not matter).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn code_words() -> __m512i {
    let w: [u16; 32] = std::array::from_fn(|i| (((i % 16) as f32).to_bits() >> 16) as u16);
    // SAFETY: 64 bytes.
    unsafe { _mm512_loadu_si512(w.as_ptr() as *const _) }
}

/// Chunk `c` of the rows at `codes` (32 bytes each) as the two `A` tiles at `a`: the low nibbles' bf16
/// values, then the high ones'.
///
/// # Safety
/// Each row has bytes `32c..32c + 32`; `a` has room for two tiles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack(codes: &[*const u8], c: usize, a: *mut u32, words: __m512i) {
    for (i, p) in codes.iter().enumerate() {
        unsafe {
            let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(32 * c) as *const _));
            let lo = _mm512_permutexvar_epi16(w, words);
            let hi = _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(w), words);
            _mm512_storeu_si512(a.add(16 * i) as *mut _, lo);
            _mm512_storeu_si512(a.add(TILE + 16 * i) as *mut _, hi);
        }
    }
}

/// Adds the `C` tile copy at `cb`, row `i` scaled by `scales[at + i·gpr]`, to tile `b` of `sums`.
///
/// # Safety
/// `cb` holds a tile, `sums` tile `b`; `scales` has `at + 15·gpr + 1` values.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scale_into(
    sums: *mut f32,
    cb: *const f32,
    scales: &[f32],
    gpr: usize,
    (b, at): (usize, usize),
) {
    debug_assert!(scales.len() > at + (ROWS - 1) * gpr);
    for i in 0..ROWS {
        unsafe {
            let sums = sums.add(b * TILE);
            let sc = _mm512_set1_ps(*scales.get_unchecked(at + i * gpr));
            let cv = _mm512_loadu_ps(cb.add(16 * i));
            let acc = _mm512_loadu_ps(sums.add(16 * i));
            _mm512_storeu_ps(sums.add(16 * i), _mm512_fmadd_ps(cv, sc, acc));
        }
    }
}

/// `C` tile `p % 2` (product `p`'s) to buffer `p % 2` at `cb`; nothing for `p = usize::MAX` (none yet).
///
/// # Safety
/// The tiles are configured; `cb` holds two tiles.
#[inline(always)]
unsafe fn store_tile(cb: *mut f32, p: usize) {
    unsafe {
        match p {
            usize::MAX => {}
            p if p % 2 == 0 => tile_store::<4>(cb),
            _ => tile_store::<5>(cb.add(TILE)),
        }
    }
}

/// Lines `lines` (64 bytes each) of `bytes` into L2, those that exist.
#[inline(always)]
fn prefetch_l2(bytes: &[u8], lines: std::ops::Range<usize>) {
    for j in lines.take_while(|j| j * 64 < bytes.len()) {
        // SAFETY: inside `bytes`; a prefetch only hints.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(64 * j) as *const i8) };
    }
}

/// Per-thread buffers: `A` tiles, the `C` tile's copy, sums, scales, biases, widened rows, `Σx` transposed.
struct Scratch {
    a: Aligned<u32>,
    c: Aligned<f32>,
    sums: Aligned<f32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    widened: Vec<u8>,
    xsum: Aligned<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// `B` tile blocks per group of tokens (65 tokens): longer prompts go through the rows again for each group, so
/// a chunk's `B` tiles (26 KB) stay near while a pass's row blocks meet them.
const GROUP_BLOCKS: usize = 13;

/// Sums per thread, at most, that a pass over rows keeps (16 rows × 16 columns per row block and `B` tile
/// block): the rows of a pass are as many blocks as fit, so the sums stay in L1 while the chunks go by. Four
/// tiles make passes of 64 rows for five tokens or fewer: with sixteen (256 rows) 5 and 8 tokens were 5–16 %
/// slower, experts in L2 or in DRAM alike (two threads, 768×2048, 2048×768, 2048×2048), as each pass's codes
/// must reach L2 before it starts (see `f32_rows`); at 64 tokens the two are the same.
const SUMS_PER_PASS: usize = 4 * TILE;

/// Rows `rows` of `m` (4-bit, or 2/3-bit widened to 4 bits; groups of 64 or 128) against all of `px`'s
/// tokens through its `B` tiles ([`Prepared::xb`]). The rows go in passes of a few blocks of sixteen; in a
/// pass, chunk after chunk, each block's codes become `A` tiles and meet the chunk's `B` tiles, which stay
/// in tile registers (five tokens or fewer) or in L1 for all the pass's blocks. A last block of fewer than
/// sixteen rows repeats its last row, whose extra results are not stored.
///
/// # Safety
/// Needs AVX-512 F/BW and [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn f32_rows(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
) {
    let (chunks, gpr, per_group) = (m.cols / 64, m.groups_per_row(), m.group / 64);
    let (tokens, all_blocks) = (px.tokens, px.tokens.div_ceil(TOKENS_PER_TILE));
    debug_assert_eq!(px.xb.len(), all_blocks * chunks * 2 * TILE);
    let blocks = all_blocks.min(GROUP_BLOCKS);
    let (half, rb) = (m.cols / 2, m.row_bytes());
    let pass_blocks = (SUMS_PER_PASS / (blocks * TILE)).clamp(1, rows.len().div_ceil(ROWS));
    let pass_rows = pass_blocks * ROWS;
    let mut s = SCRATCH.with(|c| c.take()).unwrap_or_else(|| Scratch {
        a: Aligned::zeroed(4 * TILE),
        c: Aligned::zeroed(2 * TILE),
        sums: Aligned::zeroed(0),
        scales: Vec::new(),
        biases: Vec::new(),
        widened: Vec::new(),
        xsum: Aligned::zeroed(0),
    });
    if s.sums.len() < pass_blocks * blocks * TILE {
        s.sums = Aligned::zeroed(pass_blocks * blocks * TILE);
    }
    s.scales.resize(pass_rows * gpr, 0.0);
    s.biases.resize(pass_rows * gpr, 0.0);
    if m.bits != 4 {
        s.widened.resize(pass_rows * half, 0);
    }
    // `Σx` per group, `[gpr, tokens]` padded to sixteens: the bias terms of a row for sixteen tokens at once.
    let tv = tokens.div_ceil(16);
    if s.xsum.len() < gpr * tv * 16 {
        s.xsum = Aligned::zeroed(gpr * tv * 16);
    }
    for t in 0..tokens {
        for (g, v) in px.xsum_of(t).iter().enumerate() {
            s.xsum[g * tv * 16 + t] = *v;
        }
    }
    let words = code_words();
    let mut codes: Vec<*const u8> = Vec::with_capacity(pass_rows);
    // SAFETY: `available()` (the caller's precondition); the configuration is static.
    unsafe { tile_config(&CONFIG) };
    // A pass meets its rows a chunk at a time, dozens of rows side by side: too many streams for the hardware
    // prefetchers, and software prefetches into L1 are capped by its few line-fill buffers. So the codes go to
    // L2 in address order: the first pass's here, each next pass's during the one before it. With this and
    // passes of 64 rows, 200 experts from DRAM, two threads, against the AVX-512 kernels in the same process:
    // 768×2048 at 5, 6, 8, 12 tokens 0.86, 0.88, 1.15, 1.45 → 1.16, 1.09, 1.51, 1.62 times as fast; 2048×768
    // 0.85, 0.75, 0.92, 1.19 → 1.11, 1.00, 1.22, 1.51.
    let codes_of = |p0: usize| match m.bits {
        4 => &m.packed[p0 * rb..(p0 + pass_rows).min(rows.end) * rb],
        _ => &[],
    };
    let head = codes_of(rows.start);
    prefetch_l2(head, 0..head.len().div_ceil(64));
    for p0 in rows.clone().step_by(pass_rows) {
        let p1 = (p0 + pass_rows).min(rows.end);
        let n = p1 - p0;
        let nb = n.div_ceil(ROWS);
        m.rows_scales(p0..p1, &mut s.scales[..n * gpr], &mut s.biases[..n * gpr]);
        if m.bits != 4 {
            for i in 0..n {
                let r = p0 + i;
                super::x86::widen_nibbles(
                    &m.packed[r * rb..(r + 1) * rb],
                    m.bits,
                    &mut s.widened[i * half..(i + 1) * half],
                );
            }
        }
        // Each block's sixteen rows; past the last row, the last row again.
        codes.clear();
        codes.extend((0..nb * ROWS).map(|i| match m.bits {
            4 => m.packed[(p0 + i.min(n - 1)) * rb..].as_ptr(),
            _ => s.widened[i.min(n - 1) * half..].as_ptr(),
        }));
        // Rows `p0..p1` against token blocks `tb0..tb0 + blocks`, a group at a time.
        for tb0 in (0..all_blocks).step_by(GROUP_BLOCKS) {
            let blocks = (all_blocks - tb0).min(GROUP_BLOCKS);
            s.sums[..nb * blocks * TILE].fill(0.0);
            let (a, cb, sums) = (s.a.as_mut_ptr(), s.c.as_mut_ptr(), s.sums.as_mut_ptr());
            // Software pipeline over the items (chunk, block): the `A` tiles of the next item are unpacked while
            // this one's products run, and each `C` tile is read back one product later, from alternating tiles
            // and buffers (a tile load right after the vector stores it reads, or vector loads right after the
            // tile store, wait for those stores to finish).
            let row_codes = |k: usize| -> (&[*const u8], usize) {
                let (c, b) = (k / nb, k % nb);
                (&codes[b * ROWS..(b + 1) * ROWS], c)
            };
            let (first, c0) = row_codes(0);
            // SAFETY: `a` holds two pairs of `A` tiles; rows have bytes `32c..32c + 32` for every chunk.
            unsafe { unpack(first, c0, a, words) };
            let (items, mut product) = (chunks * nb, 0usize);
            // The next pass's codes, a few lines per item (the first group of tokens only).
            let ahead = if tb0 == 0 { codes_of(p1) } else { &[] };
            let per_item = ahead.len().div_ceil(64).div_ceil(items);
            // Per `C` buffer, the product waiting to be added: (sums tile, offset of its rows' scales).
            let mut queue: [Option<(usize, usize)>; 2] = [None, None];
            for k in 0..items {
                let (c, b) = (k / nb, k % nb);
                let g = c / per_group;
                // SAFETY: the tiles are configured; every tile pointer below is 16 rows of 64 bytes; the
                // prefetches only hint.
                unsafe {
                    let at = a.add((k % 2) * 2 * TILE);
                    if k % 2 == 0 {
                        tile_load::<0>(at);
                        tile_load::<1>(at.add(TILE));
                    } else {
                        tile_load::<6>(at);
                        tile_load::<7>(at.add(TILE));
                    }
                    if k + 1 < items {
                        let (next, cn) = row_codes(k + 1);
                        unpack(next, cn, a.add(((k + 1) % 2) * 2 * TILE), words);
                    }
                    prefetch_l2(ahead, k * per_item..(k + 1) * per_item);
                    if m.bits == 4 && c % 2 == 0 {
                        // Four 64-byte lines ahead in each row.
                        for p in &codes[b * ROWS..(b + 1) * ROWS] {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(32 * c + 256) as *const i8);
                        }
                    }
                    for t in 0..blocks {
                        // Product `p` into `C` tile `p % 2`; then `p - 1`'s tile to its buffer; then `p - 2`'s
                        // buffer into the sums (tile instructions run in order: a store right after its products
                        // would hold up the next ones).
                        let p = product;
                        product += 1;
                        // Five tokens or fewer: the chunk's `B` tiles load once for all blocks of the pass.
                        if blocks > 1 || b == 0 {
                            let bt = px.xb[(((tb0 + t) * chunks + c) * 2) * TILE..].as_ptr();
                            tile_load::<2>(bt);
                            tile_load::<3>(bt.add(TILE));
                        }
                        match (p % 2, k % 2) {
                            (0, 0) => {
                                tile_zero::<4>();
                                tile_dot::<4, 0, 2>();
                                tile_dot::<4, 1, 3>();
                            }
                            (0, _) => {
                                tile_zero::<4>();
                                tile_dot::<4, 6, 2>();
                                tile_dot::<4, 7, 3>();
                            }
                            (_, 0) => {
                                tile_zero::<5>();
                                tile_dot::<5, 0, 2>();
                                tile_dot::<5, 1, 3>();
                            }
                            _ => {
                                tile_zero::<5>();
                                tile_dot::<5, 6, 2>();
                                tile_dot::<5, 7, 3>();
                            }
                        }
                        store_tile(cb, p.wrapping_sub(1));
                        if let Some(e) = queue[p % 2].take() {
                            scale_into(sums, cb.add((p % 2) * TILE), &s.scales, gpr, e);
                        }
                        queue[p % 2] = Some((b * blocks + t, b * ROWS * gpr + g));
                    }
                }
            }
            // The last two products.
            unsafe {
                store_tile(cb, product.wrapping_sub(1));
                for p in [product, product + 1] {
                    if let Some(e) = queue[p % 2].take() {
                        scale_into(sums, cb.add((p % 2) * TILE), &s.scales, gpr, e);
                    }
                }
            }
            let t0 = tb0 * TOKENS_PER_TILE;
            let t1 = (t0 + blocks * TOKENS_PER_TILE).min(tokens);
            finish(m, out, &s, (p0..p1, t0..t1), (tv, blocks));
        }
    }
    // SAFETY: as above.
    unsafe { tile_release() };
    SCRATCH.with(|c| c.set(Some(s)));
}

/// Rows `rows` (a pass) of tokens `tokens` (a group) to `out`: each token's three parts and its bias term
/// `Σ_g bias_g · Σx_g`, the latter for sixteen rows and sixteen tokens at a time.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn finish(
    m: &AffineMatrix,
    out: &Out,
    s: &Scratch,
    (rows, tokens): (std::ops::Range<usize>, std::ops::Range<usize>),
    (tv, blocks): (usize, usize),
) {
    let gpr = m.groups_per_row();
    for b in 0..rows.len().div_ceil(ROWS) {
        let n = (rows.len() - b * ROWS).min(ROWS);
        // Rows past the pass's last hold stale biases: their sums are not stored.
        let biases = &s.biases[b * ROWS * gpr..(b + 1) * ROWS * gpr];
        for v in tokens.start / 16..tokens.end.div_ceil(16) {
            let mut acc = [_mm512_setzero_ps(); ROWS];
            for g in 0..gpr {
                // SAFETY: `(g·tv + v)·16 + 16 <= s.xsum.len()`.
                let x = unsafe { _mm512_loadu_ps(s.xsum.as_ptr().add((g * tv + v) * 16)) };
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(biases[i * gpr + g]), x, *a);
                }
            }
            let mut bias = [[0f32; 16]; ROWS];
            for (d, a) in bias.iter_mut().zip(acc) {
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(d.as_mut_ptr(), a) };
            }
            for t in (16 * v).max(tokens.start)..(16 * v + 16).min(tokens.end) {
                let tb = (t - tokens.start) / TOKENS_PER_TILE;
                let at = (b * blocks + tb) * TILE + 3 * (t % TOKENS_PER_TILE);
                for (i, bias) in bias.iter().enumerate().take(n) {
                    let p = &s.sums[at + 16 * i..][..3];
                    let r = rows.start + b * ROWS + i;
                    store(out, m.rows, r, t, p[0] + p[1] + p[2] + bias[t - 16 * v]);
                }
            }
        }
    }
}
