//! The `keygate` binary: a thin shell over the library's CLI.
#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: the request path allocates
/// small, short-lived buffers on every request, and glibc's malloc/free
/// showed as ~5% of the gateway's CPU under load (perf, benches/e2e).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
