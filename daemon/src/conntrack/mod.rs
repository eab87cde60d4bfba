//! Everything ctnetlink: wire decoding (`decode`) and the sockets (`socket`).

pub mod decode;
pub mod socket;

pub use decode::{Conn, ConnKind, Tuple};
pub use socket::{EventSocket, KernelStats, NetlinkError, Recv, RequestSocket};
