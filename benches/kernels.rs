//! Quantized matmul kernels: GB/s of weights per bit width, activation path and instruction set, for one token
//! (decode) and for 8 tokens (a prefill slice routed to one expert); and one expert projection against 1–8
//! tokens, in GB/s of weights times tokens.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::quant::affine::AffineMatrix;
use engine::quant::kernels::{Activations, Isa, affine_matmul_isa};

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
            let m = matrix(rows, cols, bits);
            g.throughput(Throughput::Bytes(m.weight_bytes() as u64));
            for isa in Isa::available() {
                for act in [Activations::F32, Activations::Int8] {
                    let id = BenchmarkId::new(format!("{isa:?}-{act:?}"), format!("{bits}bit"));
                    let mut y = vec![0f32; tokens * rows];
                    g.bench_with_input(id, &m, |b, m| {
                        b.iter(|| affine_matmul_isa(isa, m, &x, &mut y, act))
                    });
                }
            }
        }
        g.finish();
    }
    // One bench-shape expert projection (768 × 2048, 4-bit) against the 1–8 tokens a prefill routes to it. Each
    // call takes the next of eight experts, as a prefill does: one matrix called again and again on two threads
    // measures mostly its rows moving between the cores' L2 caches (the pool hands rows out dynamically).
    let experts: Vec<AffineMatrix> = (0..8).map(|_| matrix(768, 2048, 4)).collect();
    let mut g = c.benchmark_group("expert_768x2048_4bit");
    for tokens in [1, 2, 4, 8] {
        let x: Vec<f32> = (0..tokens * 2048)
            .map(|i| (i % 13) as f32 / 13.0 - 0.5)
            .collect();
        g.throughput(Throughput::Bytes(
            (experts[0].weight_bytes() * tokens) as u64,
        ));
        for act in [Activations::F32, Activations::Int8] {
            let id = BenchmarkId::new(format!("{act:?}"), format!("t{tokens}"));
            let mut y = vec![0f32; tokens * 768];
            let mut call = 0;
            g.bench_function(id, |b| {
                b.iter(|| {
                    call += 1;
                    let m = &experts[call % experts.len()];
                    affine_matmul_isa(Isa::detect(), m, &x, &mut y, act)
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_millis(800));
    targets = kernels
}
criterion_main!(benches);
