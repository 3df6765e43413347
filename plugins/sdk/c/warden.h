/*
 * warden.h — write Warden policies and plugins in C (ABI v1, policies/ABI.md).
 *
 * Header-only. Include it in exactly one .c file per module and build with
 *
 *   clang --target=wasm32 -O2 -nostdlib -msimd128 -mbulk-memory -mmutable-globals \
 *         -Wl,--no-entry -Wl,--strip-all -Wl,--stack-first -Wl,-z,stack-size=1024 \
 *         -Wl,--export=__stack_pointer -Wl,--export=__heap_base -Wl,--export=wd_heap_next \
 *         -o NAME.wasm NAME.c
 *
 * (exporting the stack pointer lets Warden keep one instance per thread and
 * restore it after each evaluation instead of instantiating anew; the heap
 * exports and a small stack put first let it restore only a few KiB, and a
 * stack overflow then traps instead of overwriting the statics: ABI.md)
 *
 * It gives the module its ABI exports (warden_alloc, warden_abi_version),
 * the `warden.log` import, a bump allocator (every evaluation runs in a
 * fresh instance, so nothing is ever freed), a small JSON reader that works
 * on the input in place, and builders for decisions and output bodies.
 *
 * A policy then defines
 *
 *   WARDEN_EXPORT("warden_evaluate") long long warden_evaluate(const char *in, int len)
 *
 * and returns wd_decide(...); a plugin defines warden_transform the same way
 * and returns wd_output(buf) with the new request body.
 */
#ifndef WARDEN_H
#define WARDEN_H

typedef unsigned char wd_u8;
typedef unsigned int wd_u32;
typedef long long wd_i64;
typedef unsigned long long wd_u64;

#define WARDEN_EXPORT(name) __attribute__((export_name(name)))
#define WD_NULL ((void *)0)
/* SDK helpers a module does not use are not warnings. */
#define WD_FN static __attribute__((unused))

__attribute__((import_module("warden"), import_name("log"))) void warden_log_raw(const char *ptr, int len);

/* ---- memory --------------------------------------------------------- */

void *memcpy(void *dst, const void *src, unsigned long n) {
    __builtin_memcpy(dst, src, n);
    return dst;
}
void *memset(void *dst, int c, unsigned long n) {
    __builtin_memset(dst, c, n);
    return dst;
}
void *memmove(void *dst, const void *src, unsigned long n) {
    __builtin_memmove(dst, src, n);
    return dst;
}

extern unsigned char __heap_base;
/* The allocator's next free byte. Not static: linked with
 * -Wl,--export=__heap_base -Wl,--export=wd_heap_next (policies/build.sh),
 * the host learns where the module's writes end and, between evaluations,
 * puts back only the memory below (policies/ABI.md). Everything this SDK
 * writes is below it: statics, the stack, and what wd_alloc handed out. */
wd_u32 wd_heap_next;

/* Bump allocation, 8-byte aligned; grows the memory as needed. Returns 0
 * when the memory cap is reached (the host then sees a trap or an error). */
WD_FN void *wd_alloc(wd_u32 len) {
    if (wd_heap_next == 0) wd_heap_next = (wd_u32)&__heap_base;
    wd_u32 start = (wd_heap_next + 7u) & ~7u;
    wd_u32 end = start + len;
    if (end < start) return WD_NULL;
    wd_u32 have = (wd_u32)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        wd_u32 pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (unsigned long)-1) return WD_NULL;
    }
    wd_heap_next = end;
    return (void *)start;
}

WARDEN_EXPORT("warden_alloc") void *warden_alloc(int len) { return wd_alloc((wd_u32)len); }
WARDEN_EXPORT("warden_abi_version") int warden_abi_version(void) { return 1; }

WD_FN wd_i64 wd_pack(const void *ptr, wd_u32 len) {
    return (wd_i64)(((wd_u64)(wd_u32)ptr << 32) | (wd_u64)len);
}

/* ---- strings --------------------------------------------------------- */

WD_FN wd_u32 wd_strlen(const char *s) {
    wd_u32 n = 0;
    while (s[n]) n++;
    return n;
}

