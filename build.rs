//! Compiles the admin API's proto (`proto/tollgate/admin/v1/admin.proto`) with protox, a protobuf
//! compiler in Rust, so building tollgate needs no system `protoc`. Writes the Rust types and the
//! tonic service (`tollgate.admin.v1.rs`) and the descriptors, with their `google.api.http`
//! options and comments (`admin_descriptor.bin`), which the REST side and its OpenAPI document
//! are served from.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_file("tollgate/admin/v1/admin.proto")?;
    std::fs::write(
        out.join("admin_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    for file in compiler.files() {
        if let Some(path) = file.path() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
