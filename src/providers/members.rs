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

/// The raw value of the top-level member of the object `json` named `key`,
/// found walking back from the object's end, where every provider puts an
/// answer's `usage`: the choices or content blocks before it are never
/// read, however long. The last such member if there are several (as
/// `top_level_members` keeps); `Some(None)` when there is none; `None` when
/// `json` is not an object or the part walked is not well formed (the
/// members before the one found are not looked at).
pub fn top_level_member_from_end<'a>(json: &'a [u8], key: &[u8]) -> Option<Option<&'a [u8]>> {
    let open = skip_whitespace(json, 0);
    if json.get(open) != Some(&b'{') {
        return None;
    }
    let close = last_non_whitespace(json, json.len())?;
    if close == open || json[close] != b'}' {
        return None;
    }
    let mut last = last_non_whitespace(json, close)?;
    if last == open {
        return Some(None);
    }
    loop {
        let start = value_start(json, last)?;
        let colon = last_non_whitespace(json, start)?;
        let key_close = last_non_whitespace(json, colon)?;
        if json[colon] != b':' || json[key_close] != b'"' || escaped(json, key_close) {
            return None;
        }
        let key_open = opening_quote(json, key_close)?;
        if &json[key_open + 1..key_close] == key {
            return Some(Some(&json[start..=last]));
        }
        let before = last_non_whitespace(json, key_open)?;
        match json[before] {
            b',' => last = last_non_whitespace(json, before)?,
            b'{' if before == open => return Some(None),
            _ => return None,
        }
    }
}

/// Where the value whose last byte is at `last` starts, walking back.
fn value_start(json: &[u8], last: usize) -> Option<usize> {
    match json[last] {
        b'"' if escaped(json, last) => None,
        b'"' => opening_quote(json, last),
        b'}' | b']' => {
            let (mut depth, mut at) = (0usize, last);
            loop {
                match json[at] {
                    b'"' if escaped(json, at) => return None,
                    b'"' => at = opening_quote(json, at)?,
                    b'}' | b']' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at);
                        }
                    }
                }
                at = rfind(json, at, ByteSet::Nesting)?;
            }
        }
        byte => {
            // A number or a literal: no byte of one can end the walk.
            let ends_scalar = |b: &u8| {
                matches!(
                    b,
                    b':' | b',' | b'[' | b']' | b'{' | b'}' | b'"' | b' ' | b'\n' | b'\r' | b'\t'
                )
            };
            if ends_scalar(&byte) {
                return None;
            }
            Some(json[..last].iter().rposition(ends_scalar)? + 1)
        }
    }
}

/// The opening quote of the string whose closing quote is at `closing`:
/// inside a string every quote is escaped.
fn opening_quote(json: &[u8], closing: usize) -> Option<usize> {
    let mut at = closing;
    loop {
        at = rfind(json, at, ByteSet::Quote)?;
        if !escaped(json, at) {
            return Some(at);
        }
    }
}

