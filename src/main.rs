//! `kimi-actors`: the command line over the engine crate.

mod bench;
mod cluster;
mod generate;
mod inspect;
mod load;
mod node;
mod placement;
mod serve;
mod synth;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kimi-actors",
    version,
    about = "Run Kimi-K2 / DeepSeek-V3 MoE models across a few machines"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter such as `engine=debug`.
    #[arg(long, global = true, default_value = "warn", env = "KIMI_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt or a chat; text to stdout, speed to stderr.
    Generate(generate::GenerateArgs),
    /// Print the logits of a prompt (one forward) and of forced tokens fed one by one, as JSON.
    Logits(inspect::LogitsArgs),
    /// Print the token ids of a text or a rendered chat, as JSON.
    Tokenize(inspect::TokenizeArgs),
    /// Measure prefill and decode speed against the machine's memory bandwidth.
    Bench(bench::BenchArgs),
    /// Write a random-weight MLX checkpoint of a given shape (dry runs, benchmarks).
    Synth(synth::SynthArgs),
    /// Print a placement's resolved plan: per node its layers, experts and bytes of weights.
    Placement(placement::PlacementArgs),
    /// Run a worker node of a placement.
    Node(node::NodeArgs),
    /// Serve the model: WebSocket streaming, the OpenAI API, and a page with the cluster view.
    Serve(serve::ServeArgs),
}

fn main() {
    engine::malloc::keep_freed_memory();
    // The quantized kernels run on the engine's own pool of spinning workers. candle's CPU matmuls (attention
    // over the latent cache) would otherwise fan out on rayon's threads too, and the two pools would take
    // cores from each other on every step; with one rayon thread they run on the calling thread, unless the
    // user says. (candle's parallel iterators would still hand their work to that one thread: the engine
    // calls none of them, see `model::norm`.)
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the first statement of `main`, before any thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match command {
        Command::Generate(a) => rt.block_on(generate::run(a)),
        Command::Logits(a) => rt.block_on(inspect::logits(a)),
        Command::Tokenize(a) => inspect::tokenize(a),
        Command::Bench(a) => rt.block_on(bench::run(a)),
        Command::Synth(a) => synth::run(a),
        Command::Placement(a) => placement::run(a),
        Command::Node(a) => rt.block_on(node::run(a)),
        Command::Serve(a) => rt.block_on(serve::run(a)),
    }
}
