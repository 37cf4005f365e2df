//! `kimi-actors synth`: write a random-weight checkpoint of a given shape.

use crate::load;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use engine::synth::{self, Shape, SynthOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum ShapeArg {
    Tiny,
    Bench,
    KimiK2,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum)]
    shape: ShapeArg,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the number of routed experts per layer.
    #[arg(long)]
    experts: Option<usize>,
    /// MLX affine bits (2, 3, 4, 5, 6, 8).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    #[arg(long, default_value_t = 64)]
    group: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let o = SynthOptions {
        shape: match a.shape {
            ShapeArg::Tiny => Shape::Tiny,
            ShapeArg::Bench => Shape::Bench,
            ShapeArg::KimiK2 => Shape::KimiK2,
        },
        layers: a.layers,
        experts: a.experts,
        bits: a.bits,
        group: a.group,
        seed: a.seed,
    };
    let total = synth::total_bytes(&o);
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "writing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    synth::write(&a.out, &o, &load::default_model_dir(), |n| {
        bar.inc(n as u64)
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    eprintln!("wrote {} ({:.2} GB)", a.out.display(), total as f64 / 1e9);
    Ok(())
}
