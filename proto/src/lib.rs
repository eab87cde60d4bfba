//! Wire types shared by `ctwatchd` and `ctctl`: the Varlink envelope, the `io.ctwatch`
//! interface description and the typed replies. No runtime and no daemon logic live here.
//!
//! Compatibility rule: fields are only ever added, each optional or defaulted, and a name is
//! never reused. Clients ignore fields they do not know.

mod types;
mod varlink;

pub use types::*;
pub use varlink::*;
