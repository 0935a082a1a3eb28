//! The admin API: what the systems that provision keys (a portal, billing, a support console)
//! call, on its own port (`admin_addr`), over gRPC and REST/JSON from one proto.
//!
//! - [`service`]: [`service::KeyAdmin`], the key operations and their validation; the
//!   `tollgate keys` commands use it too.
//! - [`pb`]: the protobuf types and tonic service generated from `proto/tollgate/admin/v1`.

pub mod pb;
pub mod service;
