//! Generates the gRPC code for every file in `PROTOS`.

const PROTOS: &[&str] = &[
    "berth/v1/common.proto",
    "berth/v1/agent.proto",
    "berth/v1/control.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(PROTOS, &["."])?;
    Ok(())
}
