/*
 * secret_guard: denies a request whose messages carry a private key or a
 * cloud credential, before it leaves for the provider. Needs the messages:
 *
 *   [[policies]]
 *   name = "secret_guard"
 *   module = "policies/secret_guard.wasm"
 *   include_messages = true
 */
#include "../plugins/sdk/c/warden.h"

static int is_upper_alnum(char c) { return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
static int is_key_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* `prefix` followed by `n` characters accepted by `ok`, anywhere in text. */
static int token_after(wd_slice text, const char *prefix, wd_u32 n, int (*ok)(char)) {
    wd_u32 plen = wd_strlen(prefix);
    for (wd_u32 i = 0; i + plen + n <= text.len; i++) {
        if (text.ptr[i] != prefix[0] || !wd_mem_eq(text.ptr + i, prefix, plen)) continue;
        wd_u32 j = 0;
        while (j < n && ok(text.ptr[i + plen + j])) j++;
        if (j == n) return 1;
    }
    return 0;
}

typedef struct {
    const char *rule;
    const char *what;
} finding;

static int scan(wd_slice text, finding *found) {
    int begin = wd_find(text.ptr, text.len, "-----BEGIN ");
    if (begin >= 0) {
        wd_slice rest = {text.ptr + begin, text.len - (wd_u32)begin};
        int end = wd_find(rest.ptr, rest.len < 80 ? rest.len : 80, "PRIVATE KEY");
        if (end >= 0) {
            found->rule = "private_key";
            found->what = "a private key (-----BEGIN ... PRIVATE KEY-----)";
            return 1;
        }
    }
    if (token_after(text, "AKIA", 16, is_upper_alnum) || token_after(text, "ASIA", 16, is_upper_alnum)) {
        found->rule = "aws_access_key";
        found->what = "an AWS access key id";
        return 1;
    }
    if (wd_find(text.ptr, text.len, "aws_secret_access_key") >= 0) {
        found->rule = "aws_secret_key";
        found->what = "an AWS secret access key";
        return 1;
    }
    if (wd_find(text.ptr, text.len, "private_key_id") >= 0 && wd_find(text.ptr, text.len, "service_account") >= 0) {
        found->rule = "gcp_service_account_key";
        found->what = "a Google Cloud service account key";
        return 1;
    }
    if (token_after(text, "AIza", 35, is_key_char)) {
        found->rule = "google_api_key";
        found->what = "a Google API key";
        return 1;
    }
    if (wd_find(text.ptr, text.len, "AccountKey=") >= 0 || wd_find(text.ptr, text.len, "SharedAccessKey=") >= 0) {
        found->rule = "azure_key";
        found->what = "an Azure storage or service bus key";
        return 1;
    }
    if (token_after(text, "ghp_", 36, is_key_char) || token_after(text, "github_pat_", 40, is_key_char)) {
        found->rule = "github_token";
        found->what = "a GitHub token";
        return 1;
    }
    return 0;
}

WARDEN_EXPORT("warden_evaluate") wd_i64 warden_evaluate(const char *ptr, int len) {
    wd_slice in = wd_slice_of(ptr, len), part;
    static const char *members[] = {"messages", "input", "system", "prompt"};
    finding found;
    for (int i = 0; i < 4; i++) {
        if (!wd_get(in, members[i], &part)) continue;
        if (scan(part, &found)) {
            wd_buf reason = {0, 0, 0};
            wd_buf_puts(&reason, "the request's ");
            wd_buf_puts(&reason, members[i]);
            wd_buf_puts(&reason, " contain ");
            wd_buf_puts(&reason, found.what);
            wd_buf_puts(&reason, "; remove the secret and send the request again");
            return wd_decide_buf("deny", found.rule, &reason);
        }
    }
    return wd_allow();
}
