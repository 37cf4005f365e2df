//! Placement: which node holds each unit of the model. A TOML file names the nodes (address, memory budget,
//! model directory) and a mode; [`Plan::resolve`] turns it, with the model's config and tensor sizes, into one
//! node per layer (its attention, router, shared expert or dense MLP) and one node per routed expert, checked
//! against every node's budget. A layer-split plan is the case where a layer's experts all sit with its
//! attention; an expert-split plan keeps attention on the head and spreads experts.
//!
//! ```toml
//! mode = "expert-split"            # or "layer-split"
//! secret_env = "KIMI_SECRET"       # env var with the shared secret (required with several nodes)
//! head = "studio-a"                # expert-split: attention, routers, shared experts (default: first node)
//!
//! [[node]]
//! name = "studio-a"
//! address = "10.0.0.1:7400"        # control (ractor_cluster); the data link listens on the next port
//! memory = "480 GB"                # budget for weights
//! model = "/models/Kimi-K2-4bit"   # relative paths are relative to this file
//!
//! [layers]                         # layer-split (optional; default: in proportion to memory)
//! studio-a = "0-43"
//!
//! [experts]                        # expert-split (optional; default: in proportion to memory)
//! studio-a = "0-255"               # ranges ("0-10,20-30") or weights (0.75)
//! [experts.layers.3]               # per-layer override
//! studio-a = "0-127"
//! ```

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::Checkpoint;
use safetensors::tensor::Dtype;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    LayerSplit,
    ExpertSplit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    mode: String,
    secret_env: Option<String>,
    head: Option<String>,
    node: Vec<NodeSpec>,
    layers: Option<BTreeMap<String, String>>,
    experts: Option<ExpertsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    name: String,
    address: Option<String>,
    data_address: Option<String>,
    memory: toml::Value,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ExpertsSpec {
    layers: Option<BTreeMap<String, BTreeMap<String, toml::Value>>>,
    #[serde(flatten)]
    all: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// ractor_cluster control address (host:port).
    pub address: String,
    /// Data link address (host:port).
    pub data_address: String,
    pub memory: u64,
    pub model_dir: PathBuf,
}

/// Where one layer's units live.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// Node of the attention, router, shared expert (or dense MLP).
    pub node: usize,
    /// Node of each routed expert (empty for dense layers).
    pub experts: Vec<usize>,
}

/// Bytes of weights each unit holds once loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitSizes {
    pub head: u64,
    /// Per layer: attention + router + shared expert or dense MLP.
    pub layer: Vec<u64>,
    /// Per layer: bytes of one routed expert (0 for dense layers).
    pub expert: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub secret_env: Option<String>,
    /// `nodes[0]` is the head: it embeds tokens, runs the final norm and lm_head, and drives generation.
    pub nodes: Vec<NodeInfo>,
    pub layers: Vec<LayerPlan>,
    pub sizes: UnitSizes,
    /// Where the plan came from (for messages).
    pub source: PathBuf,
}

/// What one node loads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    pub head: bool,
    /// Layers whose attention/router/shared/dense units this node holds.
    pub layers: Vec<usize>,
    /// Routed experts per layer held here.
    pub experts: BTreeMap<usize, Vec<usize>>,
}

