/*
 * cost_gate: asks for an operator's approval of a call whose estimated cost
 * (its upper bound, as budgets reserve it) is above `max_call_usd`, and
 * denies one above `hard_max_usd`. Either limit may be left out.
 *
 *   [[policies]]
 *   name = "cost_gate"
 *   module = "policies/cost_gate.wasm"
 *   config = { max_call_usd = 0.50, hard_max_usd = 5.00 }
 */
#include "../plugins/sdk/c/warden.h"

static int limit(wd_slice in, const char *path, double *out, wd_slice *raw) {
    int ok = 0;
    if (!wd_get(in, path, raw)) return 0;
    *out = wd_num(*raw, &ok);
    return ok;
}

static wd_i64 over(const char *action, const char *rule, wd_slice cost, wd_slice max, const char *what) {
    wd_buf reason = {0, 0, 0};
    wd_buf_puts(&reason, "the call may cost up to $");
    wd_buf_put(&reason, cost.ptr, cost.len);
    wd_buf_puts(&reason, ", above the ");
    wd_buf_puts(&reason, what);
    wd_buf_puts(&reason, " of $");
    wd_buf_put(&reason, max.ptr, max.len);
    wd_buf_puts(&reason, " per call");
    return wd_decide_buf(action, rule, &reason);
}

/* The limits, read from the config once (an instance is put back to its
 * state after warden_init before every evaluation): each evaluation then
 * reads one member of its input. */
static double hard, max;
static wd_slice hard_raw, max_raw;
static int have_hard, have_max;

WARDEN_EXPORT("warden_init") void warden_init(const char *ptr, int len) {
    wd_slice config = wd_slice_of(ptr, len);
    have_hard = limit(config, "hard_max_usd", &hard, &hard_raw);
    have_max = limit(config, "max_call_usd", &max, &max_raw);
}

WARDEN_EXPORT("warden_evaluate") wd_i64 warden_evaluate(const char *ptr, int len) {
    wd_slice in = wd_slice_of(ptr, len), cost_raw;
    int ok = 0;
    double cost;
    if (!wd_get(in, "call.estimated_cost_usd", &cost_raw) || wd_is_null(cost_raw)) return wd_allow();
    cost = wd_num(cost_raw, &ok);
    if (!ok) return wd_decide("deny", "policy_error", "call.estimated_cost_usd is not a number");
    if (have_hard && cost > hard) return over("deny", "hard_max_usd", cost_raw, hard_raw, "hard limit");
    if (have_max && cost > max)
        return over("require_approval", "max_call_usd", cost_raw, max_raw, "approval threshold");
    return wd_allow();
}
