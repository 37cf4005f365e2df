//! The trained story model's greedy continuations equal mlx-lm's, token for token (60 tokens, KV cache).

mod common;
use common::*;
use engine::generate::{Sampler, SamplingParams};

fn check(model_dir: std::path::PathBuf, key: &str) {
    let model = load_model(&model_dir);
    let samples = json(&fixture("tiny-kimi-story-samples.json"));
    let prompts = samples["prompts"].as_array().unwrap();
    for (prompt, expected) in prompts
        .iter()
        .zip(samples["models"][key].as_array().unwrap())
    {
        let want = ids(&expected["greedy_ids"]);
        let mut cache = model.new_cache().unwrap();
        let mut sampler = Sampler::new(SamplingParams::default());
        // mlx-lm's samples run the full 60 tokens without stopping at end-of-turn ids.
        let mut feed = ids(&prompt["ids"]);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let logits = last_logits(&model, &feed, &mut cache);
            let next = sampler.sample(&logits);
            got.push(next);
            feed = vec![next];
        }
        assert_eq!(got, want, "{key}: prompt {}", prompt["text"]);
    }
}

#[test]
fn story_mlx_mixed_greedy_matches_mlx_lm() {
    check(story_model(), "mlx_mixed");
}

#[test]
fn story_bf16_greedy_matches_mlx_lm() {
    check(fixture("tiny-kimi-story-bf16"), "bf16_mlx_layout");
}
