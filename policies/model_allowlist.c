/*
 * model_allowlist: which models each agent role may call. The config maps a
 * role to model globs; "*" is the list for roles not named. A role with no
 * list (and no "*") may call nothing.
 *
 *   [[policies]]
 *   name = "model_allowlist"
 *   module = "policies/model_allowlist.wasm"
 *   config = { researcher = ["gpt-4o*", "claude-*"], "*" = ["gpt-4o-mini"] }
 */
#include "../plugins/sdk/c/warden.h"

static int allowed(wd_slice globs, wd_slice model) {
    wd_u32 pos = 0;
    wd_slice glob;
    while (wd_array_next(globs, &pos, &glob)) {
        wd_slice pattern = wd_string_raw(glob);
        if (wd_glob(pattern.ptr, pattern.len, model.ptr, model.len)) return 1;
    }
    return 0;
}

/* The role table, kept from warden_init (an instance is put back to its
 * state after it before every evaluation): evaluations do not look for it
 * in their input again. */
static wd_slice config;

WARDEN_EXPORT("warden_init") void warden_init(const char *ptr, int len) { config = wd_slice_of(ptr, len); }

WARDEN_EXPORT("warden_evaluate") wd_i64 warden_evaluate(const char *ptr, int len) {
    wd_slice in = wd_slice_of(ptr, len), role_v, model_v, globs;
    if (!wd_get(in, "call.role", &role_v) || !wd_get(in, "call.model", &model_v))
        return wd_decide("deny", "policy_error", "the input lacks call.role or call.model");
    wd_slice role = wd_string_raw(role_v), model = wd_string_raw(model_v);
    int listed = wd_member(config, role.ptr, role.len, &globs) || wd_member(config, "*", 1, &globs);
    wd_buf reason = {0, 0, 0};
    if (!listed) {
        wd_buf_puts(&reason, "role `");
        wd_buf_put(&reason, role.ptr, role.len);
        wd_buf_puts(&reason, "` has no allowed models");
        return wd_decide_buf("deny", "role_not_listed", &reason);
    }
    if (allowed(globs, model)) return wd_allow();
    wd_buf_puts(&reason, "role `");
    wd_buf_put(&reason, role.ptr, role.len);
    wd_buf_puts(&reason, "` may not call model `");
    wd_buf_put(&reason, model.ptr, model.len);
    wd_buf_puts(&reason, "`; allowed: ");
    wd_buf_put(&reason, globs.ptr, globs.len);
    return wd_decide_buf("deny", "model_not_allowed", &reason);
}
