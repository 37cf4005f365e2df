//! Token ids equal tiktoken's, chat renderings equal jinja2's, and streaming decode never breaks UTF-8.

mod common;
use common::*;
use engine::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&fixture("tiny-kimi-bf16")).unwrap()
}

#[test]
fn encode_equals_tiktoken() {
    let tok = tokenizer();
    let r = json(&fixture("tiny-kimi-tokenizer-reference.json"));
    for case in r["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"])).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
}

#[test]
fn chat_rendering_equals_jinja2_byte_for_byte() {
    let tok = tokenizer();
    let r = json(&fixture("tiny-kimi-tokenizer-reference.json"));
    for case in r["chat"].as_array().unwrap() {
        let tools = Some(&case["tools"]).filter(|t| !t.is_null());
        let rendered = tok.render_chat(&case["messages"], tools).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        assert_eq!(tok.encode(&rendered).unwrap(), ids(&case["ids"]));
    }
}

#[test]
fn story_chat_prompt_matches_reference_ids() {
    let tok = Tokenizer::load(&story_model()).unwrap();
    let samples = json(&fixture("tiny-kimi-story-samples.json"));
    for p in samples["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let mut want = ids(&p["ids"]);
        if p["kind"] == "plain" {
            assert_eq!(
                want.remove(0),
                tok.bos.unwrap(),
                "plain prompts start with BOS"
            );
        } else {
            assert_eq!(tok.render_chat(&p["messages"], None).unwrap(), text);
        }
        assert_eq!(tok.encode(text).unwrap(), want);
    }
}

#[test]
fn end_of_turn_ids_come_from_the_configs() {
    let tok = tokenizer();
    // generation_config.json: [EOS] 957 and <|im_end|> 958.
    assert_eq!(tok.eos, vec![957, 958]);
    assert_eq!(tok.bos, Some(956));
}

#[test]
fn streaming_decode_emits_only_whole_characters() {
    let tok = tokenizer();
    let text = "東京は日本の首都です。1兆パラメータ 🎉 done";
    let ids = tok.encode(text).unwrap();
    let mut stream = tok.stream();
    let mut out = String::new();
    let mut split_seen = false;
    for id in ids {
        let piece = stream.push(id).unwrap();
        split_seen |= piece.is_empty();
        out.push_str(&piece);
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);
    assert!(
        split_seen,
        "some token should end inside a multi-byte character in this text"
    );
}

#[test]
fn hf_tokenizer_json_gives_the_same_ids_text_and_chat() {
    // tests/tools/hf_tokenizer_json.py converted tiny-kimi's tiktoken.model with transformers' converter.
    let hf = Tokenizer::load(&fixture("hf-tokenizer")).unwrap();
    let r = json(&fixture("tiny-kimi-tokenizer-reference.json"));
    for case in r["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(hf.encode(text).unwrap(), ids(&case["ids"]), "text {text:?}");
        assert_eq!(hf.decode(&ids(&case["ids"])).unwrap(), text);
    }
    let chat = &r["chat"][1];
    assert_eq!(
        hf.render_chat(&chat["messages"], None).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
    assert_eq!(hf.eos, vec![957, 958]);
}
