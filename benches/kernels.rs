//! Quantized matmul kernels: GB/s of weights per bit width, activation path and instruction set, for one token
//! (decode) and for 8 tokens (a prefill slice routed to one expert); and one expert projection against 1–8
//! tokens, in GB/s of weights times tokens, stored as the loader stores it; and the int8 kernels' arithmetic
//! ceiling on x86 (`vpdpbusd`'s rate).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::quant::affine::AffineMatrix;
use engine::quant::kernels::{
    Activations, Isa, affine_matmul, affine_matmul_isa, lanes_apply, stored_in_lanes,
};

fn matrix(rows: usize, cols: usize, bits: u32) -> AffineMatrix {
    let mut s = 1u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    AffineMatrix::quantize(&w, rows, cols, bits, 64)
}

fn kernels(c: &mut Criterion) {
    // One Kimi-K2 expert projection (2048 × 7168) is 8 MB at 4 bits; this is a quarter of it.
    let (rows, cols) = (2048, 2048);
    for tokens in [1, 8] {
        let mut g = c.benchmark_group(format!("affine_matmul_t{tokens}"));
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| (i % 17) as f32 / 17.0 - 0.5)
            .collect();
        for bits in [2, 3, 4, 5, 6, 8] {
            let mlx = matrix(rows, cols, bits);
            g.throughput(Throughput::Bytes(mlx.weight_bytes() as u64));
            // AVX-512 reads the rows as the loader stores them: in lanes where its kernels take that layout.
            let laned = lanes_apply(&mlx).then(|| stored_in_lanes(&mlx));
            for isa in Isa::available() {
                let m = match (&laned, isa) {
                    (Some(l), Isa::Avx512 | Isa::Amx) => l,
                    _ => &mlx,
                };
                for act in [Activations::F32, Activations::Int8] {
                    let id = BenchmarkId::new(format!("{isa:?}-{act:?}"), format!("{bits}bit"));
                    let mut y = vec![0f32; tokens * rows];
                    g.bench_with_input(id, m, |b, m| {
                        b.iter(|| affine_matmul_isa(isa, m, &x, &mut y, act))
                    });
                }
            }
        }
        g.finish();
    }
    // One bench-shape expert projection (768 × 2048, 4-bit) against the 1–8 tokens a prefill routes to it,
    // stored as the loader stores it (in lanes where this CPU's kernels read that layout). Each call takes the
    // next of `n` experts, as a prefill does: one matrix called again and again on two threads measures mostly
    // its rows moving between the cores' L2 caches (the pool hands rows out dynamically). Eight experts (6 MB)
    // stay in a large last-level cache; 256 (200 MB) come from memory, as a prefill's do.
    for n in [8, 256] {
        let mut g = c.benchmark_group(format!("expert_768x2048_4bit_x{n}"));
        // Each expert in its own memory, quantized once for both activation paths.
        let mut experts: Vec<AffineMatrix> = (0..n)
            .map(|_| {
                let m = matrix(768, 2048, 4);
                if lanes_apply(&m) {
                    stored_in_lanes(&m)
                } else {
                    m
                }
            })
            .collect();
        for act in [Activations::F32, Activations::Int8] {
            experts.iter_mut().for_each(|m| m.activations = act);
            for tokens in [1, 2, 4, 8] {
                let x: Vec<f32> = (0..tokens * 2048)
                    .map(|i| (i % 13) as f32 / 13.0 - 0.5)
                    .collect();
                g.throughput(Throughput::Bytes(
                    (experts[0].weight_bytes() * tokens) as u64,
                ));
                let id = BenchmarkId::new(format!("{act:?}"), format!("t{tokens}"));
                let mut y = vec![0f32; tokens * 768];
                let mut call = 0;
                g.bench_function(id, |b| {
                    b.iter(|| {
                        call += 1;
                        affine_matmul(&experts[call % n], &x, &mut y)
                    })
                });
            }
        }
        g.finish();
    }
}

/// The int8 kernels' arithmetic ceiling on x86 with AVX-512 + VNNI: `vpdpbusd` on 512-bit registers in
/// twelve independent chains on one thread, in byte products per second (64 an instruction). The f32 path
/// takes three of them per weight and activation, the int8 path two (`benches/README.md`).
#[cfg(target_arch = "x86_64")]
fn ceiling(c: &mut Criterion) {
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
        return;
    }
    const ROUNDS: usize = 1 << 16;
    let mut g = c.benchmark_group("ceiling");
    g.throughput(Throughput::Elements((ROUNDS * 12 * 64) as u64));
    g.bench_function("vpdpbusd_zmm_one_thread", |b| {
        // SAFETY: the CPU has AVX-512F and VNNI (checked above).
        b.iter(|| unsafe { dpbusd_chains(ROUNDS, std::hint::black_box(3)) })
    });
    g.finish();
}

#[cfg(not(target_arch = "x86_64"))]
fn ceiling(_: &mut Criterion) {}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpbusd_chains(rounds: usize, v: i8) -> i32 {
    use std::arch::x86_64::*;
    let (w, x) = (_mm512_set1_epi8(v), _mm512_set1_epi8(v.wrapping_add(2)));
    let mut acc = [_mm512_setzero_si512(); 12];
    for _ in 0..rounds {
        for a in acc.iter_mut() {
            *a = _mm512_dpbusd_epi32(*a, w, x);
        }
    }
    _mm512_reduce_add_epi32(
        acc.iter()
            .fold(_mm512_setzero_si512(), |s, a| _mm512_add_epi32(s, *a)),
    )
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_millis(800));
    targets = kernels, ceiling
}
criterion_main!(benches);
