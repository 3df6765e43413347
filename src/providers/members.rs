//! Finding a few top-level members of a JSON object without parsing the
//! rest. An answer's `usage` sits beside its choices or content blocks, which
//! a full parse would decode and check as UTF-8 only to throw away: on a
//! 700-byte chat completion that parse was 5% of the proxy's CPU per call.

/// The raw values of the members of the top-level object of `json` named
/// `keys` (compared as written, unescaped); `None` when `json` is not an
/// object or ends before it closes. Strings are skipped by searching for
/// their quote and backslashes, nested values by counting brackets: the
/// rest of the text is not validated, only walked.
pub fn top_level_members<'a, const N: usize>(
    json: &'a [u8],
    keys: [&[u8]; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut at = skip_whitespace(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_whitespace(json, at + 1);
    if json.get(at) == Some(&b'}') {
        return Some(found);
    }
    loop {
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, at)?;
        let key = &json[at + 1..key_end - 1];
        at = skip_whitespace(json, key_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        at = skip_whitespace(json, at + 1);
        let value_end = value_end(json, at)?;
        if let Some(slot) = keys.iter().position(|wanted| *wanted == key) {
            found[slot] = Some(&json[at..value_end]);
        }
        at = skip_whitespace(json, value_end);
        match json.get(at)? {
            b',' => at = skip_whitespace(json, at + 1),
            b'}' => return Some(found),
            _ => return None,
        }
    }
}

/// How many items the JSON array `json` holds, walked as
/// `top_level_members` walks an object; `None` when it is not an array.
pub fn array_len(json: &[u8]) -> Option<u64> {
    let mut at = skip_whitespace(json, 0);
    if json.get(at) != Some(&b'[') {
        return None;
    }
    at = skip_whitespace(json, at + 1);
    if json.get(at) == Some(&b']') {
        return Some(0);
    }
    let mut items = 0;
    loop {
        at = skip_whitespace(json, value_end(json, at)?);
        items += 1;
        match json.get(at)? {
            b',' => at = skip_whitespace(json, at + 1),
            b']' => return Some(items),
            _ => return None,
        }
    }
}

fn skip_whitespace(json: &[u8], mut at: usize) -> usize {
    while json
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        at += 1;
    }
    at
}

/// Where the JSON string whose contents start at `from` closes: the index
/// of its closing quote, escaped characters skipped; `None` when it does not
/// close within `json`.
pub fn closing_quote(json: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let found = find(json, at, ByteSet::StringEnd)?;
        if json[found] == b'"' {
            return Some(found);
        }
        at = found + 2;
    }
}

/// Just past the closing quote of the string opening at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    closing_quote(json, start + 1).map(|quote| quote + 1)
}

/// Just past the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match *json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = start;
            loop {
                at = find(json, at, ByteSet::Nesting)?;
                match json[at] {
                    b'"' => {
                        at = string_end(json, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                }
                at += 1;
            }
        }
        _ => {
            let len = json[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t'))?;
            (len > 0).then_some(start + len)
        }
    }
}

/// The bytes a walk over JSON stops at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ByteSet {
    /// Inside a string: its closing quote or an escape.
    StringEnd,
    /// Between strings in a nested value: a quote or a bracket.
    Nesting,
}

impl ByteSet {
    fn contains(self, byte: u8) -> bool {
        match self {
            ByteSet::StringEnd => matches!(byte, b'"' | b'\\'),
            ByteSet::Nesting => matches!(byte, b'"' | b'{' | b'}' | b'[' | b']'),
        }
    }
}