WD_FN int wd_mem_eq(const char *a, const char *b, wd_u32 n) {
    for (wd_u32 i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

/* Index of `needle` in hay[0..len), or -1. */
WD_FN int wd_find(const char *hay, wd_u32 len, const char *needle) {
    wd_u32 n = wd_strlen(needle);
    if (n == 0) return 0;
    for (wd_u32 i = 0; i + n <= len; i++)
        if (hay[i] == needle[0] && wd_mem_eq(hay + i, needle, n)) return (int)i;
    return -1;
}

/* Glob match with `*` (any run) and `?` (one character). */
WD_FN int wd_glob(const char *pat, wd_u32 plen, const char *s, wd_u32 slen) {
    wd_u32 p = 0, i = 0, star_p = (wd_u32)-1, star_i = 0;
    while (i < slen) {
        if (p < plen && (pat[p] == '?' || pat[p] == s[i])) {
            p++;
            i++;
        } else if (p < plen && pat[p] == '*') {
            star_p = p++;
            star_i = i;
        } else if (star_p != (wd_u32)-1) {
            p = star_p + 1;
            i = ++star_i;
        } else {
            return 0;
        }
    }
    while (p < plen && pat[p] == '*') p++;
    return p == plen;
}

WD_FN void wd_log(const char *text) { warden_log_raw(text, (int)wd_strlen(text)); }

/* ---- output buffers -------------------------------------------------- */

typedef struct {
    char *ptr;
    wd_u32 len;
    wd_u32 cap;
} wd_buf;

WD_FN void wd_buf_reserve(wd_buf *b, wd_u32 more) {
    if (b->len + more <= b->cap) return;
    wd_u32 cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->len + more) cap *= 2;
    char *next = (char *)wd_alloc(cap);
    if (!next) __builtin_trap();
    if (b->len) memcpy(next, b->ptr, b->len);
    b->ptr = next;
    b->cap = cap;
}

WD_FN void wd_buf_put(wd_buf *b, const char *bytes, wd_u32 n) {
    wd_buf_reserve(b, n);
    memcpy(b->ptr + b->len, bytes, n);
    b->len += n;
}

WD_FN void wd_buf_puts(wd_buf *b, const char *s) { wd_buf_put(b, s, wd_strlen(s)); }

WD_FN void wd_buf_putc(wd_buf *b, char c) { wd_buf_put(b, &c, 1); }

/* Appends `s[0..n)` as the inside of a JSON string (escaped). */
WD_FN void wd_buf_escaped(wd_buf *b, const char *s, wd_u32 n) {
    static const char hex[] = "0123456789abcdef";
    for (wd_u32 i = 0; i < n; i++) {
        wd_u8 c = (wd_u8)s[i];
        if (c == '"' || c == '\\') {
            wd_buf_putc(b, '\\');
            wd_buf_putc(b, (char)c);
        } else if (c == '\n') {
            wd_buf_puts(b, "\\n");
        } else if (c < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            wd_buf_put(b, esc, 6);
        } else {
            wd_buf_putc(b, (char)c);
        }
    }
}

WD_FN void wd_buf_u64(wd_buf *b, wd_u64 v) {
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) wd_buf_putc(b, digits[--n]);
}

WD_FN wd_i64 wd_output(const wd_buf *b) { return wd_pack(b->ptr, b->len); }

/* ---- reading JSON in place ------------------------------------------- */

/* A JSON value (or any text) inside the input: not NUL-terminated. */
typedef struct {
    const char *ptr;
    wd_u32 len;
} wd_slice;

WD_FN wd_slice wd_slice_of(const char *ptr, int len) {
    wd_slice s = {ptr, (wd_u32)len};
    return s;
}

WD_FN wd_u32 wd_skip_ws(wd_slice s, wd_u32 i) {
    while (i < s.len && (s.ptr[i] == ' ' || s.ptr[i] == '\n' || s.ptr[i] == '\r' || s.ptr[i] == '\t')) i++;
    return i;
}

/* The input is looked at 16 bytes at a time with 128-bit SIMD: walking it
 * byte by byte was most of a policy's time. wd_marks says which of 16 bytes
 * are quotes, backslashes, and opening or closing brackets, one bit per
 * byte, the first byte's the lowest. */
#ifndef __wasm_simd128__
#error "warden.h reads JSON with 128-bit SIMD: build with -msimd128 (see policies/build.sh)"
#endif
#include <wasm_simd128.h>
#define WD_WIDE 16u
#define WD_ALL 0xFFFFu

typedef struct {
    wd_u32 quote, backslash, open, close;
} wd_marks;

