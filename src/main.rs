//! The `record-offload` binary: everything lives in the library; see `ops::cli`.

fn main() -> std::process::ExitCode {
    record_offload::ops::cli::main()
}
