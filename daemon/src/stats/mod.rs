//! Aggregation: the keys entries are counted by, the capped interning tables, the live
//! picture built from events and dumps (owned by the reader thread), and the snapshots of it
//! that everyone else reads.

pub mod dns;
pub mod keys;
pub mod live;
pub mod snapshot;
pub mod table;
pub mod window;

pub use live::{Caps, Tracker, TrackerCounters, DEFAULT_CAPS, DEFAULT_WINDOW_KEYS};
pub use snapshot::{DumpInfo, DumpReason, Published, ReaderFigures, Snapshot};
