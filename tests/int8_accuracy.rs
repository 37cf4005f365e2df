//! The int8-activation path against the mlx-lm oracle: within 0.05 max abs of the reference logits, and the
//! reference's top-1 token kept wherever its margin over the top-2 exceeds 0.1. (The f32 path's 1e-3 is
//! checked in `oracle_logits.rs`.)

mod common;
use common::*;
use engine::generate::argmax;
use engine::model::Model;
use engine::model::linear::Linear;
use engine::quant::kernels::{Activations, Isa};
use engine::weights::{LoadOptions, QuantizeTo, Weights};

const TOLERANCE: f32 = 0.05;
const MARGIN: f32 = 0.1;

fn check_row(got: &[f32], want: &[f32], what: &str) -> f32 {
    let d = max_abs_diff(got, want);
    assert!(d <= TOLERANCE, "{what}: off by {d}");
    let top = argmax(want) as usize;
    let second = want
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != top)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    if want[top] - second > MARGIN {
        assert_eq!(
            argmax(got) as usize,
            top,
            "{what}: top-1 changed (margin {})",
            want[top] - second
        );
    }
    d
}

fn check(model_dir: std::path::PathBuf, reference: &str, key: &str) {
    let opts = LoadOptions {
        activations: Activations::Int8,
        ..LoadOptions::default()
    };
    let w = Weights::open_with(&model_dir, opts).unwrap();
    let model = Model::load(&w, |_| {}).unwrap();
    let r = json(&fixture(reference));
    let worst = for_reference_rows(&model, &r[key], key, check_row);
    eprintln!("{key}: int8 path max |Δ| = {worst:.4}");
}

#[test]
fn tiny_mlx_mixed() {
    check(
        fixture("tiny-kimi-mlx-mixed"),
        "tiny-kimi-logits-reference.json",
        "mlx_mixed",
    );
}

#[test]
fn mlx_bits_and_groups_per_module() {
    check(
        fixture("variant-bits-groups/model"),
        "variant-bits-groups/logits-reference.json",
        "mlx_mixed",
    );
}

#[test]
fn mla_dimensions_without_a_dense_layer() {
    check(
        fixture("variant-mla-dims/model"),
        "variant-mla-dims/logits-reference.json",
        "mlx_mixed",
    );
}

// Not checked here: the `variant-qproj-groups` fixture (f32 path: `oracle_logits.rs`). Its random router
// keeps 2 of 4 expert groups, and on the reference prompt two group scores come within 1.6e-4 of each other,
// below the int8 path's error on the hidden state. Which group wins then depends on rounding order alone:
// the scalar and AVX2 int8 paths keep the oracle's groups (0.001 from it), the AVX-512 one (each matmul
// within 2e-6 of the scalar int8 path) keeps the other and lands 0.85 off on one row.

#[test]
fn story_mlx_mixed() {
    check(
        story_model(),
        "tiny-kimi-story-logits-reference.json",
        "mlx_mixed",
    );
}

/// `--quantize q4 --activations int8` on the bf16 fixture: on AVX-512 + VNNI the matrices the kernels apply
/// whole (the MLPs', the attention's projections, `lm_head`) are stored in lanes at load, for f32 activations
/// too; `kv_b_proj` (cut per head) and the embedding (read by rows) are not. The int8 path stays within
/// the bound of the f32 path on the same quantized weights, prefill and decode.
#[test]
fn quantized_at_load_stored_in_lanes() {
    let open = |activations| {
        let opts = LoadOptions {
            activations,
            quantize: Some(QuantizeTo::Q4),
            ..LoadOptions::default()
        };
        Weights::open_with(&fixture("tiny-kimi-bf16"), opts).unwrap()
    };
    let (exact, fast) = (open(Activations::F32), open(Activations::Int8));
    let lanes = |w: &Weights, module: &str, rows, cols| match w.matrix(module, rows, cols).unwrap()
    {
        Linear::Affine(m) => m.lanes,
        _ => panic!("{module}: not quantized"),
    };
    // f32 activations too (as three int8 slices).
    let vnni = matches!(Isa::detect(), Isa::Avx512 | Isa::Amx);
    assert_eq!(lanes(&fast, "model.layers.0.mlp.gate_proj", 256, 128), vnni);
    assert_eq!(
        lanes(&exact, "model.layers.0.mlp.gate_proj", 256, 128),
        vnni
    );
    assert_eq!(
        lanes(&fast, "model.layers.0.self_attn.o_proj", 128, 256),
        vnni
    );
    assert_eq!(
        lanes(&fast, "model.layers.0.self_attn.q_a_proj", 64, 128),
        vnni
    );
    assert_eq!(lanes(&exact, "lm_head", 1280, 128), vnni);
    assert!(!lanes(&fast, "model.layers.0.self_attn.kv_b_proj", 512, 64));
    assert!(!lanes(&fast, "model.embed_tokens", 1280, 128));

    let (exact, fast) = (
        Model::load(&exact, |_| {}).unwrap(),
        Model::load(&fast, |_| {}).unwrap(),
    );
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 900).collect();
    let (mut ce, mut cf) = (exact.new_cache().unwrap(), fast.new_cache().unwrap());
    let rows =
        |m: &Model, c| -> Vec<Vec<f32>> { m.logits(&prompt, c, true).unwrap().to_vec2().unwrap() };
    let (want, got) = (rows(&exact, &mut ce), rows(&fast, &mut cf));
    let mut worst = 0f32;
    for (w, g) in want.iter().zip(&got) {
        worst = worst.max(check_row(g, w, "q4 prefill"));
    }
    for id in [3, 141, 59, 26] {
        let (w, g) = (
            next_logits(&exact, id, &mut ce),
            next_logits(&fast, id, &mut cf),
        );
        worst = worst.max(check_row(&g, &w, "q4 decode"));
    }
    eprintln!("q4: int8 path max |Δ| from f32 = {worst:.4}");
}
