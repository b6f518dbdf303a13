//! The `record-offload` binary: everything lives in the library; see `cli`.

/// mimalloc: look-ups and uploads allocate many small, short-lived buffers; it spends about
/// half of glibc malloc's CPU on them (see README, "Benchmarks").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    record_offload::cli::main()
}
