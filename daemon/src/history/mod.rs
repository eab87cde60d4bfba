//! History: buckets of per-key counts closed by the reader, written to the store by a writer
//! thread, rolled up, expired, and queried.

pub mod query;
pub mod record;
pub mod writer;

pub use writer::{HistoryConfig, HistoryHandle};
