//! Compiles the engine API (`tandem.engine.v1`) and Tandem's CSI v1 subset (`csi.v1`, proto/csi/v1/csi.proto:
//! server and client stubs for the node plugin, the controller and the suites that play kubelet or the
//! sidecars) with a vendored protoc, so a fresh machine needs no apt package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY-free: build scripts run single-threaded; prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".tandem.engine.v1")
        .compile_protos(&["proto/tandem/engine/v1/engine.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[std::path::PathBuf::from("proto/csi/v1/csi.proto")],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