impl Plan {
    /// Reads a placement file; `model_override` replaces every node's model directory.
    pub fn load(path: &Path, model_override: Option<&Path>) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Plan::from_str(&text, path, model_override)
    }

    pub fn from_str(text: &str, path: &Path, model_override: Option<&Path>) -> Result<Plan> {
        let err = |field: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| err("", e.to_string()))?;
        let mode = match file.mode.as_str() {
            "layer-split" => Mode::LayerSplit,
            "expert-split" => Mode::ExpertSplit,
            other => {
                return Err(err(
                    "mode",
                    format!("`{other}`: expected \"layer-split\" or \"expert-split\""),
                ));
            }
        };
        if file.node.is_empty() {
            return Err(err("node", "at least one [[node]] is needed".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut nodes = Vec::new();
        for (i, n) in file.node.iter().enumerate() {
            let field = |f: &str| format!("node[{i}].{f}");
            if nodes.iter().any(|o: &NodeInfo| o.name == n.name) {
                return Err(err(&field("name"), format!("`{}` is used twice", n.name)));
            }
            let memory = parse_bytes(&n.memory).map_err(|m| err(&field("memory"), m))?;
            let address = match (&n.address, file.node.len()) {
                (Some(a), _) => a.clone(),
                (None, 1) => String::new(),
                (None, _) => {
                    return Err(err(
                        &field("address"),
                        "missing (needed with several nodes)".into(),
                    ));
                }
            };
            let data_address = match &n.data_address {
                Some(a) => a.clone(),
                None if address.is_empty() => String::new(),
                None => next_port(&address).map_err(|m| err(&field("address"), m))?,
            };
            let model_dir = match (model_override, &n.model) {
                (Some(m), _) => m.to_path_buf(),
                (None, Some(m)) => base.join(m),
                (None, None) => {
                    return Err(err(&field("model"), "missing (or pass --model)".into()));
                }
            };
            nodes.push(NodeInfo {
                name: n.name.clone(),
                address,
                data_address,
                memory,
                model_dir,
            });
        }
        // The head goes first.
        if let Some(h) = &file.head {
            let i = nodes
                .iter()
                .position(|n| &n.name == h)
                .ok_or_else(|| err("head", format!("no node is named `{h}`")))?;
            let head = nodes.remove(i);
            nodes.insert(0, head);
        }
        if nodes.len() > 1 && file.secret_env.is_none() {
            return Err(err(
                "secret_env",
                "missing: nodes authenticate with a shared secret from this env var".into(),
            ));
        }

        let dir = &nodes[0].model_dir;
        let config = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let sizes = UnitSizes::measure(&config, &ckpt);
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let weights: Vec<f64> = nodes.iter().map(|n| n.memory as f64).collect();
        let l = config.num_hidden_layers;

        let layer_nodes: Vec<usize> = match (mode, &file.layers) {
            (Mode::ExpertSplit, Some(_)) => {
                return Err(err("layers", "only for mode = \"layer-split\"".into()));
            }
            (Mode::ExpertSplit, None) => vec![0; l],
            (Mode::LayerSplit, None) => proportional_ranges(l, &weights),
            (Mode::LayerSplit, Some(spec)) => {
                let mut owner: Vec<Option<usize>> = vec![None; l];
                for (node, ranges) in spec {
                    let ni = node_index(&names, node).map_err(|m| err("layers", m))?;
                    for x in
                        parse_ranges(ranges, l).map_err(|m| err(&format!("layers.{node}"), m))?
                    {
                        if let Some(prev) = owner[x] {
                            return Err(err(
                                "layers",
                                format!("layer {x} is placed twice ({} and {node})", names[prev]),
                            ));
                        }
                        owner[x] = Some(ni);
                    }
                }
                owner
                    .iter()
                    .enumerate()
                    .map(|(x, o)| {
                        o.ok_or_else(|| err("layers", format!("layer {x} is not placed")))
                    })
                    .collect::<Result<_>>()?
            }
        };

        let e = config.n_routed_experts;
        let mut layers = Vec::with_capacity(l);
        for (x, &node) in layer_nodes.iter().enumerate() {
            let experts = if !config.is_moe_layer(x) {
                Vec::new()
            } else if mode == Mode::LayerSplit {
                if file.experts.is_some() {
                    return Err(err("experts", "only for mode = \"expert-split\"".into()));
                }
                vec![node; e]
            } else {
                let spec = file.experts.as_ref().and_then(|s| {
                    s.layers
                        .as_ref()
                        .and_then(|per| per.get(&x.to_string()))
                        .or(Some(&s.all).filter(|a| !a.is_empty()))
                });
                match spec {
                    None => proportional_ranges(e, &weights),
                    Some(spec) => {
                        expert_owners(spec, &names, e, x).map_err(|m| err("experts", m))?
                    }
                }
            };
            layers.push(LayerPlan { node, experts });
        }
        let plan = Plan {
            mode,
            secret_env: file.secret_env.clone(),
            nodes,
            layers,
            sizes,
            source: path.to_path_buf(),
        };
        for (i, n) in plan.nodes.iter().enumerate() {
            let need = plan.node_bytes(i);
            if need > n.memory {
                return Err(err(
                    "memory",
                    format!(
                        "node `{}` would hold {} of weights but its budget is {}",
                        n.name,
                        human(need),
                        human(n.memory)
                    ),
                ));
            }
        }
        Ok(plan)
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// What node `i` loads.
    pub fn share(&self, i: usize) -> Share {
        let mut s = Share {
            head: i == 0,
            ..Share::default()
        };
        for (x, lp) in self.layers.iter().enumerate() {
            if lp.node == i {
                s.layers.push(x);
            }
            let mine: Vec<usize> = lp
                .experts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n == i)
                .map(|(e, _)| e)
                .collect();
            if !mine.is_empty() {
                s.experts.insert(x, mine);
            }
        }
        s
    }

    /// Bytes of weights node `i` holds.
    pub fn node_bytes(&self, i: usize) -> u64 {
        let s = self.share(i);
        let mut b = if s.head { self.sizes.head } else { 0 };
        b += s.layers.iter().map(|&x| self.sizes.layer[x]).sum::<u64>();
        b += s
            .experts
            .iter()
            .map(|(x, es)| self.sizes.expert[*x] * es.len() as u64)
            .sum::<u64>();
        b
    }

    /// Runs of consecutive layers on one node: where the hidden state changes hands.
    pub fn stages(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (x, lp) in self.layers.iter().enumerate() {
            match out.last_mut() {
                Some((n, r)) if *n == lp.node => r.end = x + 1,
                _ => out.push((lp.node, x..x + 1)),
            }
        }
        out
    }

    pub fn is_distributed(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Identifies the resolved plan: nodes agree on it before they exchange hidden states.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("{:?}", self.mode));
        for n in &self.nodes {
            h.update(format!(
                "{}|{}|{}|{};",
                n.name, n.address, n.data_address, n.memory
            ));
        }
        for lp in &self.layers {
            h.update(format!("{}:{:?};", lp.node, lp.experts));
        }
        hex(&h.finalize()[..12])
    }

    /// The human-readable plan (`kimi-actors placement`).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let mode = match self.mode {
            Mode::LayerSplit => "layer-split",
            Mode::ExpertSplit => "expert-split",
        };
        let _ = writeln!(
            s,
            "placement {} ({mode}, {} layers)",
            self.source.display(),
            self.layers.len()
        );
        for (i, n) in self.nodes.iter().enumerate() {
            let share = self.share(i);
            let _ = writeln!(
                s,
                "node {}{}  {}  model {}",
                n.name,
                if i == 0 { " (head)" } else { "" },
                if n.address.is_empty() {
                    "in-process"
                } else {
                    &n.address
                },
                n.model_dir.display()
            );
            let _ = writeln!(
                s,
                "  weights {} of budget {}",
                human(self.node_bytes(i)),
                human(n.memory)
            );
            if share.head {
                let _ = writeln!(
                    s,
                    "  embedding, final norm, lm_head ({})",
                    human(self.sizes.head)
                );
            }
            if !share.layers.is_empty() {
                let _ = writeln!(
                    s,
                    "  layers {} (attention, router, shared expert / dense MLP)",
                    ranges(&share.layers)
                );
            }
            // Group layers that hold the same experts.
            let mut by_set: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (x, es) in &share.experts {
                by_set.entry(ranges(es)).or_default().push(*x);
            }
            for (es, xs) in by_set {
                let _ = writeln!(s, "  experts {es} of layers {}", ranges(&xs));
            }
        }
        s
    }
}

