//! Random-weight MLX-affine checkpoints of a given shape, for dry runs and benchmarks: config.json, one
//! safetensors shard per layer (plus one for embedding, norm and lm_head) with an index, and the tokenizer
//! files of a source model. Weights are random codes with scales and biases spanning `±√(3/in)`, as
//! `make_bench_model.py` writes them; the text they produce is meaningless.

use crate::error::{Error, Result};
use serde_json::{Value, json};
use std::io::{BufWriter, Write};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The shape of the tiny test fixtures (4 layers, 16 experts, hidden 128).
    Tiny,
    /// The benchmark model: Kimi-K2's structure scaled down (8 layers, 128 experts, hidden 2048; 2.4 GB at 4 bits).
    Bench,
    /// Kimi-K2 itself (61 layers, 384 experts, hidden 7168; about 550 GB at 4 bits).
    KimiK2,
}

pub struct SynthOptions {
    pub shape: Shape,
    pub layers: Option<usize>,
    pub experts: Option<usize>,
    pub bits: u32,
    pub group: usize,
    pub seed: u64,
}

/// The config.json of a shape, with overrides applied.
pub fn config(o: &SynthOptions) -> Value {
    let mut c = match o.shape {
        Shape::Tiny => json!({
            "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "n_routed_experts": 16, "num_experts_per_tok": 4, "q_lora_rank": 64,
            "kv_lora_rank": 64, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "vocab_size": 2304
        }),
        Shape::Bench => json!({
            "hidden_size": 2048, "intermediate_size": 4096, "moe_intermediate_size": 768, "num_hidden_layers": 8,
            "num_attention_heads": 16, "n_routed_experts": 128, "num_experts_per_tok": 8, "q_lora_rank": 512,
            "kv_lora_rank": 256, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 32768
        }),
        Shape::KimiK2 => json!({
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "num_attention_heads": 64, "n_routed_experts": 384, "num_experts_per_tok": 8, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 163840
        }),
    };
    if let Some(l) = o.layers {
        c["num_hidden_layers"] = l.into();
    }
    if let Some(e) = o.experts {
        c["n_routed_experts"] = e.into();
        let k = c["num_experts_per_tok"].as_u64().unwrap_or(8).min(e as u64);
        c["num_experts_per_tok"] = k.into();
    }
    let quant = json!({"group_size": o.group, "bits": o.bits, "mode": "affine"});
    let extra = json!({
        "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
        "num_key_value_heads": c["num_attention_heads"].clone(), "n_shared_experts": 1, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 2.827, "first_k_dense_replace": 1, "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
        "moe_layer_freq": 1, "attention_bias": false, "tie_word_embeddings": false,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization": quant.clone(), "quantization_config": quant
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// How a tensor's bytes are made.
#[derive(Clone, Copy)]
enum Fill {
    /// Random packed codes.
    Codes,
    /// A bf16 constant.
    Bf16(f32),
    /// bf16 normal values with this standard deviation.
    Normal(f32),
    /// f32 zeros.
    ZerosF32,
}

struct Spec {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    fill: Fill,
}

impl Spec {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        match self.fill {
            Fill::Codes => n * 4,
            Fill::Bf16(_) | Fill::Normal(_) => n * 2,
            Fill::ZerosF32 => n * 4,
        }
    }
}

fn quantized(
    specs: &mut Vec<Spec>,
    name: &str,
    lead: &[usize],
    out: usize,
    inp: usize,
    bits: u32,
    group: usize,
) {
    let a = (3.0 / inp as f32).sqrt();
    let levels = ((1u32 << bits) - 1) as f32;
    let shape = |last: usize| -> Vec<usize> { lead.iter().copied().chain([out, last]).collect() };
    // mlx-lm's conversion leaves a layer whose input does not split into whole groups unquantized (the
    // tiny shape's 64-wide inputs at group 128): bf16 values of the same spread, `±a` uniform.
    if !inp.is_multiple_of(group) {
        specs.push(Spec {
            name: format!("{name}.weight"),
            dtype: "BF16",
            shape: shape(inp),
            fill: Fill::Normal(a / 3f32.sqrt()),
        });
        return;
    }
    specs.push(Spec {
        name: format!("{name}.weight"),
        dtype: "U32",
        shape: shape(inp * bits as usize / 32),
        fill: Fill::Codes,
    });
    specs.push(Spec {
        name: format!("{name}.scales"),
        dtype: "BF16",
        shape: shape(inp / group),
        fill: Fill::Bf16(2.0 * a / levels),
    });
    specs.push(Spec {
        name: format!("{name}.biases"),
        dtype: "BF16",
        shape: shape(inp / group),
        fill: Fill::Bf16(-a),
    });
}

fn norm(specs: &mut Vec<Spec>, name: &str, n: usize) {
    specs.push(Spec {
        name: name.into(),
        dtype: "BF16",
        shape: vec![n],
        fill: Fill::Bf16(1.0),
    });
}

fn dim(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap_or(0) as usize
}

/// Tensors of the head shard and of each layer shard.
fn shards(c: &Value, bits: u32, group: usize) -> Vec<Vec<Spec>> {
    let (h, inter, mi, e) = (
        dim(c, "hidden_size"),
        dim(c, "intermediate_size"),
        dim(c, "moe_intermediate_size"),
        dim(c, "n_routed_experts"),
    );
    let (nh, qn, qr, vh) = (
        dim(c, "num_attention_heads"),
        dim(c, "qk_nope_head_dim"),
        dim(c, "qk_rope_head_dim"),
        dim(c, "v_head_dim"),
    );
    let (kvr, ql, vocab) = (
        dim(c, "kv_lora_rank"),
        dim(c, "q_lora_rank"),
        dim(c, "vocab_size"),
    );
    let mut out = Vec::new();
    let mut head = Vec::new();
    quantized(&mut head, "model.embed_tokens", &[], vocab, h, bits, group);
    norm(&mut head, "model.norm.weight", h);
    quantized(&mut head, "lm_head", &[], vocab, h, bits, group);
    out.push(head);
    for l in 0..dim(c, "num_hidden_layers") {
        let (mut t, p) = (Vec::new(), format!("model.layers.{l}"));
        norm(&mut t, &format!("{p}.input_layernorm.weight"), h);
        norm(&mut t, &format!("{p}.post_attention_layernorm.weight"), h);
        let a = format!("{p}.self_attn");
        quantized(&mut t, &format!("{a}.q_a_proj"), &[], ql, h, bits, group);
        norm(&mut t, &format!("{a}.q_a_layernorm.weight"), ql);
        quantized(
            &mut t,
            &format!("{a}.q_b_proj"),
            &[],
            nh * (qn + qr),
            ql,
            bits,
            group,
        );
        quantized(
            &mut t,
            &format!("{a}.kv_a_proj_with_mqa"),
            &[],
            kvr + qr,
            h,
            bits,
            group,
        );
        norm(&mut t, &format!("{a}.kv_a_layernorm.weight"), kvr);
        quantized(&mut t, &format!("{a}.embed_q"), &[nh], kvr, qn, bits, group);
        quantized(
            &mut t,
            &format!("{a}.unembed_out"),
            &[nh],
            vh,
            kvr,
            bits,
            group,
        );
        quantized(&mut t, &format!("{a}.o_proj"), &[], h, nh * vh, bits, group);
        if l < dim(c, "first_k_dense_replace") {
            for (proj, o, i) in [
                ("gate_proj", inter, h),
                ("up_proj", inter, h),
                ("down_proj", h, inter),
            ] {
                quantized(&mut t, &format!("{p}.mlp.{proj}"), &[], o, i, bits, group);
            }
        } else {
            t.push(Spec {
                name: format!("{p}.mlp.gate.weight"),
                dtype: "BF16",
                shape: vec![e, h],
                fill: Fill::Normal(1.0 / (h as f32).sqrt()),
            });
            t.push(Spec {
                name: format!("{p}.mlp.gate.e_score_correction_bias"),
                dtype: "F32",
                shape: vec![e],
                fill: Fill::ZerosF32,
            });
            for (proj, o, i) in [
                ("gate_proj", mi, h),
                ("up_proj", mi, h),
                ("down_proj", h, mi),
            ] {
                quantized(
                    &mut t,
                    &format!("{p}.mlp.switch_mlp.{proj}"),
                    &[e],
                    o,
                    i,
                    bits,
                    group,
                );
                quantized(
                    &mut t,
                    &format!("{p}.mlp.shared_experts.{proj}"),
                    &[],
                    o,
                    i,
                    bits,
                    group,
                );
            }
        }
        out.push(t);
    }
    out
}

/// Total bytes a checkpoint of these options takes.
pub fn total_bytes(o: &SynthOptions) -> usize {
    shards(&config(o), o.bits, o.group)
        .iter()
        .flatten()
        .map(Spec::bytes)
        .sum()
}

/// Writes the checkpoint; `tokenizer_from` supplies `tiktoken.model`, `tokenizer_config.json` and
/// `generation_config.json`. `progress(bytes_written)` is called as data is written.
pub fn write(
    out: &Path,
    o: &SynthOptions,
    tokenizer_from: &Path,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    if !crate::config::SUPPORTED_BITS.contains(&o.bits)
        || !crate::config::SUPPORTED_GROUPS.contains(&o.group)
    {
        return Err(Error::Invalid(format!(
            "bits {} / group {} are not an MLX affine format",
            o.bits, o.group
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let c = config(o);
    let mut weight_map = serde_json::Map::new();
    for (i, specs) in shards(&c, o.bits, o.group).into_iter().enumerate() {
        let file = format!("model-{:05}.safetensors", i + 1);
        write_shard(
            &out.join(&file),
            &specs,
            o.seed ^ (i as u64) << 32,
            &mut progress,
        )?;
        for s in &specs {
            weight_map.insert(s.name.clone(), file.clone().into());
        }
    }
    let mut sorted: Vec<(String, Value)> = weight_map.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let index = json!({"metadata": {}, "weight_map": sorted.into_iter().collect::<serde_json::Map<_, _>>()});
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    write_json(&out.join("config.json"), &c)?;
    for f in [
        "tiktoken.model",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let (src, dst) = (tokenizer_from.join(f), out.join(f));
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Streams one safetensors file: header, then each tensor generated in chunks.
fn write_shard(
    path: &Path,
    specs: &[Spec],
    seed: u64,
    progress: &mut impl FnMut(usize),
) -> Result<()> {
    let mut order: Vec<&Spec> = specs.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for s in &order {
        header.insert(
            s.name.clone(),
            json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [off, off + s.bytes()]}),
        );
        off += s.bytes();
    }
    header.insert("__metadata__".into(), json!({"format": "mlx"}));
    let mut h =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Invalid(e.to_string()))?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e| Error::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    const CHUNK: usize = 64 << 20;
    for (ti, s) in order.iter().enumerate() {
        let mut done = 0;
        while done < s.bytes() {
            let n = CHUNK.min(s.bytes() - done);
            let buf = fill(
                s.fill,
                n,
                seed ^ (ti as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ done as u64,
            );
            w.write_all(&buf).map_err(io)?;
            done += n;
            progress(n);
        }
    }
    w.flush().map_err(io)
}

fn fill(f: Fill, n: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    match f {
        Fill::Codes => {
            // 64 KiB blocks, each seeded by its index, spread over the cores.
            const BLOCK: usize = 1 << 16;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per = n.div_ceil(BLOCK).div_ceil(threads).max(1) * BLOCK;
            std::thread::scope(|scope| {
                for (t, part) in buf.chunks_mut(per).enumerate() {
                    scope.spawn(move || {
                        for (k, c) in part.chunks_mut(BLOCK).enumerate() {
                            let i = t * per / BLOCK + k;
                            let mut s = seed ^ ((i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                            for b in c.chunks_mut(8) {
                                let v = splitmix(&mut s).to_le_bytes();
                                b.copy_from_slice(&v[..b.len()]);
                            }
                        }
                    });
                }
            });
        }
        Fill::Bf16(v) => {
            let b = half::bf16::from_f32(v).to_le_bytes();
            buf.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&b));
        }
        Fill::Normal(std) => {
            let mut s = seed;
            for c in buf.chunks_exact_mut(2) {
                // Box–Muller from two uniforms.
                let u1 = ((splitmix(&mut s) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                c.copy_from_slice(&half::bf16::from_f32(z as f32 * std).to_le_bytes());
            }
        }
        Fill::ZerosF32 => {}
    }
    buf
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::Dtype;

    #[test]
    fn bench_shape_is_make_bench_model_py() {
        let o = SynthOptions {
            shape: Shape::Bench,
            layers: None,
            experts: None,
            bits: 4,
            group: 64,
            seed: 1,
        };
        let c = config(&o);
        assert_eq!(
            (
                dim(&c, "hidden_size"),
                dim(&c, "n_routed_experts"),
                dim(&c, "num_hidden_layers")
            ),
            (2048, 128, 8)
        );
        // make_bench_model.py writes 2.53 GB (2.4 GiB) of tensor data.
        let gb = total_bytes(&o) as f64 / 1e9;
        assert!((2.50..2.56).contains(&gb), "{gb} GB");
    }

    /// Group 128 leaves the tiny shape's 64-wide inputs (`q_b_proj`, `embed_q`, `unembed_out`, the experts'
    /// `down_proj`) in bf16, as mlx-lm would; the checkpoint must still load and run.
    #[test]
    fn synthesized_tiny_models_load_and_run() {
        for (bits, group) in [(3, 32), (5, 128)] {
            let dir = tempfile::tempdir().unwrap();
            let w = tiny_loads_and_runs(dir.path(), bits, group);
            let down = w
                .ckpt
                .get("model.layers.1.mlp.switch_mlp.down_proj.weight")
                .unwrap();
            let want = if group == 128 {
                Dtype::BF16
            } else {
                Dtype::U32
            };
            assert_eq!(down.dtype, want, "bits {bits} group {group}");
        }
    }

    /// Writes a two-layer tiny model at `bits`/`group` into `dir`, loads it and checks a forward pass; its
    /// weights, for further checks.
    fn tiny_loads_and_runs(dir: &Path, bits: u32, group: usize) -> crate::weights::Weights {
        let o = SynthOptions {
            shape: Shape::Tiny,
            layers: Some(2),
            experts: Some(8),
            bits,
            group,
            seed: 9,
        };
        let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/tiny-kimi-story");
        write(dir, &o, &tok, |_| {}).unwrap();
        let w = crate::weights::Weights::open(dir).unwrap();
        assert_eq!(
            (
                w.config.num_hidden_layers,
                w.config.n_routed_experts,
                w.config.num_experts_per_tok
            ),
            (2, 8, 4)
        );
        let m = crate::model::Model::load(&w, |_| {}).unwrap();
        let mut cache = m.new_cache().unwrap();
        let logits = m.logits(&[1, 2, 3], &mut cache, false).unwrap();
        assert_eq!(logits.dims(), &[1, 2304]);
        assert!(
            logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        );
        w
    }
}
