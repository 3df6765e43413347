/*
 * redact_pii: masks e-mail addresses and phone numbers in the text a
 * request sends to the model (the string values of "content", "text",
 * "input", "system", "prompt" and "instructions", at any depth) before it
 * leaves. Everything else in the body (model, ids, parameters) is kept
 * byte for byte.
 *
 * An e-mail address is name@domain.tld; a phone number is 10 to 15 digits
 * written with a leading "+" or with separators (spaces, dots, dashes,
 * parentheses), so that bare ids and timestamps are not mistaken for one.
 *
 *   [[plugins]]
 *   name = "redact_pii"
 *   module = "plugins/redact_pii.wasm"
 */
#include "sdk/c/warden.h"

static int is_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_local(char c) { return is_alnum(c) || c == '.' || c == '_' || c == '%' || c == '+' || c == '-'; }
static int is_domain(char c) { return is_alnum(c) || c == '.' || c == '-'; }
static int is_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int is_phone_sep(char c) { return c == ' ' || c == '-' || c == '.' || c == '(' || c == ')'; }

/* Marks the bytes of escape sequences, which a match may not cut into. */
static wd_u8 *escapes(wd_slice s) {
    wd_u8 *mask = (wd_u8 *)wd_alloc(s.len + 1);
    if (!mask) __builtin_trap();
    memset(mask, 0, s.len + 1);
    for (wd_u32 i = 0; i < s.len; i++) {
        if (s.ptr[i] != '\\') continue;
        wd_u32 n = (i + 1 < s.len && s.ptr[i + 1] == 'u') ? 6 : 2;
        for (wd_u32 j = 0; j < n && i + j < s.len; j++) mask[i + j] = 1;
        i += n - 1;
    }
    return mask;
}

/* An e-mail address around the '@' at `at`: [*from, *to). */
static int email_at(wd_slice s, const wd_u8 *esc, wd_u32 at, wd_u32 *from, wd_u32 *to) {
    wd_u32 l = at, r = at + 1, dot = 0;
    while (l > 0 && !esc[l - 1] && is_local(s.ptr[l - 1])) l--;
    while (r < s.len && !esc[r] && is_domain(s.ptr[r])) r++;
    /* A sentence's full stop or a dash after the address is not part of it. */
    while (r > at + 1 && (s.ptr[r - 1] == '.' || s.ptr[r - 1] == '-')) r--;
    for (wd_u32 i = at + 1; i < r; i++)
        if (s.ptr[i] == '.') dot = i;
    if (l == at || dot <= at + 1 || r - dot - 1 < 2) return 0;
    for (wd_u32 i = dot + 1; i < r; i++)
        if (!is_letter(s.ptr[i])) return 0;
    *from = l;
    *to = r;
    return 1;
}

/* A phone number starting at `i`: [i, *to). */
static int phone_at(wd_slice s, const wd_u8 *esc, wd_u32 i, wd_u32 *to) {
    if (i > 0 && !esc[i - 1] && (is_alnum(s.ptr[i - 1]) || s.ptr[i - 1] == '+')) return 0;
    wd_u32 j = i, digits = 0, seps = 0, pending = 0, end = i;
    if (s.ptr[j] == '+') j++;
    for (; j < s.len && !esc[j] && (is_digit(s.ptr[j]) || is_phone_sep(s.ptr[j])); j++) {
        if (is_digit(s.ptr[j])) {
            digits++;
            end = j + 1;
            /* Separators count once a digit follows them. */
            seps += pending;
            pending = 0;
        } else {
            pending++;
            if (j > i && is_phone_sep(s.ptr[j - 1]) && s.ptr[j] != '(' && s.ptr[j - 1] != ')') break;
        }
        if (digits > 15) return 0;
    }
    if (end < s.len && !esc[end] && is_alnum(s.ptr[end])) return 0;
    if (digits < 10 || (s.ptr[i] != '+' && seps == 0)) return 0;
    *to = end;
    return 1;
}

/* Copies a string's raw contents with addresses and numbers masked. */
static void redact(wd_buf *out, wd_slice s) {
    const wd_u8 *esc = escapes(s);
    wd_u32 copied = 0;
    for (wd_u32 i = 0; i < s.len; i++) {
        if (esc[i]) continue;
        wd_u32 from, to;
        if (s.ptr[i] == '@' && email_at(s, esc, i, &from, &to) && from >= copied) {
            wd_buf_put(out, s.ptr + copied, from - copied);
            wd_buf_puts(out, "[email]");
            copied = to;
            i = to - 1;
        } else if ((s.ptr[i] == '+' || s.ptr[i] == '(' || is_digit(s.ptr[i])) && i >= copied && phone_at(s, esc, i, &to)) {
            wd_buf_put(out, s.ptr + copied, i - copied);
            wd_buf_puts(out, "[phone]");
            copied = to;
            i = to - 1;
        }
    }
    wd_buf_put(out, s.ptr + copied, s.len - copied);
}

static int is_text_key(wd_slice key) {
    static const char *keys[] = {"content", "text", "input", "system", "prompt", "instructions"};
    for (int k = 0; k < 6; k++)
        if (key.len == wd_strlen(keys[k]) && wd_mem_eq(key.ptr, keys[k], key.len)) return 1;
    return 0;
}

WARDEN_EXPORT("warden_transform") wd_i64 warden_transform(const char *ptr, int len) {
    wd_slice body = wd_slice_of(ptr, len), key = {"", 0};
    wd_buf out = {0, 0, 0};
    wd_buf_reserve(&out, body.len + 64);
    wd_u32 i = 0;
    while (i < body.len) {
        if (body.ptr[i] != '"') {
            wd_buf_putc(&out, body.ptr[i++]);
            continue;
        }
        wd_u32 end = wd_value_end(body, i);
        if (!end) return wd_pack(ptr, (wd_u32)len); /* not JSON: leave it */
        wd_slice raw = {body.ptr + i + 1, end - i - 2};
        wd_u32 next = wd_skip_ws(body, end);
        if (next < body.len && body.ptr[next] == ':') {
            key = raw;
            wd_buf_put(&out, body.ptr + i, end - i);
        } else if (is_text_key(key)) {
            wd_buf_putc(&out, '"');
            redact(&out, raw);
            wd_buf_putc(&out, '"');
        } else {
            wd_buf_put(&out, body.ptr + i, end - i);
        }
        i = end;
    }
    return wd_output(&out);
}
