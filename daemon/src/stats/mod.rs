//! Aggregation: the keys entries are counted by, the capped interning tables, and the live
//! picture built from events and dumps.

pub mod keys;
pub mod live;
pub mod table;
pub mod window;

pub use live::{Caps, Tracker, TrackerCounters, DEFAULT_CAPS, DEFAULT_WINDOW_KEYS};
