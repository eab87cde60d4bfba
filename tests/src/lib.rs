//! Test support for ctwatch's end-to-end tests: network namespaces that clean up after
//! themselves, a daemon launcher, a ctctl runner and traffic generators. The tests themselves
//! live in `tests/tests/`, one file per area. They need root, iproute2, nftables and
//! conntrack-tools; a missing one fails the test loudly.

pub mod support;
