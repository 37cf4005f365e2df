//! Helpers shared by the integration tests: fixture paths, JSON, and the reference comparisons.
#![allow(dead_code)]

use engine::model::Model;
use engine::model::cache::SequenceCache;
use engine::weights::Weights;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const LOGIT_TOLERANCE: f32 = 1e-3;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bundled default model (tiny-kimi-story, MLX mixed precision).
pub fn story_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/tiny-kimi-story")
}

pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a float array")
        .iter()
        .map(|x| x.as_f64().expect("a float") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn load_model(dir: &Path) -> Model {
    let w = Weights::open(dir).unwrap_or_else(|e| panic!("{e}"));
    Model::load(&w, |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// For each reference case: the last 4 prefill positions of one forward over the prompt, then the logits
/// after feeding each greedy id through the cache, all within `LOGIT_TOLERANCE`. Returns the largest difference.
pub fn check_reference_logits(model: &Model, cases: &Value, label: &str) -> f32 {
    for_reference_rows(model, cases, label, |got, want, what| {
        let d = max_abs_diff(got, want);
        assert!(d <= LOGIT_TOLERANCE, "{what}: off by {d}");
        d
    })
}

/// Runs `check(got, want, what)` on every reference row (as [`check_reference_logits`] describes) and
/// returns the largest value it gave.
pub fn for_reference_rows(
    model: &Model,
    cases: &Value,
    label: &str,
    check: impl Fn(&[f32], &[f32], &str) -> f32,
) -> f32 {
    let mut worst = 0f32;
    for (ci, case) in cases.as_array().expect("cases").iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let mut cache = model.new_cache().unwrap();
        let got: Vec<Vec<f32>> = model
            .logits(&prompt, &mut cache, true)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want = case["prefill_logits"].as_array().unwrap();
        for (i, row) in want.iter().enumerate() {
            let what = format!("{label} case {ci} prefill row {i}");
            worst = worst.max(check(&got[got.len() - want.len() + i], &floats(row), &what));
        }
        let steps = ids(&case["greedy_ids"])
            .into_iter()
            .zip(case["decode_logits"].as_array().unwrap());
        for (step, (id, row)) in steps.enumerate() {
            let got = next_logits(model, id, &mut cache);
            worst = worst.max(check(
                &got,
                &floats(row),
                &format!("{label} case {ci} decode step {step}"),
            ));
        }
    }
    worst
}

/// The logits after feeding `id` through `cache` (one decode step).
pub fn next_logits(model: &Model, id: u32, cache: &mut SequenceCache) -> Vec<f32> {
    last_logits(model, &[id], cache)
}

/// The last position's logits after feeding `tokens` through `cache`.
pub fn last_logits(model: &Model, tokens: &[u32], cache: &mut SequenceCache) -> Vec<f32> {
    model
        .logits(tokens, cache, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A free TCP port on 127.0.0.1, never the same one twice in a test binary (the tests in it run in
/// parallel, and the kernel may hand out a port just released). Bound and released: a small race with other
/// processes' ephemeral ports is accepted.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Writes a two-node placement (`a` is the head, `b` a worker) on free ports; `extra` is appended.
/// Both nodes use `model` unless the caller overrides it.
pub fn two_node_placement(dir: &Path, mode: &str, model: &Path, extra: &str) -> PathBuf {
    let (a, ad, b, bd) = (free_port(), free_port(), free_port(), free_port());
    let text = format!(
        r#"mode = "{mode}"
secret_env = "KIMI_TEST_SECRET"

[[node]]
name = "a"
address = "127.0.0.1:{a}"
data_address = "127.0.0.1:{ad}"
memory = "1 GB"
model = "{m}"

[[node]]
name = "b"
address = "127.0.0.1:{b}"
data_address = "127.0.0.1:{bd}"
memory = "1 GB"
model = "{m}"
{extra}
"#,
        m = model.display()
    );
    let path = dir.join(format!("{mode}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub const SECRET: &str = "kimi-test-secret";

/// The `kimi-actors` binary with the test secret in its environment.
pub fn kimi() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kimi-actors"));
    c.env("KIMI_TEST_SECRET", SECRET);
    c
}

/// Runs `kimi-actors args…` to completion; panics with its stderr on failure.
pub fn run_ok(args: &[&str]) -> String {
    let out = kimi().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kimi-actors {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `kimi-actors serve` process on a free port, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub port: u16,
}

impl Server {
    /// Starts the server with `args` and waits until `/health` answers.
    pub fn start(args: &[&str]) -> Server {
        Server::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut c = kimi();
        c.args(["serve", "--listen", &listen]).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = c.spawn().unwrap();
        let s = Server { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
