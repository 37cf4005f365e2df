//! The same prompt gives the same logits under every placement: one process, two processes splitting layers,
//! two processes splitting experts — within 1e-4 of each other and 1e-3 of mlx-lm — and the same greedy text.

mod common;
use common::*;

fn logits(
    model: &std::path::Path,
    placement: Option<&std::path::Path>,
    prompt: &[u32],
    forced: &[u32],
) -> Vec<Vec<f32>> {
    let (p, f) = (csv(prompt), csv(forced));
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &p,
        "--forced-ids",
        &f,
    ];
    if let Some(pl) = placement {
        args.extend(["--placement", pl.to_str().unwrap(), "--spawn-local"]);
    }
    let v: serde_json::Value = serde_json::from_str(&run_ok(&args)).unwrap();
    let mut rows: Vec<Vec<f32>> = v["prefill"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    rows.extend(v["decode"].as_array().unwrap().iter().map(floats));
    rows
}

fn csv(v: &[u32]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn check(fixture_dir: &str, key: &str) {
    let model = fixture(fixture_dir);
    let r = json(&fixture("tiny-kimi-logits-reference.json"));
    let case = &r[key][1];
    let (prompt, forced) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
    let dir = tempfile::tempdir().unwrap();
    let layer = two_node_placement(
        dir.path(),
        "layer-split",
        &model,
        "[layers]\na = \"0-1\"\nb = \"2-3\"",
    );
    let expert = two_node_placement(dir.path(), "expert-split", &model, "");

    let local = logits(&model, None, &prompt, &forced);
    let mut want: Vec<Vec<f32>> = Vec::new();
    let n = prompt.len();
    for (i, row) in case["prefill_logits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        want.push(floats(row));
        let d = max_abs_diff(&local[n - 4 + i], want.last().unwrap());
        assert!(d <= LOGIT_TOLERANCE, "{key} local prefill {i}: {d}");
    }
    for (s, row) in case["decode_logits"].as_array().unwrap().iter().enumerate() {
        let d = max_abs_diff(&local[n + s], &floats(row));
        assert!(d <= LOGIT_TOLERANCE, "{key} local decode {s}: {d}");
    }
    for (name, placement) in [("layer-split", &layer), ("expert-split", &expert)] {
        let other = logits(&model, Some(placement), &prompt, &forced);
        assert_eq!(other.len(), local.len());
        let d = local
            .iter()
            .zip(&other)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "{key}: {name} differs from local by {d}");
        eprintln!("{key}: {name} vs local max |Δ| = {d:.2e}");
    }
}

#[test]
fn bf16_across_placements() {
    check("tiny-kimi-bf16", "bf16");
}

#[test]
fn fp8_across_placements() {
    check("tiny-kimi-fp8", "fp8");
}

#[test]
fn mlx_mixed_across_placements() {
    check("tiny-kimi-mlx-mixed", "mlx_mixed");
}

#[test]
fn greedy_text_is_the_same_under_every_placement() {
    let model = story_model();
    let dir = tempfile::tempdir().unwrap();
    let layer = two_node_placement(dir.path(), "layer-split", &model, "");
    let expert = two_node_placement(
        dir.path(),
        "expert-split",
        &model,
        "[experts]\na = 1\nb = 3",
    );
    let args = ["generate", "--prompt", "ROMEO:", "--max-tokens", "40"];
    let local = run_ok(&args);
    let samples = json(&fixture("tiny-kimi-story-samples.json"));
    let want = samples["models"]["mlx_mixed"][0]["text"].as_str().unwrap();
    assert!(
        want.starts_with(local.trim_end_matches('\n')),
        "{local:?} vs mlx-lm {want:?}"
    );
    for p in [&layer, &expert] {
        let mut a = args.to_vec();
        a.extend(["--placement", p.to_str().unwrap(), "--spawn-local"]);
        assert_eq!(run_ok(&a), local, "{}", p.display());
    }
}