/* The bytes equal to `c`. */
WD_FN wd_u32 wd_hits(const char *at, char c) {
    return (wd_u32)wasm_i8x16_bitmask(wasm_i8x16_eq(wasm_v128_load(at), wasm_i8x16_splat(c)));
}

WD_FN wd_u32 wd_quotes_or_backslashes(const char *at) { return wd_hits(at, '"') | wd_hits(at, '\\'); }

/* `{` and `[` differ in one bit (0x20), as do `}` and `]`. */
WD_FN wd_marks wd_mark(const char *at) {
    v128_t folded = wasm_v128_or(wasm_v128_load(at), wasm_i8x16_splat(0x20));
    wd_marks m;
    m.quote = wd_hits(at, '"');
    m.backslash = wd_hits(at, '\\');
    m.open = (wd_u32)wasm_i8x16_bitmask(wasm_i8x16_eq(folded, wasm_i8x16_splat('{')));
    m.close = (wd_u32)wasm_i8x16_bitmask(wasm_i8x16_eq(folded, wasm_i8x16_splat('}')));
    return m;
}

/* Bit k set when an odd number of bits 0..k of `x` are: which bytes are
 * inside a string, from where its quotes are. */
WD_FN wd_u32 wd_prefix_xor(wd_u32 x) {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    return x & WD_ALL;
}

/* End (exclusive) of the string whose opening quote is at `i`, or 0 when it
 * does not close. */
WD_FN wd_u32 wd_string_end(wd_slice s, wd_u32 i) {
    for (i++; i < s.len;) {
        if (s.len - i >= WD_WIDE) {
            wd_u32 hits = wd_quotes_or_backslashes(s.ptr + i);
            if (!hits) {
                i += WD_WIDE;
                continue;
            }
            i += (wd_u32)__builtin_ctz(hits);
        }
        if (s.ptr[i] == '"') return i + 1;
        i += s.ptr[i] == '\\' ? 2 : 1;
    }
    return 0;
}

/* Whether the string whose opening quote is at `p` is the member name `key`
 * (as written, unescaped): where the member's value starts if so, else 0. */
WD_FN wd_u32 wd_key_at(wd_slice s, wd_u32 p, const char *key, wd_u32 key_len) {
    wd_u32 close = p + 1 + key_len;
    if (close >= s.len || s.ptr[close] != '"' || !wd_mem_eq(s.ptr + p + 1, key, key_len)) return 0;
    /* The quote after the key's text may be an escaped one inside a longer name. */
    if (wd_string_end(s, p) != close + 1) return 0;
    wd_u32 i = wd_skip_ws(s, close + 1);
    if (i >= s.len || s.ptr[i] != ':') return 0;
    return wd_skip_ws(s, i + 1);
}

/* Walks the object or array whose opening bracket is at `i`, WD_WIDE bytes
 * at a time: the brackets outside strings move the depth; strings are told
 * apart by the parity of the quotes before each byte (a block with a
 * backslash, which may escape a quote, goes byte by byte). Without `key`
 * it returns the end (exclusive) of the value; with one, where the value of
 * that member of the object starts. 0 when absent or malformed. */
WD_FN wd_u32 wd_walk(wd_slice s, wd_u32 i, const char *key, wd_u32 key_len) {
    wd_u32 depth = 0, in_string = 0, bytewise_until = 0;
    /* A name's first character: only quotes before it may open the key. */
    char first = key_len ? key[0] : '"';
    while (i < s.len) {
        if (i >= bytewise_until && s.len - i >= WD_WIDE) {
            wd_marks m = wd_mark(s.ptr + i);
            if (!m.backslash) {
                /* Inside a string: its opening quote set, its closing one not. */
                wd_u32 strings = wd_prefix_xor(m.quote) ^ in_string;
                wd_u32 open = m.open & ~strings, close = m.close & ~strings;
                wd_u32 names = 0;
                if (key) {
                    /* Opening quotes followed by the key's first character
                     * (the block's last byte is followed by the next block). */
                    names = m.quote & strings & ((wd_hits(s.ptr + i, first) >> 1) | (1u << (WD_WIDE - 1)));
                }
                wd_u32 closes = (wd_u32)__builtin_popcount(close);
                if (!names && depth > closes) {
                    /* The walk cannot end in this block. */
                    depth += (wd_u32)__builtin_popcount(open) - closes;
                } else {
                    for (wd_u32 events = open | close | names; events; events &= events - 1) {
                        wd_u32 at = (wd_u32)__builtin_ctz(events), bit = 1u << at;
                        if (open & bit) {
                            depth++;
                        } else if (close & bit) {
                            if (--depth == 0) return key ? 0 : i + at + 1;
                        } else if (depth == 1) {
                            wd_u32 value = wd_key_at(s, i + at, key, key_len);
                            if (value) return value;
                        }
                    }
                }
                in_string = (strings >> (WD_WIDE - 1)) & 1 ? WD_ALL : 0;
                i += WD_WIDE;
                continue;
            }
            bytewise_until = i + WD_WIDE;
        }
        char c = s.ptr[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = 0;
        } else if (c == '"') {
            if (key && depth == 1) {
                wd_u32 value = wd_key_at(s, i, key, key_len);
                if (value) return value;
            }
            in_string = WD_ALL;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (depth == 0) return 0;
            if (--depth == 0) return key ? 0 : i + 1;
        }
        i++;
    }
    return 0;
}

