//! Compiles the engine API (`tandem.engine.v1`) with a vendored protoc, so a fresh machine needs no apt package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts run single-threaded; prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".tandem.engine.v1")
        .compile_protos(&["proto/tandem/engine/v1/engine.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
