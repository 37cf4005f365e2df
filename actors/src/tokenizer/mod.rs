//! The model's tokenizer and chat template, loaded from the model directory: Kimi's `tiktoken.model` with the
//! specials of `tokenizer_config.json`, or a plain HF `tokenizer.json` when that is what the model ships.

pub mod chat;
pub mod tiktoken;
pub mod tool_calls;

use crate::error::{Error, Result, read_json};
use chat::ChatTemplate;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tiktoken::Tiktoken;

/// Kimi reserves this many special ids after the base vocabulary.
const RESERVED_SPECIALS: u32 = 256;

enum Backend {
    Tiktoken(Box<Tiktoken>),
    Hf(Box<tokenizers::Tokenizer>),
}

pub struct Tokenizer {
    backend: Backend,
    path: PathBuf,
    chat: Option<ChatTemplate>,
    chat_source: Option<String>,
    pub bos: Option<u32>,
    bos_text: String,
    /// Generation stops at any of these.
    pub eos: Vec<u32>,
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Json::Null
        };
        let tik_path = dir.join("tiktoken.model");
        let hf_path = dir.join("tokenizer.json");
        let (backend, path) = if tik_path.exists() {
            let named = added_tokens(&cfg, &cfg_path)?;
            (
                Backend::Tiktoken(Box::new(Tiktoken::load(
                    &tik_path,
                    named,
                    RESERVED_SPECIALS,
                )?)),
                tik_path,
            )
        } else if hf_path.exists() {
            let t = tokenizers::Tokenizer::from_file(&hf_path).map_err(|e| Error::Tokenizer {
                path: hf_path.clone(),
                message: e.to_string(),
            })?;
            (Backend::Hf(Box::new(t)), hf_path)
        } else {
            return Err(Error::Tokenizer {
                path: dir.to_path_buf(),
                message: "no tiktoken.model or tokenizer.json".into(),
            });
        };
        let mut tok = Tokenizer {
            backend,
            path,
            chat: None,
            chat_source: None,
            bos: None,
            bos_text: String::new(),
            eos: Vec::new(),
        };
        let token_text = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        if let Some(b) = token_text("bos_token") {
            tok.bos = tok.special_id(&b);
            tok.bos_text = b;
        }
        let mut eos: Vec<u32> = Vec::new();
        if let Some(e) = token_text("eos_token").and_then(|e| tok.special_id(&e)) {
            eos.push(e);
        }
        if let Some(e) = tok.special_id("<|im_end|>") {
            eos.push(e);
        }
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            match g.get("eos_token_id") {
                Some(Json::Number(n)) => eos.extend(n.as_u64().map(|v| v as u32)),
                Some(Json::Array(a)) => {
                    eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
            if tok.bos.is_none() {
                tok.bos = g
                    .get("bos_token_id")
                    .and_then(|v| v.as_u64())
                    .map(|v| v as u32);
            }
        }
        eos.sort_unstable();
        eos.dedup();
        tok.eos = eos;
        let template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // Some configs hold a list of named templates.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        if let Some(t) = template {
            tok.chat = Some(ChatTemplate::new(&t)?);
            tok.chat_source = Some(t);
        }
        Ok(tok)
    }

    /// The chat template's source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_source.as_deref()
    }

    pub fn special_id(&self, text: &str) -> Option<u32> {
        match &self.backend {
            Backend::Tiktoken(t) => t.special_id(text),
            Backend::Hf(t) => t.token_to_id(text),
        }
    }

    /// Text → ids; special token text becomes the special id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Tiktoken(t) => Ok(t.encode(text)),
            Backend::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?
                .get_ids()
                .to_vec()),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut s = self.stream();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&s.push(id)?);
        }
        out.push_str(&s.finish());
        Ok(out)
    }

    /// Renders a chat (`messages`, optional `tools`) with the generation prompt.
    pub fn render_chat(&self, messages: &Json, tools: Option<&Json>) -> Result<String> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            Error::Template(format!(
                "{}: the model has no chat_template",
                self.path.display()
            ))
        })?;
        chat.render(messages, tools, &[("bos_token", &self.bos_text)])
    }

    /// An incremental decoder for a stream of generated ids.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tok: self,
            pending: Vec::new(),
            ids: Vec::new(),
            prefix_len: 0,
        }
    }
}

/// Decodes ids one at a time and only ever returns whole UTF-8 characters: bytes of a character split across
/// tokens are held until the character completes.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    /// Tiktoken: undecoded bytes.
    pending: Vec<u8>,
    /// HF: the ids since the last emitted boundary, and the length of their text already emitted.
    ids: Vec<u32>,
    prefix_len: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        match &self.tok.backend {
            Backend::Tiktoken(t) => {
                self.pending.extend_from_slice(t.token_bytes(id));
                Ok(take_utf8(&mut self.pending, false))
            }
            Backend::Hf(t) => {
                self.ids.push(id);
                let text = t.decode(&self.ids, false).map_err(|e| Error::Tokenizer {
                    path: self.tok.path.clone(),
                    message: e.to_string(),
                })?;
                if text.len() <= self.prefix_len || text.ends_with('\u{FFFD}') {
                    return Ok(String::new());
                }
                let new = text.get(self.prefix_len..).unwrap_or_default().to_string();
                // Keep the last id as context (byte-level decoders join across ids).
                let last = *self.ids.last().unwrap_or(&id);
                self.ids = vec![last];
                self.prefix_len = t.decode(&self.ids, false).map(|s| s.len()).unwrap_or(0);
                Ok(new)
            }
        }
    }

    /// Whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        take_utf8(&mut self.pending, true)
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `buf`. Invalid bytes become U+FFFD; an incomplete
/// character at the end stays in `buf` unless `flush`.
fn take_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &bad[n..];
                    }
                    None if flush => {
                        out.push('\u{FFFD}');
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *buf = keep;
    out
}

/// Named specials of `tokenizer_config.json` `added_tokens_decoder` (text → id).
fn added_tokens(cfg: &Json, cfg_path: &Path) -> Result<HashMap<String, u32>> {
    let mut specials = HashMap::new();
    if let Some(map) = cfg.get("added_tokens_decoder").and_then(|m| m.as_object()) {
        for (id, entry) in map {
            let id: u32 = id.parse().map_err(|_| Error::Config {
                path: cfg_path.to_path_buf(),
                field: format!("added_tokens_decoder.{id}"),
                message: "key is not a token id".into(),
            })?;
            let content = entry
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| Error::Config {
                    path: cfg_path.to_path_buf(),
                    field: format!("added_tokens_decoder.{id}.content"),
                    message: "missing".into(),
                })?;
            specials.insert(content.to_string(), id);
        }
    }
    Ok(specials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_held_until_complete() {
        let mut buf = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_utf8(&mut buf, false), "");
        buf.push("é".as_bytes()[1]);
        buf.extend_from_slice(b"a\xff");
        assert_eq!(take_utf8(&mut buf, false), "éa\u{FFFD}");
        buf.extend_from_slice(&"日".as_bytes()[..2]);
        assert_eq!(take_utf8(&mut buf, false), "");
        assert_eq!(take_utf8(&mut buf, true), "\u{FFFD}");
        assert!(buf.is_empty());
    }
}
