//! Loading a model directory with a progress bar; the bundled default model; load options from the CLI.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use engine::model::Model;
use engine::quant::kernels::Activations;
use engine::tokenizer::Tokenizer;
use engine::weights::{LoadOptions, QuantizeTo, Weights};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The small trained model shipped in the repository (`configs/models/tiny-kimi-story`).
pub fn default_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/tiny-kimi-story")
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ActivationsArg {
    /// f32 activations: exact (the default).
    F32,
    /// int8 activations per group with integer dot products: faster, ~1e-2 from exact.
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum QuantizeArg {
    Q8,
    Q4,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory (default: the bundled tiny-kimi-story).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Activation path of quantized matmuls.
    #[arg(long, value_enum, default_value = "f32")]
    pub activations: ActivationsArg,
    /// Quantize dense (bf16/f16/FP8) weights at load to MLX affine 8 or 4 bits, group 64.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// Read quantized and bf16 weights from the mapped checkpoint files instead of copying them into
    /// huge-page memory at load (no copy, but slower matmuls).
    #[arg(long)]
    pub map_weights: bool,
}

impl ModelArgs {
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    /// The same options as command-line arguments, for child processes.
    pub fn forwarded(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(m) = &self.model {
            v.extend(["--model".to_string(), m.display().to_string()]);
        }
        if let ActivationsArg::Int8 = self.activations {
            v.extend(["--activations".to_string(), "int8".to_string()]);
        }
        if let Some(q) = self.quantize {
            v.extend([
                "--quantize".to_string(),
                match q {
                    QuantizeArg::Q8 => "q8",
                    QuantizeArg::Q4 => "q4",
                }
                .to_string(),
            ]);
        }
        if self.map_weights {
            v.push("--map-weights".to_string());
        }
        v
    }

    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            activations: match self.activations {
                ActivationsArg::F32 => Activations::F32,
                ActivationsArg::Int8 => Activations::Int8,
            },
            quantize: self.quantize.map(|q| match q {
                QuantizeArg::Q8 => QuantizeTo::Q8,
                QuantizeArg::Q4 => QuantizeTo::Q4,
            }),
            map_weights: self.map_weights,
        }
    }
}

pub fn tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::load(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// Maps the checkpoint and builds every layer, showing progress on stderr.
pub fn model(args: &ModelArgs) -> Result<Model> {
    let dir = args.dir();
    let t0 = Instant::now();
    let weights = Weights::open_with(&dir, args.options())
        .with_context(|| format!("opening the model at {}", dir.display()))?;
    let bar = ProgressBar::new(weights.config.num_hidden_layers as u64).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(dir.display().to_string());
    let model = Model::load(&weights, |_| bar.inc(1))
        .with_context(|| format!("loading {}", dir.display()))?;
    bar.finish_and_clear();
    let o = args.options();
    tracing::info!(
        model = %dir.display(),
        gb = weights.loaded_bytes() as f64 / 1e9,
        secs = t0.elapsed().as_secs_f64(),
        activations = ?o.activations,
        quantize = ?o.quantize,
        weights = if o.map_weights { "mapped files" } else { "resident copies (huge pages)" },
        "loaded"
    );
    if let Some(q) = o.quantize {
        eprintln!(
            "quantized dense weights at load to {}-bit affine, group 64",
            q.bits()
        );
    }
    Ok(model)
}
