/*
 * Exposes the C SDK's JSON reader to tests/it/sdk_reader.rs, which builds
 * this file with policies/build.sh and compares what the reader finds with
 * serde_json on generated documents.
 */
#include "../../../plugins/sdk/c/warden.h"

/* The input is a dotted path, a NUL, then the JSON document. */
static int split(const char *ptr, int len, const char **path, wd_slice *json) {
    for (int i = 0; i < len; i++) {
        if (ptr[i] == 0) {
            *path = ptr;
            *json = wd_slice_of(ptr + i + 1, len - i - 1);
            return 1;
        }
    }
    return 0;
}

/* wd_get: (offset in the document << 32) | length of the value, or -1. */
WARDEN_EXPORT("probe_get") wd_i64 probe_get(const char *ptr, int len) {
    const char *path;
    wd_slice json, value;
    if (!split(ptr, len, &path, &json) || !wd_get(json, path, &value)) return -1;
    return wd_pack((const void *)(value.ptr - json.ptr), value.len);
}

/* The members (or items) of the value at the path, walked with
 * wd_object_next (or wd_array_next): for each, the key's offset and length
 * (0, 0 for an item) and the value's offset and length, as u32s. */
WARDEN_EXPORT("probe_walk") wd_i64 probe_walk(const char *ptr, int len) {
    const char *path;
    wd_slice json, at, key, value;
    wd_buf out = {0, 0, 0};
    if (!split(ptr, len, &path, &json)) return -1;
    if (*path) {
        if (!wd_get(json, path, &at)) return -1;
    } else {
        at = json;
        at.len = wd_value_end(json, wd_skip_ws(json, 0));
        if (!at.len) return -1;
    }
    wd_u32 pos = 0, start = wd_skip_ws(at, 0);
    at.ptr += start;
    at.len -= start;
    if (at.len && at.ptr[0] == '{') {
        while (wd_object_next(at, &pos, &key, &value)) {
            wd_u32 fields[4] = {(wd_u32)(key.ptr - json.ptr), key.len, (wd_u32)(value.ptr - json.ptr), value.len};
            wd_buf_put(&out, (const char *)fields, sizeof fields);
        }
    } else if (at.len && at.ptr[0] == '[') {
        while (wd_array_next(at, &pos, &value)) {
            wd_u32 fields[4] = {0, 0, (wd_u32)(value.ptr - json.ptr), value.len};
            wd_buf_put(&out, (const char *)fields, sizeof fields);
        }
    } else {
        return -1;
    }
    /* An empty buffer still needs an address the host can read. */
    if (!out.ptr) wd_buf_reserve(&out, 1);
    return wd_output(&out);
}
