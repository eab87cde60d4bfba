//! Pure parsers of everything ctwatchd reads from outside: ctnetlink messages from the kernel
//! (`ctnetlink`), kernel log records (`kmsg`), Varlink frames and call parameters from clients
//! (`frame`, `params`) and the config file (`config`).
//!
//! No I/O, no threads, no runtime and no store live here, so the fuzz targets (`fuzz/`) build
//! in seconds and exercise exactly the code the daemon runs. Every parser returns an error for
//! bad input; none panics (the fuzz targets check that).

pub mod config;
pub mod ctnetlink;
pub mod frame;
pub mod kmsg;
pub mod params;
