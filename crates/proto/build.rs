//! Compiles `proto/*.proto` with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        proto_dir.join("client.proto"),
        proto_dir.join("cluster.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let file_descriptors = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        // Its Debug (in lib.rs) leaves out the provider secrets.
        .skip_debug(["pushgrid.cluster.NotifyProvider"])
        .compile_fds(file_descriptors)?;
    Ok(())
}
