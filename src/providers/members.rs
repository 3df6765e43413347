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
        let found = at + memchr::memchr2(b'"', b'\\', json.get(at..)?)?;
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

/// The bytes that open or close a nested value or a string.
static NESTING: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 5 {
        table[b"\"{}[]"[i] as usize] = true;
        i += 1;
    }
    table
};

/// Just past the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match *json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = start;
            loop {
                // Between strings a provider's JSON is mostly indentation
                // and numbers: skipped by a table lookup a byte.
                at += json
                    .get(at..)?
                    .iter()
                    .position(|&b| NESTING[usize::from(b)])?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn members<'a, const N: usize>(json: &'a str, keys: [&str; N]) -> Option<[Option<&'a str>; N]> {
        let found = top_level_members(json.as_bytes(), keys.map(str::as_bytes))?;
        Some(found.map(|value| value.map(|v| std::str::from_utf8(v).unwrap())))
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
