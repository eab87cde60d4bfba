pub mod conntrack;
