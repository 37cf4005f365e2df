//! Kimi's tokenizer: a tiktoken byte-level BPE (`tiktoken.model`: base64 token and rank per line) with
//! Kimi's pre-tokenizer regex, plus special tokens that are recognised anywhere in the text
//! (`allowed_special="all"`, as Kimi's `encode` does).

use crate::error::{Error, Result};
use base64::Engine;
use std::collections::HashMap;
use std::path::Path;

/// `pat_str` of Kimi-K2's `tokenization_kimi.py`.
pub const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

pub struct Tiktoken {
    ranks: HashMap<Vec<u8>, u32>,
    /// Bytes of every id (base tokens and specials); empty for ids with no token.
    bytes: Vec<Vec<u8>>,
    specials: HashMap<String, u32>,
    special_re: Option<fancy_regex::Regex>,
    pattern: fancy_regex::Regex,
}

impl Tiktoken {
    /// Reads `tiktoken.model`. `named` maps special token text to id; of the `reserved` ids after the base
    /// vocabulary, those it leaves unnamed become `<|reserved_token_{id}|>` (as `tokenization_kimi.py` does).
    pub fn load(path: &Path, named: HashMap<String, u32>, reserved: u32) -> Result<Tiktoken> {
        let err = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut ranks = HashMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut parts = line.split_whitespace();
            let (Some(b64), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err(format!("line {}: expected `<base64> <rank>`", n + 1)));
            };
            let token = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| err(format!("line {}: bad base64: {e}", n + 1)))?;
            let rank: u32 = rank
                .parse()
                .map_err(|_| err(format!("line {}: bad rank `{rank}`", n + 1)))?;
            ranks.insert(token, rank);
        }
        let n_base = ranks.len() as u32;
        let mut specials = named;
        let taken: std::collections::HashSet<u32> = specials.values().copied().collect();
        for id in (n_base..n_base + reserved).filter(|id| !taken.contains(id)) {
            specials.insert(format!("<|reserved_token_{id}|>"), id);
        }
        let top = ranks
            .values()
            .copied()
            .chain(specials.values().copied())
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut bytes = vec![Vec::new(); top];
        for (tok, &r) in &ranks {
            bytes[r as usize] = tok.clone();
        }
        for (s, &id) in &specials {
            bytes[id as usize] = s.as_bytes().to_vec();
        }
        let special_re = if specials.is_empty() {
            None
        } else {
            // Longest first, so a special that prefixes another never shadows it.
            let mut names: Vec<&String> = specials.keys().collect();
            names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
            let alt: Vec<String> = names
                .iter()
                .map(|s| fancy_regex::escape(s).into_owned())
                .collect();
            Some(
                fancy_regex::Regex::new(&alt.join("|"))
                    .map_err(|e| err(format!("special tokens: {e}")))?,
            )
        };
        let pattern =
            fancy_regex::Regex::new(KIMI_PATTERN).map_err(|e| err(format!("pattern: {e}")))?;
        Ok(Tiktoken {
            ranks,
            bytes,
            specials,
            special_re,
            pattern,
        })
    }

    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials.get(text).copied()
    }

    /// The bytes of `id` (a special decodes to its text; an unknown id to nothing).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut start = 0;
        if let Some(re) = &self.special_re {
            for m in re.find_iter(text).flatten() {
                self.encode_ordinary(&text[start..m.start()], &mut ids);
                ids.push(self.specials[m.as_str()]);
                start = m.end();
            }
        }
        self.encode_ordinary(&text[start..], &mut ids);
        ids
    }

    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in self.pattern.find_iter(text).flatten() {
            let b = piece.as_str().as_bytes();
            match self.ranks.get(b) {
                Some(&r) => ids.push(r),
                None => self.byte_pair_merge(b, ids),
            }
        }
    }

    /// tiktoken's merge loop: repeatedly join the adjacent pair whose concatenation has the lowest rank.
    fn byte_pair_merge(&self, piece: &[u8], ids: &mut Vec<u32>) {
        let rank_of = |bounds: &[usize], i: usize| -> u32 {
            if i + 2 < bounds.len() {
                self.ranks
                    .get(&piece[bounds[i]..bounds[i + 2]])
                    .copied()
                    .unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        let mut bounds: Vec<usize> = (0..=piece.len()).collect();
        let mut pair_ranks: Vec<u32> = (0..bounds.len()).map(|i| rank_of(&bounds, i)).collect();
        while let Some((best, &rank)) = pair_ranks.iter().enumerate().min_by_key(|&(i, r)| (*r, i))
        {
            if rank == u32::MAX {
                break;
            }
            bounds.remove(best + 1);
            pair_ranks.remove(best + 1);
            pair_ranks[best] = rank_of(&bounds, best);
            if best > 0 {
                pair_ranks[best - 1] = rank_of(&bounds, best - 1);
            }
        }
        for w in bounds.windows(2) {
            // Every single byte is a base token in a byte-level BPE; a gap means a broken vocabulary.
            if let Some(&r) = self.ranks.get(&piece[w[0]..w[1]]) {
                ids.push(r);
            }
        }
    }
}
