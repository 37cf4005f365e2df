//! Kimi-K2's tool-call section in generated text, parsed incrementally:
//!
//! ```text
//! <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>…<|tool_calls_section_end|>
//! ```
//!
//! Text outside the section is content. A well-formed call becomes a [`ToolCall`] (id `functions.NAME:IDX`, the
//! arguments as given). Anything malformed — an unknown marker order, a call id without `functions.NAME:IDX`,
//! arguments that are not JSON, a section left open at the end — is given back as content, so nothing the
//! model wrote is lost.

pub const SECTION_BEGIN: &str = "<|tool_calls_section_begin|>";
pub const SECTION_END: &str = "<|tool_calls_section_end|>";
pub const CALL_BEGIN: &str = "<|tool_call_begin|>";
pub const ARG_BEGIN: &str = "<|tool_call_argument_begin|>";
pub const CALL_END: &str = "<|tool_call_end|>";

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// `functions.NAME:IDX`, as the model wrote it.
    pub id: String,
    pub name: String,
    /// The JSON arguments, as the model wrote them.
    pub arguments: String,
}

/// What the parser has to hand out after a piece of text.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Call(ToolCall),
}

#[derive(Default)]
pub struct ToolCallParser {
    /// Text not handed out yet (it may be the start of a marker, or an unfinished section).
    buf: String,
    in_section: bool,
    /// The raw text of the open section, given back as content if the section turns out malformed.
    section_raw: String,
    calls_in_section: Vec<ToolCall>,
}

impl ToolCallParser {
    pub fn new() -> ToolCallParser {
        ToolCallParser::default()
    }

    /// Feeds generated text; returns what is settled.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if !self.in_section {
                match self.buf.find(SECTION_BEGIN) {
                    Some(i) => {
                        if i > 0 {
                            out.push(Piece::Content(self.buf[..i].to_string()));
                        }
                        self.buf.drain(..i + SECTION_BEGIN.len());
                        self.in_section = true;
                        self.section_raw = SECTION_BEGIN.to_string();
                        self.calls_in_section.clear();
                    }
                    None => {
                        // Hold back a tail that could be the start of the marker.
                        let keep = partial_suffix(&self.buf, SECTION_BEGIN);
                        let settled = self.buf.len() - keep;
                        if settled > 0 {
                            out.push(Piece::Content(self.buf[..settled].to_string()));
                            self.buf.drain(..settled);
                        }
                        return out;
                    }
                }
            } else {
                // Inside the section: whole calls, then the end marker.
                let trimmed = self.buf.trim_start();
                let skipped = self.buf.len() - trimmed.len();
                if trimmed.starts_with(SECTION_END) {
                    let n = skipped + SECTION_END.len();
                    self.section_raw.push_str(&self.buf[..n]);
                    self.buf.drain(..n);
                    self.in_section = false;
                    out.extend(self.calls_in_section.drain(..).map(Piece::Call));
                    self.section_raw.clear();
                    continue;
                }
                if trimmed.starts_with(CALL_BEGIN) {
                    let Some(end) = trimmed.find(CALL_END) else {
                        return out; // the call is not complete yet
                    };
                    let call = parse_call(&trimmed[CALL_BEGIN.len()..end]);
                    let n = skipped + end + CALL_END.len();
                    let raw = self.buf[..n].to_string();
                    self.section_raw.push_str(&raw);
                    self.buf.drain(..n);
                    match call {
                        Some(call) => self.calls_in_section.push(call),
                        None => self.abandon_section(&mut out),
                    }
                    continue;
                }
                // Something else, unless it could still become a marker.
                if SECTION_END.starts_with(trimmed) || CALL_BEGIN.starts_with(trimmed) {
                    return out;
                }
                self.abandon_section(&mut out);
            }
        }
    }

    /// The end of generation: whatever is held back is content (an unclosed section included).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.in_section {
            self.abandon_section(&mut out);
        }
        if !self.buf.is_empty() {
            out.push(Piece::Content(std::mem::take(&mut self.buf)));
        }
        out
    }

    /// A malformed section: its text so far (and what follows) goes out as content.
    fn abandon_section(&mut self, out: &mut Vec<Piece>) {
        self.in_section = false;
        self.calls_in_section.clear();
        let raw = std::mem::take(&mut self.section_raw) + &std::mem::take(&mut self.buf);
        out.push(Piece::Content(raw));
    }
}

/// `functions.NAME:IDX<|tool_call_argument_begin|>{json}`.
fn parse_call(body: &str) -> Option<ToolCall> {
    let (id, args) = body.split_once(ARG_BEGIN)?;
    let id = id.trim();
    let name = id.strip_prefix("functions.")?.rsplit_once(':')?.0;
    let idx = id.rsplit_once(':')?.1;
    if name.is_empty() || idx.parse::<u32>().is_err() {
        return None;
    }
    let arguments = args.trim();
    serde_json::from_str::<serde_json::Value>(arguments).ok()?;
    Some(ToolCall {
        id: id.to_string(),
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

/// Length of the longest suffix of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one (as tokens would arrive) and collects content and calls.
    fn run(pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let mut p = ToolCallParser::new();
        let mut out: Vec<Piece> = pieces.iter().flat_map(|t| p.push(t)).collect();
        out.extend(p.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for piece in out {
            match piece {
                Piece::Content(c) => content.push_str(&c),
                Piece::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    }

    fn tokens(s: &str) -> Vec<String> {
        // Split like a tokenizer would: markers whole, other text in small pieces.
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if rest.starts_with("<|") {
                let end = rest.find("|>").map_or(rest.len(), |e| e + 2);
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            } else {
                let n = rest.char_indices().nth(3).map_or(rest.len(), |(i, _)| i);
                let n = rest[..n].find("<|").unwrap_or(n);
                out.push(rest[..n].to_string());
                rest = &rest[n..];
            }
        }
        out
    }

    fn run_text(s: &str) -> (String, Vec<ToolCall>) {
        let t = tokens(s);
        run(&t.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn two_calls_after_content() {
        let s = "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Tokyo\"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
        let (content, calls) = run_text(s);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].id, "functions.get_weather:0");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"city\": \"Tokyo\"}");
        assert_eq!(calls[1].name, "get_time");
    }

    #[test]
    fn markers_split_across_pieces_are_recognised() {
        let s = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\":1}<|tool_call_end|><|tool_calls_section_end|>";
        let chars: Vec<String> = s.chars().map(|c| c.to_string()).collect();
        let (content, calls) = run(&chars.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(content, "");
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn malformed_sections_come_back_as_content() {
        for s in [
            // Bad id.
            "x<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
            // Arguments not JSON.
            "x<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{oops<|tool_call_end|><|tool_calls_section_end|>",
            // Never closed.
            "x<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}",
            // Junk inside the section.
            "x<|tool_calls_section_begin|>hello<|tool_calls_section_end|>",
            // Missing the argument marker.
            "x<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0 {}<|tool_call_end|><|tool_calls_section_end|>",
        ] {
            let (content, calls) = run_text(s);
            assert!(calls.is_empty(), "{s}: {calls:?}");
            assert_eq!(content, s, "nothing is lost");
        }
    }

    #[test]
    fn text_that_only_looks_like_a_marker_start_is_released() {
        let (content, calls) = run(&["a <|tool", " b"]);
        assert_eq!(content, "a <|tool b");
        assert!(calls.is_empty());
        let (content, _) = run(&["ends with <|tool_calls"]);
        assert_eq!(content, "ends with <|tool_calls");
    }
}
