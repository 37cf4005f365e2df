//! One MoE layer (one token, and a 64-token prompt), a decode step and a 64-token prefill of the bench-shape model (Kimi-K2's structure scaled down: hidden 2048,
//! 128 experts top-8, 4-bit). A two-layer checkpoint is synthesized into a temporary directory first.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::model::Model;
use engine::quant::kernels::Activations;
use engine::synth::{self, Shape, SynthOptions};
use engine::weights::{LoadOptions, Weights};
use std::path::Path;

fn model(dir: &Path, activations: Activations) -> Model {
    let w = Weights::open_with(
        dir,
        LoadOptions {
            activations,
            ..LoadOptions::default()
        },
    )
    .expect("synthesized model opens");
    Model::load(&w, |_| {}).expect("synthesized model loads")
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let o = SynthOptions {
        shape: Shape::Bench,
        layers: Some(2),
        experts: None,
        bits: 4,
        group: 64,
        seed: 3,
    };
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/tiny-kimi-story");
    synth::write(dir.path(), &o, &tok, |_| {}).expect("synthesizing the bench model");

    for act in [Activations::F32, Activations::Int8] {
        let m = model(dir.path(), act);
        // Layer 1 is a MoE layer: router, 8 routed experts and the shared expert for one token.
        let layer = &m.layers[1];
        let x = m.head.embed(&[17]).expect("embedding");
        let mut g = c.benchmark_group(format!("{act:?}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("moe_layer_1_token", |b| {
            b.iter(|| layer.ffn.forward(&x).expect("moe forward"))
        });
        // A 64-token prompt: ~4 tokens per expert, the batch `kimi-actors bench` prefills.
        let prompt: Vec<u32> = (0..64).map(|i| (i * 7919 + 13) % 30000).collect();
        let xs = m.head.embed(&prompt).expect("embedding");
        g.bench_function("moe_layer_64_tokens", |b| {
            b.iter(|| layer.ffn.forward(&xs).expect("moe forward"))
        });
        g.bench_function("prefill_64_tokens_2_layers", |b| {
            b.iter(|| {
                let mut cache = m.new_cache().expect("cache");
                m.step(&prompt, &mut cache, false).expect("prefill")
            })
        });
        g.bench_function("decode_step_2_layers", |b| {
            let mut cache = m.new_cache().expect("cache");
            m.step(&[1, 2, 3, 4], &mut cache, false).expect("prefill");
            b.iter(|| {
                if cache.len() > 512 {
                    cache = m.new_cache().expect("cache");
                }
                m.step(&[5], &mut cache, false).expect("decode step")
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = model_benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(model_benches);
