//! `tandem-csi`: see the library crate.
fn main() -> std::process::ExitCode {
    csi_node::cli::main()
}
