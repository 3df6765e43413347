//! Token counting with tiktoken's vocabularies, read in place from tables
//! that `build.rs` lays out in the binary. The same pre-tokenizing pattern
//! and the same merge order as tiktoken, so the same counts (tested against
//! tiktoken-rs), without tiktoken-rs's hash maps: those took 42 MB of heap
//! for `o200k_base` and 17 MB for `cl100k_base`, loaded by the first call
//! that needed an estimate and kept for good.

use std::sync::OnceLock;

include!("token_hash.rs");

type Rank = u32;

/// One vocabulary: its table (see build.rs) and its pattern.
pub struct Vocabulary {
    table: &'static [u8],
    /// Where the slots and the token bytes begin, in u32 words and bytes.
    slots_at: usize,
    arena_at: usize,
    mask: usize,
    pattern: fancy_regex::Regex,
}

/// The table's `index`th little-endian u32.
fn word(table: &[u8], index: usize) -> usize {
    u32::from_le_bytes(table[index * 4..index * 4 + 4].try_into().unwrap()) as usize
}

static O200K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.bin"));
static CL100K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.bin"));

/// tiktoken's `o200k_base` pre-tokenizer.
const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// tiktoken's `cl100k_base` pre-tokenizer.
const CL100K_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn o200k_base() -> &'static Vocabulary {
    static VOCABULARY: OnceLock<Vocabulary> = OnceLock::new();
    VOCABULARY.get_or_init(|| Vocabulary::new(O200K_TABLE, O200K_PATTERN))
}

pub fn cl100k_base() -> &'static Vocabulary {
    static VOCABULARY: OnceLock<Vocabulary> = OnceLock::new();
    VOCABULARY.get_or_init(|| Vocabulary::new(CL100K_TABLE, CL100K_PATTERN))
}

impl Vocabulary {
    fn new(table: &'static [u8], pattern: &str) -> Vocabulary {
        let (tokens, slots) = (word(table, 0), word(table, 1));
        let slots_at = 2 + tokens + 1;
        Vocabulary {
            table,
            slots_at,
            arena_at: (slots_at + slots) * 4,
            mask: slots - 1,
            pattern: fancy_regex::Regex::new(pattern).expect("tiktoken's pattern compiles"),
        }
    }

    fn token(&self, rank: usize) -> &[u8] {
        let (start, end) = (word(self.table, 2 + rank), word(self.table, 3 + rank));
        &self.table[self.arena_at + start..self.arena_at + end]
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let mut at = token_hash(bytes) as usize & self.mask;
        loop {
            let slot = word(self.table, self.slots_at + at);
            if slot == 0 {
                return None;
            }
            if self.token(slot - 1) == bytes {
                return Some((slot - 1) as Rank);
            }
            at = (at + 1) & self.mask;
        }
    }

    /// What tiktoken's `encode_ordinary(text).len()` is. Should the pattern
    /// give up on a piece (fancy-regex's backtracking limit), the rest is
    /// counted at four bytes a token.
    pub fn count(&self, text: &str) -> u64 {
        let mut count = 0u64;
        let mut counted_to = 0;
        for piece in self.pattern.find_iter(text) {
            let Ok(piece) = piece else {
                return count + (text.len() - counted_to).div_ceil(4) as u64;
            };
            counted_to = piece.end();
            count += self.count_piece(piece.as_str().as_bytes()) as u64;
        }
        count
    }

    /// tiktoken's byte pair merge: the lowest-ranked adjacent pair is
    /// merged until no pair is a token; the parts left are the tokens.
    fn count_piece(&self, piece: &[u8]) -> usize {
        if piece.len() == 1 || self.rank(piece).is_some() {
            return 1;
        }
        let rank_of = |bytes: &[u8]| self.rank(bytes).unwrap_or(Rank::MAX);
        let mut parts: Vec<(usize, Rank)> = Vec::with_capacity(piece.len() + 1);
        let mut min_rank: (Rank, usize) = (Rank::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = rank_of(&piece[i..i + 2]);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, Rank::MAX));
        parts.push((piece.len(), Rank::MAX));
        let pair_rank = |parts: &[(usize, Rank)], i: usize| {
            if i + 3 < parts.len() {
                rank_of(&piece[parts[i].0..parts[i + 3].0])
            } else {
                Rank::MAX
            }
        };
        while min_rank.0 != Rank::MAX {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = pair_rank(&parts, i - 1);
            }
            parts[i].1 = pair_rank(&parts, i);
            parts.remove(i + 1);
            min_rank = (Rank::MAX, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        parts.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<String> {
        let mut texts: Vec<String> = [
            "Hello, world! How are you doing today?",
            "   leading spaces and trailing   \n\n\r\n  ",
            "numbers 1234567 3.14159 -42 1e10 0x1F 2026-12-02T07:23:47Z",
            "I'm sure they've said we'll go; you'd THEY'RE IT'S",
            "Ünïcödé façade naïve résumé — “quotes” … ½ ©",
            "日本語のテキストとカタカナ、中文字符，한국어 텍스트",
            "emoji 👋🏽 👨‍👩‍👧‍👦 🇫🇷 ✨ and symbols ∑∫√∞≠",
            "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
            "def f(a, b):\n\treturn a ** b  # comment\n\n\n",
            "<|endoftext|> is ordinary text here, as are <tags> and &amp;",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "http://example.com/path/to/file.json?query=1&other=two#frag",
            "",
            " ",
            "\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for fixture in [
            "tests/fixtures/openai/chat_completion.json",
            "tests/fixtures/openai/chat_stream_include_usage.sse",
            "tests/fixtures/anthropic/message_stream.sse",
            "tests/fixtures/openai/responses.json",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture);
            texts.push(std::fs::read_to_string(&path).unwrap());
        }
        // Pseudo-random mixes of scripts, digits, spaces and punctuation.
        let alphabet: Vec<char> =
            "abcXYZ019 \n\t.,;:'\"!?-_/()[]{}éüßøçЖжπλ日本中文한😀🚀%$#@&*+=<>|\\~`"
                .chars()
                .collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for length in [10, 100, 1_000, 5_000] {
            let text: String = (0..length)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            texts.push(text);
        }
        texts
    }

    #[test]
    fn counts_are_tiktokens_for_both_vocabularies() {
        let reference = [
            (o200k_base(), tiktoken_rs::o200k_base().unwrap()),
            (cl100k_base(), tiktoken_rs::cl100k_base().unwrap()),
        ];
        for (ours, theirs) in &reference {
            for text in samples() {
                assert_eq!(
                    ours.count(&text),
                    theirs.encode_ordinary(&text).len() as u64,
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn every_token_is_found_under_its_own_rank() {
        for vocabulary in [o200k_base(), cl100k_base()] {
            for rank in (0..word(vocabulary.table, 0)).step_by(97) {
                assert_eq!(vocabulary.rank(vocabulary.token(rank)), Some(rank as Rank));
            }
        }
    }
}
