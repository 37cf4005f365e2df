//! Logits against mlx-lm (float32) on every checkpoint format and layout: within 1e-3 max abs.

mod common;
use common::*;

fn check(model_dir: std::path::PathBuf, reference: &str, key: &str) {
    let model = load_model(&model_dir);
    let r = json(&fixture(reference));
    let worst = check_reference_logits(&model, &r[key], key);
    eprintln!("{}: max |Δ| = {worst:.2e}", model_dir.display());
}

#[test]
fn bf16_hf_layout() {
    check(
        fixture("tiny-kimi-bf16"),
        "tiny-kimi-logits-reference.json",
        "bf16",
    );
}

#[test]
fn fp8_block_quant() {
    check(
        fixture("tiny-kimi-fp8"),
        "tiny-kimi-logits-reference.json",
        "fp8",
    );
}

#[test]
fn mlx_mixed_bits() {
    check(
        fixture("tiny-kimi-mlx-mixed"),
        "tiny-kimi-logits-reference.json",
        "mlx_mixed",
    );
}

#[test]
fn plain_q_proj_and_group_limited_routing() {
    check(
        fixture("variant-qproj-groups/model"),
        "variant-qproj-groups/logits-reference.json",
        "mlx_mixed",
    );
}

/// 2-, 3-, 5-, 6- and 8-bit modules in groups of 32, 64 and 128 (the fixture's `logits-reference.json` names them).
#[test]
fn mlx_bits_and_groups_per_module() {
    check(
        fixture("variant-bits-groups/model"),
        "variant-bits-groups/logits-reference.json",
        "mlx_mixed",
    );
}

/// DeepSeek-V3's attention dimensions (`kv_lora_rank` 512, `qk_nope_head_dim` 128, `qk_rope_head_dim` 64,
/// `v_head_dim` 128) at a hidden size of 192, every layer MoE (`first_k_dense_replace` 0), two shared experts,
/// no rope scaling; 2-, 3-, 5- and 6-bit modules (the fixture's `logits-reference.json` names them).
#[test]
fn mla_dimensions_without_a_dense_layer() {
    check(
        fixture("variant-mla-dims/model"),
        "variant-mla-dims/logits-reference.json",
        "mlx_mixed",
    );
}

#[test]
fn story_bf16_mlx_layout() {
    check(
        fixture("tiny-kimi-story-bf16"),
        "tiny-kimi-story-logits-reference.json",
        "bf16_mlx_layout",
    );
}

#[test]
fn story_mlx_mixed_bundled() {
    check(
        story_model(),
        "tiny-kimi-story-logits-reference.json",
        "mlx_mixed",
    );
}

/// The same weights read in place from the mapped files (`--map-weights`) instead of resident copies.
#[test]
fn mlx_mixed_bits_mapped_in_place() {
    use engine::weights::{LoadOptions, Weights};
    let opts = LoadOptions {
        map_weights: true,
        ..LoadOptions::default()
    };
    let w =
        Weights::open_with(&fixture("tiny-kimi-mlx-mixed"), opts).unwrap_or_else(|e| panic!("{e}"));
    let model = engine::model::Model::load(&w, |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let r = json(&fixture("tiny-kimi-logits-reference.json"));
    check_reference_logits(&model, &r["mlx_mixed"], "mlx_mixed mapped");
}
