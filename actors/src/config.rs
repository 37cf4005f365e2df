//! `config.json` of the DeepSeek-V3 architecture family (`model_type` `kimi_k2` or `deepseek_v3`, also nested
//! under `text_config`). Shape fields are required; behavioural fields default as in mlx-lm's `ModelArgs`,
//! the oracle this engine is checked against. Values the math does not implement are errors naming the field.

use crate::error::{Error, Result, read_json};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: plain `q_proj`; `Some(r)`: `q_a_proj` (r) → `q_a_layernorm` → `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub quantization: Quantization,
}

/// YaRN rope scaling (`rope_scaling.type == "yarn"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Quantization {
    /// Plain bf16 / f16 / f32 tensors.
    None,
    /// DeepSeek-V3 / Kimi-K2 release format: e4m3 weights, one f32 `weight_scale_inv` per block.
    Fp8 { block: [usize; 2] },
    /// MLX affine quantization (`quantization` / `quantization_config` with `group_size` and `bits`).
    Affine(AffineConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub struct AffineParams {
    pub bits: u32,
    pub group_size: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AffineConfig {
    /// The top-level `bits` / `group_size`.
    pub default: Option<AffineParams>,
    /// Per-module overrides keyed by module path (`model.layers.3.self_attn.q_b_proj`); `None` = not quantized.
    pub modules: HashMap<String, Option<AffineParams>>,
}

pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
pub const SUPPORTED_GROUPS: [usize; 3] = [32, 64, 128];

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        Self::from_value(&value, &path)
    }

    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let root = Fields::new(value, path, "")?;
        // Multimodal wrappers (Kimi-VL style) nest the language model under `text_config`.
        let f = match value.get("text_config") {
            Some(text) if text.is_object() => Fields::new(text, path, "text_config.")?,
            _ => root.clone(),
        };
        let model_type = f.string("model_type")?;
        if model_type != "kimi_k2" && model_type != "deepseek_v3" {
            return Err(f.err(
                "model_type",
                format!("`{model_type}` is not supported (expected `kimi_k2` or `deepseek_v3`)"),
            ));
        }
        let scoring = f
            .opt_string("scoring_func")?
            .unwrap_or_else(|| "sigmoid".into());
        if scoring != "sigmoid" {
            return Err(f.err(
                "scoring_func",
                format!("`{scoring}` is not supported (only `sigmoid`)"),
            ));
        }
        let topk_method = f
            .opt_string("topk_method")?
            .unwrap_or_else(|| "noaux_tc".into());
        if topk_method != "noaux_tc" {
            return Err(f.err(
                "topk_method",
                format!("`{topk_method}` is not supported (only `noaux_tc`)"),
            ));
        }
        if f.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(f.err("attention_bias", "`true` is not supported"));
        }
        let q_lora_rank = match f.get("q_lora_rank") {
            None => return Err(f.err("q_lora_rank", "missing (use null for a plain q_proj)")),
            Some(Value::Null) => None,
            Some(_) => Some(f.usize("q_lora_rank")?),
        };
        let n_shared_experts = match f.get("n_shared_experts") {
            None | Some(Value::Null) => 0,
            Some(_) => f.usize("n_shared_experts")?,
        };
        let rope_scaling = parse_rope_scaling(&f)?;
        // MLX checkpoints write `quantization` (and often the same under `quantization_config`).
        let quantization = parse_quantization(&root)?;

        let cfg = ModelConfig {
            model_type,
            vocab_size: f.usize("vocab_size")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            moe_intermediate_size: f.usize("moe_intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            q_lora_rank,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
            v_head_dim: f.usize("v_head_dim")?,
            n_routed_experts: f.usize("n_routed_experts")?,
            num_experts_per_tok: f.usize("num_experts_per_tok")?,
            n_shared_experts,
            first_k_dense_replace: f.opt_usize("first_k_dense_replace")?.unwrap_or(0),
            moe_layer_freq: f.opt_usize("moe_layer_freq")?.unwrap_or(1),
            n_group: f.opt_usize("n_group")?.unwrap_or(1),
            topk_group: f.opt_usize("topk_group")?.unwrap_or(1),
            routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
            norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(true),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            quantization,
        };
        cfg.validate(&f)?;
        Ok(cfg)
    }

    fn validate(&self, f: &Fields) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
            ("n_group", self.n_group),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(f.err(field, "must be > 0"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(f.err("qk_rope_head_dim", "must be even (rotary pairs)"));
        }
        if self.n_routed_experts > 0 {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(f.err(
                    "num_experts_per_tok",
                    format!("must be in 1..={}", self.n_routed_experts),
                ));
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(f.err(
                    "n_group",
                    format!(
                        "{} does not divide n_routed_experts {}",
                        self.n_group, self.n_routed_experts
                    ),
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(f.err("topk_group", format!("must be in 1..={}", self.n_group)));
            }
            if self.n_group > 1 && self.n_routed_experts / self.n_group < 2 {
                return Err(f.err(
                    "n_group",
                    "groups are scored by their top-2: need ≥ 2 experts per group",
                ));
            }
            let reachable = self.topk_group * (self.n_routed_experts / self.n_group);
            if reachable < self.num_experts_per_tok {
                return Err(f.err(
                    "topk_group",
                    format!(
                        "{} groups of {} experts cannot hold {} experts per token",
                        self.topk_group,
                        self.n_routed_experts / self.n_group,
                        self.num_experts_per_tok
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether layer `layer` has a routed-expert MLP (else a dense MLP), as in mlx-lm / HF.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Softmax scale of MLA: `q_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` under YaRN.
    pub fn attention_scale(&self) -> f32 {
        let mut scale = (self.q_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.rope_scaling
            && y.mscale_all_dim != 0.0
        {
            let m = yarn_mscale(y.factor, y.mscale_all_dim);
            scale *= m * m;
        }
        scale as f32
    }

    /// Width of one cached token: the latent plus the rotary key.
    pub fn kv_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// `0.1 · m · ln(s) + 1` for `s > 1`, else 1 (DeepSeek's `yarn_get_mscale`).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_rope_scaling(f: &Fields) -> Result<Option<Yarn>> {
    let Some(v) = f.get("rope_scaling") else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let s = Fields::new(v, &f.path, &format!("{}rope_scaling.", f.prefix))?;
    let kind = match s.opt_string("type")? {
        Some(t) => t,
        None => s.opt_string("rope_type")?.unwrap_or_default(),
    };
    match kind.as_str() {
        "yarn" => Ok(Some(Yarn {
            factor: s.f64("factor")?,
            original_max_position_embeddings: s
                .opt_usize("original_max_position_embeddings")?
                .unwrap_or(4096),
            beta_fast: s.opt_f64("beta_fast")?.unwrap_or(32.0),
            beta_slow: s.opt_f64("beta_slow")?.unwrap_or(1.0),
            mscale: s.opt_f64("mscale")?.unwrap_or(1.0),
            mscale_all_dim: s.opt_f64("mscale_all_dim")?.unwrap_or(0.0),
        })),
        "default" => Ok(None),
        other => Err(s.err(
            "type",
            format!("rope scaling `{other}` is not supported (only `yarn`)"),
        )),
    }
}

fn parse_quantization(root: &Fields) -> Result<Quantization> {
    if let Some(q) = root.get("quantization").filter(|v| !v.is_null()) {
        let f = Fields::new(q, &root.path, "quantization.")?;
        return parse_affine(&f).map(Quantization::Affine);
    }
    let Some(q) = root.get("quantization_config").filter(|v| !v.is_null()) else {
        return Ok(Quantization::None);
    };
    let f = Fields::new(q, &root.path, "quantization_config.")?;
    match f.opt_string("quant_method")? {
        Some(m) if m == "fp8" => {
            if let Some(fmt) = f.opt_string("fmt")?
                && fmt != "e4m3"
            {
                return Err(f.err("fmt", format!("`{fmt}` is not supported (only `e4m3`)")));
            }
            let block = match f.get("weight_block_size") {
                None | Some(Value::Null) => [128, 128],
                Some(Value::Array(a)) if a.len() == 2 => {
                    let get = |i: usize| a[i].as_u64().filter(|&v| v > 0).map(|v| v as usize);
                    match (get(0), get(1)) {
                        (Some(r), Some(c)) => [r, c],
                        _ => {
                            return Err(
                                f.err("weight_block_size", "expected two positive integers")
                            );
                        }
                    }
                }
                Some(_) => return Err(f.err("weight_block_size", "expected [rows, cols]")),
            };
            Ok(Quantization::Fp8 { block })
        }
        Some(m) => Err(f.err(
            "quant_method",
            format!("`{m}` is not supported (fp8 block quantization or MLX affine)"),
        )),
        // MLX writes its affine parameters under quantization_config too.
        None => parse_affine(&f).map(Quantization::Affine),
    }
}

fn parse_affine(f: &Fields) -> Result<AffineConfig> {
    if let Some(mode) = f.opt_string("mode")?
        && mode != "affine"
    {
        return Err(f.err("mode", format!("`{mode}` is not supported (only `affine`)")));
    }
    let default = match (f.get("bits"), f.get("group_size")) {
        (None, None) => None,
        _ => Some(affine_params(f)?),
    };
    let mut modules = HashMap::new();
    for (key, v) in f.obj {
        match v {
            Value::Object(_) => {
                let sub = Fields::new(v, &f.path, &format!("{}{key}.", f.prefix))?;
                modules.insert(key.clone(), Some(affine_params(&sub)?));
            }
            Value::Bool(false) => {
                modules.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    Ok(AffineConfig { default, modules })
}

fn affine_params(f: &Fields) -> Result<AffineParams> {
    let bits = f.usize("bits")? as u32;
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(f.err(
            "bits",
            format!("{bits} is not supported (2, 3, 4, 5, 6 or 8)"),
        ));
    }
    let group_size = f.usize("group_size")?;
    if !SUPPORTED_GROUPS.contains(&group_size) {
        return Err(f.err(
            "group_size",
            format!("{group_size} is not supported (32, 64 or 128)"),
        ));
    }
    Ok(AffineParams { bits, group_size })
}

impl AffineConfig {
    /// The configured parameters of `module`: its own entry if present, else the default.
    /// `Some(None)` means the module is explicitly unquantized.
    pub fn for_module(&self, module: &str) -> Option<Option<AffineParams>> {
        match self.modules.get(module) {
            Some(p) => Some(*p),
            None => self.default.map(Some),
        }
    }
}

/// A JSON object plus the file and key prefix it came from, for errors that name the field.
#[derive(Clone)]
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: PathBuf,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(v: &'a Value, path: &Path, prefix: &str) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            field: prefix.trim_end_matches('.').to_string(),
            message: "expected a JSON object".into(),
        })?;
        Ok(Fields {
            obj,
            path: path.to_path_buf(),
            prefix: prefix.to_string(),
        })
    }

    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: format!("{}{field}", self.prefix),
            message: message.into(),
        }
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k)
    }

    fn present(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| self.err(k, "missing"))
    }

    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn f64(&self, k: &str) -> Result<f64> {
        self.opt_f64(k)?.ok_or_else(|| self.err(k, "missing"))
    }

    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected a number, got {v}"))),
        }
    }

    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected true or false, got {v}"))),
        }
    }

    fn string(&self, k: &str) -> Result<String> {
        self.opt_string(k)?.ok_or_else(|| self.err(k, "missing"))
    }

    fn opt_string(&self, k: &str) -> Result<Option<String>> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(k, format!("expected a string, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "kimi_k2", "vocab_size": 1280, "hidden_size": 128, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
            "v_head_dim": 64, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
            "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_value(v, Path::new("config.json"))
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn parses_kimi_shape_and_yarn_scale() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.q_lora_rank, Some(64));
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
        let m = 0.1 * 32f64.ln() + 1.0;
        let expect = (96f64).powf(-0.5) * m * m;
        assert!((c.attention_scale() as f64 - expect).abs() < 1e-6);
        assert_eq!(c.quantization, Quantization::None);
    }

    #[test]
    fn null_q_lora_rank_means_plain_q_proj_and_missing_is_an_error() {
        let mut v = base();
        v["q_lora_rank"] = Value::Null;
        assert_eq!(parse(&v).unwrap().q_lora_rank, None);
        v.as_object_mut().unwrap().remove("q_lora_rank");
        assert_eq!(field_of(parse(&v).unwrap_err()), "q_lora_rank");
    }

    #[test]
    fn nested_text_config_is_read() {
        let v = json!({"architectures": ["KimiVL"], "text_config": base()});
        let c = parse(&v).unwrap();
        assert_eq!(c.hidden_size, 128);
        let mut bad = v.clone();
        bad["text_config"]["hidden_size"] = json!("wide");
        assert_eq!(
            field_of(parse(&bad).unwrap_err()),
            "text_config.hidden_size"
        );
    }

    #[test]
    fn unsupported_values_name_their_field() {
        for (field, value) in [
            ("scoring_func", json!("softmax")),
            ("topk_method", json!("greedy")),
            ("model_type", json!("llama")),
            ("n_group", json!(3)),
        ] {
            let mut v = base();
            v[field] = value;
            assert_eq!(field_of(parse(&v).unwrap_err()), field);
        }
        let mut v = base();
        v["rope_scaling"]["type"] = json!("longrope");
        assert_eq!(field_of(parse(&v).unwrap_err()), "rope_scaling.type");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert_eq!(field_of(parse(&v).unwrap_err()), "hidden_size");
    }

    #[test]
    fn quantization_variants() {
        let mut v = base();
        v["quantization_config"] =
            json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
        assert_eq!(
            parse(&v).unwrap().quantization,
            Quantization::Fp8 { block: [128, 128] }
        );

        v["quantization_config"] = json!({"quant_method": "compressed-tensors"});
        assert_eq!(
            field_of(parse(&v).unwrap_err()),
            "quantization_config.quant_method"
        );

        let mut v = base();
        v["quantization"] = json!({"group_size": 64, "bits": 4, "mode": "affine",
            "model.embed_tokens": {"group_size": 32, "bits": 3}, "lm_head": false});
        let Quantization::Affine(a) = parse(&v).unwrap().quantization else {
            panic!()
        };
        assert_eq!(
            a.for_module("model.embed_tokens"),
            Some(Some(AffineParams {
                bits: 3,
                group_size: 32
            }))
        );
        assert_eq!(a.for_module("lm_head"), Some(None));
        assert_eq!(
            a.for_module("model.layers.1.self_attn.o_proj"),
            Some(Some(AffineParams {
                bits: 4,
                group_size: 64
            }))
        );

        v["quantization"]["model.embed_tokens"]["bits"] = json!(7);
        assert_eq!(
            field_of(parse(&v).unwrap_err()),
            "quantization.model.embed_tokens.bits"
        );
        v["quantization"]["model.embed_tokens"]["bits"] = json!(3);
        v["quantization"]["mode"] = json!("mxfp4");
        assert_eq!(field_of(parse(&v).unwrap_err()), "quantization.mode");
    }
}