/* End (exclusive) of the value starting at `i`, or 0 on malformed input. */
WD_FN wd_u32 wd_value_end(wd_slice s, wd_u32 i) {
    if (i >= s.len) return 0;
    char c = s.ptr[i];
    if (c == '"') return wd_string_end(s, i);
    if (c == '{' || c == '[') return wd_walk(s, i, WD_NULL, 0);
    while (i < s.len && s.ptr[i] != ',' && s.ptr[i] != '}' && s.ptr[i] != ']' && s.ptr[i] != ' ' &&
           s.ptr[i] != '\n' && s.ptr[i] != '\r' && s.ptr[i] != '\t')
        i++;
    return i;
}

/* Walks an object's members: start with *pos = 0; returns 0 at the end. */
WD_FN int wd_object_next(wd_slice obj, wd_u32 *pos, wd_slice *key, wd_slice *value) {
    wd_u32 i = *pos ? *pos : wd_skip_ws(obj, 0) + 1;
    i = wd_skip_ws(obj, i);
    if (i < obj.len && obj.ptr[i] == ',') i = wd_skip_ws(obj, i + 1);
    if (i >= obj.len || obj.ptr[i] != '"') return 0;
    wd_u32 kend = wd_value_end(obj, i);
    if (!kend) return 0;
    key->ptr = obj.ptr + i + 1;
    key->len = kend - i - 2;
    i = wd_skip_ws(obj, kend);
    if (i >= obj.len || obj.ptr[i] != ':') return 0;
    i = wd_skip_ws(obj, i + 1);
    wd_u32 vend = wd_value_end(obj, i);
    if (!vend) return 0;
    value->ptr = obj.ptr + i;
    value->len = vend - i;
    *pos = vend;
    return 1;
}

/* Walks an array's items: start with *pos = 0; returns 0 at the end. */
WD_FN int wd_array_next(wd_slice arr, wd_u32 *pos, wd_slice *item) {
    wd_u32 i = *pos ? *pos : wd_skip_ws(arr, 0) + 1;
    i = wd_skip_ws(arr, i);
    if (i < arr.len && arr.ptr[i] == ',') i = wd_skip_ws(arr, i + 1);
    if (i >= arr.len || arr.ptr[i] == ']') return 0;
    wd_u32 end = wd_value_end(arr, i);
    if (!end) return 0;
    item->ptr = arr.ptr + i;
    item->len = end - i;
    *pos = end;
    return 1;
}

/* Where the value of member `key` starts in `obj`, or 0 when absent. Unlike
 * wd_member it does not look for the end of that value: on a path such as
 * "call.model" the whole `call` object would otherwise be scanned once to
 * find its end and again to find `model` in it. */
WD_FN wd_u32 wd_member_start(wd_slice obj, const char *key, wd_u32 key_len) {
    wd_u32 i = wd_skip_ws(obj, 0);
    if (i >= obj.len || obj.ptr[i] != '{') return 0;
    return wd_walk(obj, i, key, key_len);
}

/* The member `key` of an object (keys compared as written, unescaped). */
WD_FN int wd_member(wd_slice obj, const char *key, wd_u32 key_len, wd_slice *out) {
    wd_u32 start = wd_member_start(obj, key, key_len);
    if (!start) return 0;
    wd_slice value = {obj.ptr + start, obj.len - start};
    wd_u32 end = wd_value_end(value, 0);
    if (!end) return 0;
    value.len = end;
    *out = value;
    return 1;
}