/// Whether the byte at `at` follows an odd run of backslashes.
fn escaped(json: &[u8], at: usize) -> bool {
    json[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

/// The index of the last byte before `end` that is not whitespace.
fn last_non_whitespace(json: &[u8], end: usize) -> Option<usize> {
    json[..end].iter().rposition(|b| !is_whitespace(b))
}

fn is_whitespace(byte: &u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\r' | b'\t')
}

fn skip_whitespace(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(is_whitespace) {
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
    /// A quote (walking back through a string).
    Quote,
}

impl ByteSet {
    fn contains(self, byte: u8) -> bool {
        match self {
            ByteSet::StringEnd => matches!(byte, b'"' | b'\\'),
            ByteSet::Nesting => matches!(byte, b'"' | b'{' | b'}' | b'[' | b']'),
            ByteSet::Quote => byte == b'"',
        }
    }
}

/// The index of the first byte at or after `from` that is in `set`.
///
/// Sixteen bytes at a time: a provider's answer is mostly short strings and
/// indentation, where a general search (`memchr2`, a call and its set-up
/// for every string) or a byte-by-byte loop cost the proxy ~10,000
/// instructions on a 700-byte chat completion.
fn find(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    let mut at = from;
    while at + 16 <= json.len() {
        let mask = chunk_hits(json[at..at + 16].try_into().expect("16 bytes"), set);
        if mask != 0 {
            return Some(at + mask.trailing_zeros() as usize);
        }
        at += 16;
    }
    find_bytewise(json, at, set)
}

/// The index of the last byte before `end` that is in `set`, sixteen bytes
/// at a time as `find`.
fn rfind(json: &[u8], end: usize, set: ByteSet) -> Option<usize> {
    let mut end = end.min(json.len());
    while end >= 16 {
        let mask = chunk_hits(json[end - 16..end].try_into().expect("16 bytes"), set);
        if mask != 0 {
            return Some(end - 16 + (31 - mask.leading_zeros()) as usize);
        }
        end -= 16;
    }
    rfind_bytewise(json, end, set)
}

/// Which of 16 bytes are in `set`, one bit each (the first byte lowest).
#[cfg(target_arch = "x86_64")]
fn chunk_hits(chunk: &[u8; 16], set: ByteSet) -> u32 {
    // SAFETY: SSE2 is part of every x86_64 target.
    unsafe { chunk_hits_sse2(chunk, set) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn chunk_hits_sse2(chunk: &[u8; 16], set: ByteSet) -> u32 {
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
    // SAFETY: `chunk` is 16 bytes long and the load has no alignment
    // requirement.
    let chunk = unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) };
    let quotes = _mm_cmpeq_epi8(chunk, quote);
    let hits = match set {
        ByteSet::Quote => quotes,
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
    _mm_movemask_epi8(hits) as u32
}

#[cfg(not(target_arch = "x86_64"))]
fn chunk_hits(chunk: &[u8; 16], set: ByteSet) -> u32 {
    chunk
        .iter()
        .enumerate()
        .filter(|(_, &b)| set.contains(b))
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

fn find_bytewise(json: &[u8], from: usize, set: ByteSet) -> Option<usize> {
    let offset = json.get(from..)?.iter().position(|&b| set.contains(b))?;
    Some(from + offset)
}

fn rfind_bytewise(json: &[u8], end: usize, set: ByteSet) -> Option<usize> {
    json[..end].iter().rposition(|&b| set.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next number of a xorshift sequence: reproducible test texts.
    fn xorshift(seed: &mut u32) -> u32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 17;
        *seed ^= *seed << 5;
        *seed
    }

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
                        let seed = xorshift(&mut seed);
                        // Mostly plain bytes, so that some chunks hold no stop.
                        if seed.is_multiple_of(4) {
                            alphabet[(seed / 4) as usize % alphabet.len()]
                        } else {
                            b'x'
                        }
                    })
                    .collect();
                for from in 0..=len + 1 {
                    for set in [ByteSet::StringEnd, ByteSet::Nesting, ByteSet::Quote] {
                        assert_eq!(
                            find(&text, from, set),
                            find_bytewise(&text, from, set),
                            "{:?} from {from}",
                            String::from_utf8_lossy(&text)
                        );
                        let end = from.min(len);
                        assert_eq!(
                            rfind(&text, end, set),
                            rfind_bytewise(&text, end, set),
                            "{:?} back from {end}",
                            String::from_utf8_lossy(&text)
                        );
                    }
                }
            }
        }
    }

    /// A random JSON value: nested objects and arrays, strings holding
    /// quotes, backslashes, brackets and `"usage":`-like text, whitespace
    /// anywhere, keys that repeat.
    fn random_value(seed: &mut u32, depth: u32, out: &mut String) {
        fn next(seed: &mut u32, n: u32) -> u32 {
            xorshift(seed) % n
        }
        fn space(seed: &mut u32) -> &'static str {
            [" ", "", "\n  ", "\t", ""][next(seed, 5) as usize]
        }
        const KEYS: [&str; 5] = ["usage", "input_tokens", "a", "u\\\"sage", "choices"];
        const STRINGS: [&str; 6] = [
            "",
            "plain",
            "a \\\"usage\\\": {\\\"x\\\": 1} }",
            "back\\\\",
            "]}[{,:",
            "\\\\\\\"",
        ];
        let kind = if depth > 3 {
            3 + next(seed, 3)
        } else {
            next(seed, 6)
        };
        match kind {
            0 | 1 => {
                out.push('{');
                for i in 0..next(seed, 4) {
                    out.push_str(if i > 0 { "," } else { "" });
                    out.push_str(space(seed));
                    out.push_str(&format!("\"{}\"", KEYS[next(seed, 5) as usize]));
                    out.push_str(space(seed));
                    out.push(':');
                    out.push_str(space(seed));
                    random_value(seed, depth + 1, out);
                }
                out.push_str(space(seed));
                out.push('}');
            }
            2 => {
                out.push('[');
                for i in 0..next(seed, 4) {
                    out.push_str(if i > 0 { ", " } else { "" });
                    random_value(seed, depth + 1, out);
                }
                out.push(']');
            }
            3 => out.push_str(&format!("\"{}\"", STRINGS[next(seed, 6) as usize])),
            4 => out.push_str(["0", "-12.5e3", "17"][next(seed, 3) as usize]),
            _ => out.push_str(["null", "true", "false"][next(seed, 3) as usize]),
        }
    }

    #[test]
    fn the_walk_back_finds_what_the_walk_forward_finds() {
        let mut seed = 0x9e37_79b9_u32;
        let mut objects = 0;
        for _ in 0..4000 {
            let mut json = String::new();
            random_value(&mut seed, 0, &mut json);
            if !json.starts_with('{') {
                continue;
            }
            objects += 1;
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(&json);
            assert!(parsed.is_ok(), "the generator made invalid JSON: {json}");
            for key in ["usage", "input_tokens", "a", "u\\\"sage", "missing"] {
                let [forward] = top_level_members(json.as_bytes(), [key.as_bytes()]).unwrap();
                assert_eq!(
                    top_level_member_from_end(json.as_bytes(), key.as_bytes()),
                    Some(forward),
                    "{key} in {json}"
                );
            }
        }
        assert!(objects > 1000, "only {objects} objects generated");
    }

    #[test]
    fn the_walk_back_reads_only_the_members_after_the_one_it_finds() {
        let json =
            br#" { "choices": [{"message": {"content": "a \"usage\": {\"x\":1} }", "usage": 5}}],
            "usage" : {"prompt_tokens": 3} ,
            "tail": "}]\\" } "#;
        assert_eq!(
            top_level_member_from_end(json, b"usage"),
            Some(Some(&br#"{"prompt_tokens": 3}"#[..]))
        );
        assert_eq!(top_level_member_from_end(json, b"missing"), Some(None));
        assert_eq!(top_level_member_from_end(b" {} ", b"usage"), Some(None));
        // What lies before the member found is not checked.
        assert_eq!(
            top_level_member_from_end(br#"{"a": 1 "usage": 2}"#, b"usage"),
            Some(Some(&b"2"[..]))
        );
        for json in [
            "",
            "}",
            "[1]",
            r#""usage""#,
            r#"{"usage": {"a": 1}"#,
            r#"{"usage": "open"#,
            r#"{"usage" {"a": 1}}"#,
            r#"{"usage": }"#,
            r#"{"a": "\"#,
            r#"{"usage": 1} trailing"#,
            r#"{"usage": 1"}"#,
            r#"{"usage\": 1}"#,
        ] {
            assert_eq!(
                top_level_member_from_end(json.as_bytes(), b"usage"),
                None,
                "{json}"
            );
        }
    }

    #[test]
    fn either_walk_survives_any_text() {
        // Short texts of JSON's punctuation: no panic, no endless loop, and
        // whatever the walk back finds lies inside the text.
        let alphabet = b"{}[]\":,\\ a1u";
        let mut seed = 0x1234_5678_u32;
        for len in 0..24 {
            for _ in 0..2000 {
                let text: Vec<u8> = (0..len)
                    .map(|_| alphabet[xorshift(&mut seed) as usize % alphabet.len()])
                    .collect();
                let _ = top_level_members(&text, [b"u", b"a"]);
                if let Some(Some(value)) = top_level_member_from_end(&text, b"u") {
                    let start = value.as_ptr() as usize - text.as_ptr() as usize;
                    assert!(start + value.len() <= text.len());
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
