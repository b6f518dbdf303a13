//! The `record-offload` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    record_offload::cli::main()
}
