pub mod conntrack;
pub mod stats;
