//! Generated code for pushgrid's two protobuf packages.
//!
//! * [`client`]: the bodies of device frames (see `crates/wire` for the 12-byte header).
//! * [`cluster`]: the internal tonic services the roles speak to each other.

#[allow(clippy::all, missing_docs)]
pub mod client {
    tonic::include_proto!("pushgrid.client");
}

#[allow(clippy::all, missing_docs)]
pub mod cluster {
    tonic::include_proto!("pushgrid.cluster");
}
