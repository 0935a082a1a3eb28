//! The admin API's protobuf types and tonic service, generated from
//! `proto/tollgate/admin/v1/admin.proto` at build time, and the descriptors they came from.

#![allow(
    clippy::doc_lazy_continuation,
    clippy::doc_overindented_list_items,
    clippy::allow_attributes_without_reason,
    reason = "generated from the proto's comments"
)]

tonic::include_proto!("tollgate.admin.v1");

/// The encoded `FileDescriptorSet` of the admin proto and its imports, with their options
/// (`google.api.http`) and comments.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));

/// The admin proto's descriptors, decoded once.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the descriptors build.rs wrote decode")
    })
}
