//! Everything ctnetlink: wire decoding (`decode`, which lives in `ctwatch_parse::ctnetlink` so
//! that it can be fuzzed without the runtime) and the sockets (`socket`).

pub mod socket;

pub use ctwatch_parse::ctnetlink as decode;
pub use decode::{Conn, ConnKind, Tuple};
pub use socket::{EventSocket, KernelStats, NetlinkError, Recv, RequestSocket};