/* The value at a dotted path such as "call.model"; 0 when absent. */
WD_FN int wd_get(wd_slice json, const char *path, wd_slice *out) {
    wd_slice at = json;
    const char *p = path;
    for (;;) {
        wd_u32 n = 0;
        while (p[n] && p[n] != '.') n++;
        if (!p[n]) return wd_member(at, p, n, out);
        wd_u32 start = wd_member_start(at, p, n);
        if (!start) return 0;
        /* Runs to the end of the parent: walking its members stops at its
         * own closing brace, and only the last value's end is needed. */
        at.ptr += start;
        at.len -= start;
        p += n + 1;
    }
}

WD_FN int wd_is_null(wd_slice v) { return v.len == 4 && wd_mem_eq(v.ptr, "null", 4); }
WD_FN int wd_is_true(wd_slice v) { return v.len == 4 && wd_mem_eq(v.ptr, "true", 4); }

/* The raw characters inside a JSON string value (still escaped). */
WD_FN wd_slice wd_string_raw(wd_slice v) {
    wd_slice s = {v.ptr, 0};
    if (v.len >= 2 && v.ptr[0] == '"') {
        s.ptr = v.ptr + 1;
        s.len = v.len - 2;
    }
    return s;
}

/* Whether a JSON string value equals `text` (for plain ASCII values). */
WD_FN int wd_str_eq(wd_slice v, const char *text) {
    wd_slice s = wd_string_raw(v);
    return s.len == wd_strlen(text) && wd_mem_eq(s.ptr, text, s.len);
}

/* A JSON number as a double (1 in *ok when it is one). */
WD_FN double wd_num(wd_slice v, int *ok) {
    wd_u32 i = 0;
    double sign = 1, value = 0, scale = 1;
    int digits = 0, exp = 0, exp_sign = 1;
    if (i < v.len && v.ptr[i] == '-') {
        sign = -1;
        i++;
    }
    for (; i < v.len && v.ptr[i] >= '0' && v.ptr[i] <= '9'; i++, digits++) value = value * 10 + (v.ptr[i] - '0');
    if (i < v.len && v.ptr[i] == '.')
        for (i++; i < v.len && v.ptr[i] >= '0' && v.ptr[i] <= '9'; i++, digits++) {
            scale /= 10;
            value += (v.ptr[i] - '0') * scale;
        }
    if (i < v.len && (v.ptr[i] == 'e' || v.ptr[i] == 'E')) {
        i++;
        if (i < v.len && (v.ptr[i] == '-' || v.ptr[i] == '+')) exp_sign = v.ptr[i++] == '-' ? -1 : 1;
        for (; i < v.len && v.ptr[i] >= '0' && v.ptr[i] <= '9'; i++) exp = exp * 10 + (v.ptr[i] - '0');
    }
    for (; exp > 0; exp--) value = exp_sign > 0 ? value * 10 : value / 10;
    if (ok) *ok = digits > 0 && i == v.len;
    return sign * value;
}

/* ---- decisions -------------------------------------------------------- */

/* {"action":…,"rule":…,"reason":…}, the reason given as bytes. */
WD_FN wd_i64 wd_decide_n(const char *action, const char *rule, const char *reason, wd_u32 reason_len) {
    wd_buf b = {0, 0, 0};
    wd_buf_puts(&b, "{\"action\":\"");
    wd_buf_puts(&b, action);
    wd_buf_puts(&b, "\",\"rule\":\"");
    wd_buf_escaped(&b, rule, wd_strlen(rule));
    wd_buf_puts(&b, "\",\"reason\":\"");
    wd_buf_escaped(&b, reason, reason_len);
    wd_buf_puts(&b, "\"}");
    return wd_output(&b);
}

/* The same from C strings. */
WD_FN wd_i64 wd_decide(const char *action, const char *rule, const char *reason) {
    return wd_decide_n(action, rule, reason, wd_strlen(reason));
}

/* The same with a reason built in a buffer. */
WD_FN wd_i64 wd_decide_buf(const char *action, const char *rule, const wd_buf *reason) {
    return wd_decide_n(action, rule, reason->ptr, reason->len);
}

/* The default: allow, nothing to record. Answered from a constant: most
 * evaluations end here, and building it copied seven pieces. */
WD_FN wd_i64 wd_allow(void) {
    static const char allow[] = "{\"action\":\"allow\"}";
    return wd_pack(allow, sizeof allow - 1);
}

#endif
