/*
 * runaway_guard: halts an agent that makes more than `max_calls_per_minute`
 * calls in a minute (this one included), the mark of an agent stuck in a
 * loop.
 *
 *   [[policies]]
 *   name = "runaway_guard"
 *   module = "policies/runaway_guard.wasm"
 *   config = { max_calls_per_minute = 120 }
 */
#include "../plugins/sdk/c/warden.h"

/* The limit, read from the config once (an instance is put back to its
 * state after warden_init before every evaluation). */
static wd_slice max_v;
static double max;
static int ok_max;

WARDEN_EXPORT("warden_init") void warden_init(const char *ptr, int len) {
    if (wd_get(wd_slice_of(ptr, len), "max_calls_per_minute", &max_v)) max = wd_num(max_v, &ok_max);
}

WARDEN_EXPORT("warden_evaluate") wd_i64 warden_evaluate(const char *ptr, int len) {
    wd_slice in = wd_slice_of(ptr, len), calls_v, agent_v;
    int ok_calls = 0;
    if (!ok_max || !wd_get(in, "activity.calls_last_minute", &calls_v)) return wd_allow();
    double calls = wd_num(calls_v, &ok_calls);
    if (!ok_calls || calls <= max) return wd_allow();
    wd_buf reason = {0, 0, 0};
    wd_buf_puts(&reason, "agent `");
    if (wd_get(in, "call.agent", &agent_v)) {
        wd_slice agent = wd_string_raw(agent_v);
        wd_buf_put(&reason, agent.ptr, agent.len);
    }
    wd_buf_puts(&reason, "` made ");
    wd_buf_put(&reason, calls_v.ptr, calls_v.len);
    wd_buf_puts(&reason, " calls in the last minute, above the limit of ");
    wd_buf_put(&reason, max_v.ptr, max_v.len);
    return wd_decide_buf("halt_agent", "max_calls_per_minute", &reason);
}
