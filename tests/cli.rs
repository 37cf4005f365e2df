//! The command-line forms other tools rely on: `logits`, `tokenize` and `generate`.

mod common;
use common::*;
use std::process::Command;

fn kimi(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kimi-actors"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(
        out.status.success(),
        "kimi-actors {args:?} failed: {stderr}"
    );
    (stdout, stderr)
}

fn csv(v: &[u32]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn logits_command_prints_prefill_and_forced_decode_logits() {
    let r = json(&fixture("tiny-kimi-logits-reference.json"));
    let case = &r["fp8"][0];
    let (prompt, forced) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
    let model = fixture("tiny-kimi-fp8");
    let (out, _) = kimi(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &csv(&prompt),
        "--forced-ids",
        &csv(&forced),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let prefill = v["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), prompt.len());
    for (i, row) in case["prefill_logits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let got = floats(&prefill[prompt.len() - 4 + i]);
        assert!(max_abs_diff(&got, &floats(row)) <= LOGIT_TOLERANCE);
    }
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(decode.len(), forced.len());
    for (got, want) in decode.iter().zip(case["decode_logits"].as_array().unwrap()) {
        assert!(max_abs_diff(&floats(got), &floats(want)) <= LOGIT_TOLERANCE);
    }
}

#[test]
fn tokenize_command_for_text_and_chat() {
    let r = json(&fixture("tiny-kimi-tokenizer-reference.json"));
    let model = fixture("tiny-kimi-bf16");
    let case = &r["encode"][2];
    let (out, _) = kimi(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        case["text"].as_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"], case["ids"]);

    let chat = &r["chat"][2];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.json");
    std::fs::write(
        &file,
        serde_json::json!({"messages": chat["messages"], "tools": chat["tools"]}).to_string(),
    )
    .unwrap();
    let (out, _) = kimi(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        file.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rendered"], chat["rendered"]);
    assert_eq!(v["ids"], chat["ids"]);
}

#[test]
fn generate_defaults_to_the_bundled_story_model() {
    let samples = json(&fixture("tiny-kimi-story-samples.json"));
    let want = samples["models"]["mlx_mixed"][1]["text"].as_str().unwrap();
    let (out, err) = kimi(&[
        "generate",
        "--prompt",
        "To be, or not to be",
        "--max-tokens",
        "60",
    ]);
    assert_eq!(out.trim_end_matches('\n'), want);
    assert!(err.contains("tok/s"), "speed goes to stderr: {err}");
}

#[test]
fn generate_with_a_chat_stops_at_end_of_turn() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.json");
    std::fs::write(&file, r#"{"messages": [{"role": "user", "content": "Good morrow, sir. What news from the court?"}]}"#).unwrap();
    let (out, err) = kimi(&[
        "generate",
        "--chat",
        file.to_str().unwrap(),
        "--max-tokens",
        "60",
    ]);
    // mlx-lm's greedy continuation is "I am glad to see you.<|im_end|>…"; generation stops at <|im_end|>.
    assert_eq!(out.trim_end_matches('\n'), "I am glad to see you.");
    assert!(err.contains("Eos"), "{err}");
}

#[test]
fn seeded_sampling_is_reproducible_from_the_cli() {
    let args = [
        "generate",
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "20",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ];
    let (a, _) = kimi(&args);
    let (b, _) = kimi(&args);
    assert_eq!(a, b);
    assert!(!a.trim().is_empty());
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kimi-actors"))
        .args([
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
}