/// The index of the first byte at or after `from` that is in `set`.
///
/// Sixteen bytes at a time: a provider's answer is mostly short strings and
/// indentation, where a general search (`memchr2`, a call and its set-up
/// for every string) or a byte-by-byte loop cost the proxy ~10,000
/// instructions on a 700-byte chat completion.
#[cfg(target_arch = "x86_64")]
fn find(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    // SAFETY: SSE2 is part of every x86_64 target.
    unsafe { find_sse2(json, from, set) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn find_sse2(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let [
        quote,
        backslash,
        open_brace,
        close_brace,
        open_bracket,
        close_bracket,
    ] = [b'"', b'\\', b'{', b'}', b'[', b']'].map(|byte| _mm_set1_epi8(byte as i8));
    let mut at = from;
    while at + 16 <= json.len() {
        // SAFETY: the 16 bytes read, `at..at + 16`, lie inside `json`
        // (checked just above), and the load has no alignment requirement.
        let chunk = unsafe { _mm_loadu_si128(json.as_ptr().add(at).cast()) };
        let quotes = _mm_cmpeq_epi8(chunk, quote);
        let hits = match set {
            ByteSet::StringEnd => _mm_or_si128(quotes, _mm_cmpeq_epi8(chunk, backslash)),
            ByteSet::Nesting => _mm_or_si128(
                _mm_or_si128(quotes, _mm_cmpeq_epi8(chunk, open_brace)),
                _mm_or_si128(
                    _mm_or_si128(
                        _mm_cmpeq_epi8(chunk, close_brace),
                        _mm_cmpeq_epi8(chunk, open_bracket),
                    ),
                    _mm_cmpeq_epi8(chunk, close_bracket),
                ),
            ),
        };
        let mask = _mm_movemask_epi8(hits) as u32;
        if mask != 0 {
            return Some(at + mask.trailing_zeros() as usize);
        }
        at += 16;
    }
    find_bytewise(json, at, set)
}

#[cfg(not(target_arch = "x86_64"))]
fn find(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    find_bytewise(json, from, set)
}

fn find_bytewise(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    let offset = json.get(from..)?.iter().position(|&b| set.contains(b))?;
    Some(from + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members<'a, const N: usize>(json: &'a str, keys: [&str; N]) -> Option<[Option<&'a str>; N]> {
        let found = top_level_members(json.as_bytes(), keys.map(str::as_bytes))?;
        Some(found.map(|value| value.map(|v| std::str::from_utf8(v).unwrap())))
    }

    #[test]
    fn counts_an_arrays_items_as_serde_json_does() {
        for json in [
            "[]",
            " [ ] ",
            "[1]",
            r#"[{"role":"user","content":"a, b ] [\"x\"]"}, [1, [2, 3]], "s", null, 4.5e1]"#,
            "[\n  {\"a\": [1,2]} ,\n  \"]\"\n]",
        ] {
            let expected = serde_json::from_str::<Vec<serde_json::Value>>(json)
                .unwrap()
                .len() as u64;
            assert_eq!(array_len(json.as_bytes()), Some(expected), "{json}");
        }
        assert_eq!(array_len(br#"{"a":1}"#), None);
        assert_eq!(array_len(br#""[1,2]""#), None);
        assert_eq!(array_len(b"[1, 2"), None);
    }

    #[test]
    fn finds_top_level_members_and_only_those() {
        let json = r#" { "choices": [{"message": {"content": "a \"usage\": {\"x\":1} }", "usage": 5}}],
            "nested": {"usage": {"deep": [1, {"usage": 2}]}},
            "usage" : {"prompt_tokens": 3, "completion_tokens": 4} ,
            "input_tokens": 17, "tail": "}]\\" } "#;
        assert_eq!(
            members(json, ["usage", "input_tokens", "missing"]),
            Some([
                Some(r#"{"prompt_tokens": 3, "completion_tokens": 4}"#),
                Some("17"),
                None
            ])
        );
        assert_eq!(members("{}", ["usage"]), Some([None]));
        assert_eq!(
            members(r#"{"usage":null}"#, ["usage"]),
            Some([Some("null")])
        );
    }

    #[test]
    fn the_wide_search_stops_where_a_byte_by_byte_one_does() {
        // Every offset of texts of every length up to three chunks, made of
        // the bytes either set stops at and bytes neither does.
        let alphabet = b"\"\\{}[]a :,\n";
        let mut seed = 0x2545_f491_u32;
        for len in 0..48 {
            for _ in 0..40 {
                let text: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        // Mostly plain bytes, so that some chunks hold no stop.
                        if seed.is_multiple_of(4) {
                            alphabet[(seed / 4) as usize % alphabet.len()]
                        } else {
                            b'x'
                        }
                    })
                    .collect();
                for from in 0..=len + 1 {
                    for set in [ByteSet::StringEnd, ByteSet::Nesting] {
                        assert_eq!(
                            find(&text, from, set),
                            find_bytewise(&text, from, set),
                            "{:?} from {from}",
                            String::from_utf8_lossy(&text)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn text_that_is_not_a_whole_object_finds_nothing() {
        for json in [
            "",
            "[1]",
            r#""usage""#,
            r#"{"usage": {"a": 1}"#,
            r#"{"usage": "open"#,
            r#"{"usage" {"a": 1}}"#,
            r#"{"a": 1 "usage": 2}"#,
            r#"{"usage": }"#,
            r#"{"a": "\"#,
        ] {
            assert_eq!(members(json, ["usage"]), None, "{json}");
        }
    }
}
