//! Compiles our CSI v1 subset (proto/csi/v1/csi.proto) with a vendored protoc: server stubs for the
//! plugin, client stubs for the end-to-end suite that plays kubelet.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // Build scripts run single-threaded; prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[PathBuf::from("proto/csi/v1/csi.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
