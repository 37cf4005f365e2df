//! Loading a model directory with a progress bar; the bundled default model.

use anyhow::{Context, Result};
use engine::model::Model;
use engine::tokenizer::Tokenizer;
use engine::weights::Weights;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The small trained model shipped in the repository (`configs/models/tiny-kimi-story`).
pub fn default_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/tiny-kimi-story")
}

pub fn tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::load(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// Maps the checkpoint and builds every layer, showing progress on stderr.
pub fn model(dir: &Path) -> Result<Model> {
    let t0 = Instant::now();
    let weights =
        Weights::open(dir).with_context(|| format!("opening the model at {}", dir.display()))?;
    let bar = ProgressBar::new(weights.config.num_hidden_layers as u64).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(dir.display().to_string());
    let model = Model::load(&weights, |_| bar.inc(1))
        .with_context(|| format!("loading {}", dir.display()))?;
    bar.finish_and_clear();
    tracing::info!(model = %dir.display(), secs = t0.elapsed().as_secs_f64(), "loaded");
    Ok(model)
}
