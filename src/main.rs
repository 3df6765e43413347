// mimalloc: the request path allocates many small, short-lived buffers
// across threads, where it is faster and leaner than glibc malloc. Built
// without transparent huge pages: with them every 2 MiB of heap the proxy
// touches becomes resident at once (14 MB at start, half of the growth of
// 4,000 held calls was huge-page padding).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() -> std::process::ExitCode {
    // mimalloc keeps freed pages for 1 s before giving them back; under load
    // that second of churn was 30-60 MB of Warden's RSS. 10 ms (mimalloc 2's
    // default) returns them while costing no measurable CPU.
    // mimalloc's own MIMALLOC_PURGE_DELAY still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it when it next purges.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
    warden::cli::main()
}