impl UnitSizes {
    /// Bytes each unit will hold, from the tensor headers (nothing is read). bf16 and affine tensors are held
    /// as stored; FP8 becomes bf16, f16 becomes f32, HF `kv_b_proj` becomes f32.
    pub fn measure(config: &ModelConfig, ckpt: &Checkpoint) -> UnitSizes {
        let l = config.num_hidden_layers;
        let mut s = UnitSizes {
            head: 0,
            layer: vec![0; l],
            expert: vec![0; l],
        };
        let e = config.n_routed_experts.max(1) as u64;
        for (name, dtype, shape) in ckpt.index() {
            let numel: u64 = shape.iter().map(|&d| d as u64).product();
            let held = match dtype {
                Dtype::F8_E4M3 => numel * 2,
                Dtype::F16 => numel * 4,
                Dtype::BF16 if name.contains("kv_b_proj") => numel * 4,
                _ if name.ends_with("weight_scale_inv") => 0,
                d => numel * d.bitsize() as u64 / 8,
            };
            let Some(rest) = name.strip_prefix("model.layers.") else {
                s.head += held;
                continue;
            };
            let (x, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let Some(x) = x.parse::<usize>().ok().filter(|&x| x < l) else {
                continue; // e.g. multi-token-prediction layers past num_hidden_layers
            };
            if rest.starts_with("mlp.switch_mlp.") {
                s.expert[x] += held / e;
            } else if rest.starts_with("mlp.experts.") {
                // Per-expert tensors: count expert 0's as the size of one.
                if rest.starts_with("mlp.experts.0.") {
                    s.expert[x] += held;
                }
            } else {
                s.layer[x] += held;
            }
        }
        s
    }
}

/// A hash of the model's config and tensor index (names, dtypes, shapes): the same checkpoint gives the same
/// fingerprint wherever it is stored.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let config = crate::error::read_json(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    let mut h = Sha256::new();
    h.update(canonical_json(&config));
    for (name, dtype, shape) in ckpt.index() {
        h.update(format!("{name}|{dtype:?}|{shape:?};"));
    }
    Ok(hex(&h.finalize()[..12]))
}

fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .iter()
                .map(|k| format!("{k:?}:{}", canonical_json(&m[*k])))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        serde_json::Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn node_index(names: &[&str], name: &str) -> std::result::Result<usize, String> {
    names
        .iter()
        .position(|n| *n == name)
        .ok_or_else(|| format!("no node is named `{name}`"))
}

/// Splits `n` items into contiguous runs in proportion to `weights` (exo's memory-weighted rule).
fn proportional_ranges(n: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    let mut owner = vec![weights.len() - 1; n];
    let mut acc = 0.0;
    let mut start = 0;
    for (i, w) in weights.iter().enumerate() {
        acc += w / total;
        let end = if i + 1 == weights.len() {
            n
        } else {
            ((acc * n as f64).round() as usize).min(n)
        };
        for o in owner.iter_mut().take(end).skip(start) {
            *o = i;
        }
        start = end.max(start);
    }
    owner
}

/// Owners of a layer's experts from a `{node: ranges | weight}` table.
fn expert_owners(
    spec: &BTreeMap<String, toml::Value>,
    names: &[&str],
    e: usize,
    layer: usize,
) -> std::result::Result<Vec<usize>, String> {
    if spec.values().all(|v| v.is_float() || v.is_integer()) {
        let mut weights = vec![0.0; names.len()];
        for (node, v) in spec {
            let w = v
                .as_float()
                .or(v.as_integer().map(|i| i as f64))
                .unwrap_or(0.0);
            if w < 0.0 {
                return Err(format!("{node}: a weight must be ≥ 0"));
            }
            weights[node_index(names, node)?] = w;
        }
        if weights.iter().sum::<f64>() <= 0.0 {
            return Err("the weights sum to 0".into());
        }
        // Nodes with weight 0 get nothing: drop them from the split.
        let active: Vec<usize> = (0..names.len()).filter(|&i| weights[i] > 0.0).collect();
        let w: Vec<f64> = active.iter().map(|&i| weights[i]).collect();
        return Ok(proportional_ranges(e, &w)
            .into_iter()
            .map(|k| active[k])
            .collect());
    }
    let mut owner: Vec<Option<usize>> = vec![None; e];
    for (node, v) in spec {
        let ni = node_index(names, node)?;
        let text = v.as_str().ok_or_else(|| {
            format!("{node}: use ranges (\"0-63\") for every node, or weights for every node")
        })?;
        for x in parse_ranges(text, e).map_err(|m| format!("{node}: {m}"))? {
            if let Some(prev) = owner[x] {
                return Err(format!(
                    "layer {layer} expert {x} is placed twice ({} and {node})",
                    names[prev]
                ));
            }
            owner[x] = Some(ni);
        }
    }
    owner
        .iter()
        .enumerate()
        .map(|(x, o)| o.ok_or_else(|| format!("layer {layer} expert {x} is not placed")))
        .collect()
}

/// "0-10,20,30-31" → indices, each `< n`.
fn parse_ranges(text: &str, n: usize) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{part}` is not a range like 0-43"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || b >= n {
            return Err(format!("`{part}` is outside 0-{}", n - 1));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// Compact form of sorted indices: "0-3,7".
pub fn ranges(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            xs[i].to_string()
        } else {
            format!("{}-{}", xs[i], xs[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// "512 GB", "192GiB", "unlimited" or an integer of bytes.
fn parse_bytes(v: &toml::Value) -> std::result::Result<u64, String> {
    if let Some(i) = v.as_integer() {
        return u64::try_from(i).map_err(|_| "must be ≥ 0".to_string());
    }
    let s = v.as_str().ok_or("expected bytes, like \"192 GB\"")?.trim();
    if s == "unlimited" {
        return Ok(u64::MAX);
    }
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"192 GB\""))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown unit `{other}`")),
    };
    Ok((num * mult) as u64)
}

fn next_port(address: &str) -> std::result::Result<String, String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or(format!("`{address}` is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{address}` is not host:port"))?;
    let next = port
        .checked_add(1)
        .ok_or("port 65535 leaves no room for the data link")?;
    Ok(format!("{host}:{next}"))
}

/// Bytes as "1.23 GB".
pub fn human(b: u64) -> String {
    if b == u64::MAX {
        return "unlimited".into();
    }
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-kimi-mlx-mixed")
    }

    fn plan(toml: &str) -> Result<Plan> {
        Plan::from_str(toml, Path::new("/p/placement.toml"), Some(&fixture()))
    }

    const TWO: &str = r#"
