// mimalloc: the request path allocates many small, short-lived buffers
// across threads, where it is faster and leaner than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    warden::cli::main()
}