secret_env = "S"
[[node]]
name = "a"
address = "127.0.0.1:7000"
memory = "3 MB"
[[node]]
name = "b"
address = "127.0.0.1:7010"
memory = "1 MB"
"#;

    #[test]
    fn layer_split_is_memory_weighted_and_contiguous() {
        let p = plan(&format!("mode = \"layer-split\"\n{TWO}")).unwrap();
        let nodes: Vec<usize> = p.layers.iter().map(|l| l.node).collect();
        assert_eq!(nodes, vec![0, 0, 0, 1]);
        assert!(p.layers[1].experts.iter().all(|&n| n == 0));
        assert_eq!(p.stages(), vec![(0, 0..3), (1, 3..4)]);
        assert_eq!(p.nodes[1].data_address, "127.0.0.1:7011");
    }

    #[test]
    fn expert_split_keeps_layers_on_the_head_and_splits_experts() {
        let p = plan(&format!("mode = \"expert-split\"\n{TWO}")).unwrap();
        assert!(p.layers.iter().all(|l| l.node == 0));
        assert!(p.layers[0].experts.is_empty(), "layer 0 is dense");
        let b: usize = p.layers[1].experts.iter().filter(|&&n| n == 1).count();
        assert_eq!(b, 4, "16 experts at 3:1 → 12 and 4");
        assert_eq!(p.stages(), vec![(0, 0..4)]);
        assert_eq!(p.share(1).experts.len(), 3);
        assert!(p.node_bytes(1) > 0 && p.node_bytes(0) > p.node_bytes(1));
    }

    #[test]
    fn explicit_ranges_and_errors_name_the_problem() {
        let p = plan(&format!("mode = \"expert-split\"\n{TWO}\n[experts]\na = \"0-9\"\nb = \"10-15\"\n[experts.layers.2]\na = \"0-15\"")).unwrap();
        assert_eq!(p.layers[1].experts.iter().filter(|&&n| n == 1).count(), 6);
        assert!(p.layers[2].experts.iter().all(|&n| n == 0));

        let e = plan(&format!(
            "mode = \"expert-split\"\n{TWO}\n[experts]\na = \"0-9\"\nb = \"9-15\""
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("expert 9 is placed twice (a and b)"),
            "{e}"
        );
        let e = plan(&format!(
            "mode = \"expert-split\"\n{TWO}\n[experts]\na = \"0-9\"\nb = \"11-15\""
        ))
        .unwrap_err();
        assert!(e.to_string().contains("expert 10 is not placed"), "{e}");
        let e = plan(&format!(
            "mode = \"layer-split\"\n{TWO}\n[layers]\na = \"0-1\"\nb = \"3\""
        ))
        .unwrap_err();
        assert!(e.to_string().contains("layer 2 is not placed"), "{e}");
        let small = TWO.replace("\"1 MB\"", "\"100 KB\"");
        let e = plan(&format!(
            "mode = \"layer-split\"\n{small}\n[layers]\na = \"0-2\"\nb = \"3\""
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("node `b` would hold")
                && e.to_string().contains("budget is 100 KB"),
            "{e}"
        );
        let e = plan(&format!(
            "mode = \"layer-split\"\n{}",
            TWO.replace("secret_env = \"S\"", "")
        ))
        .unwrap_err();
        assert!(e.to_string().contains("secret_env"), "{e}");
    }

    #[test]
    fn weights_split_and_sizes_add_up() {
        let p = plan(&format!(
            "mode = \"expert-split\"\n{TWO}\n[experts]\na = 1\nb = 1"
        ))
        .unwrap();
        assert_eq!(p.layers[1].experts.iter().filter(|&&n| n == 1).count(), 8);
        let ckpt = Checkpoint::open(&fixture()).unwrap();
        let file_bytes: u64 = ckpt
            .index()
            .iter()
            .map(|(_, d, s)| s.iter().product::<usize>() as u64 * d.bitsize() as u64 / 8)
            .sum();
        let held = p.node_bytes(0) + p.node_bytes(1);
        assert_eq!(held, file_bytes, "MLX tensors are held as stored");
    }

    #[test]
    fn fingerprint_ignores_where_the_model_is_stored() {
        let a = model_fingerprint(&fixture()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(fixture()).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        assert_eq!(model_fingerprint(dir.path()).unwrap(), a);
        let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-kimi-bf16");
        assert_ne!(model_fingerprint(&other).unwrap(), a);
    }
}
