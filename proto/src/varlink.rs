//! The Varlink envelope: requests, replies, standard errors and the NUL-delimited framing
//! limits. See <https://varlink.org/Method-Call> for the protocol.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The interface name served by ctwatchd.
pub const INTERFACE: &str = "io.ctwatch";
/// The interface description (IDL); `GetInterfaceDescription` returns it verbatim.
pub const INTERFACE_DESCRIPTION: &str = include_str!("io.ctwatch.varlink");
/// The service interface every Varlink server implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";
/// Its description, as the Varlink specification gives it.
pub const SERVICE_DESCRIPTION: &str = include_str!("service.varlink");

/// Largest request a client may send, NUL excluded.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Largest reply a client accepts, NUL excluded.
pub const MAX_REPLY_LEN: usize = 64 * 1024 * 1024;

/// Standard error names (org.varlink.service).
pub mod errors {
    pub const INTERFACE_NOT_FOUND: &str = "org.varlink.service.InterfaceNotFound";
    pub const METHOD_NOT_FOUND: &str = "org.varlink.service.MethodNotFound";
    pub const METHOD_NOT_IMPLEMENTED: &str = "org.varlink.service.MethodNotImplemented";
    pub const INVALID_PARAMETER: &str = "org.varlink.service.InvalidParameter";
    pub const PERMISSION_DENIED: &str = "org.varlink.service.PermissionDenied";
    pub const EXPECTED_MORE: &str = "org.varlink.service.ExpectedMore";
    /// ctwatch's own: the daemon cannot answer right now.
    pub const UNAVAILABLE: &str = "io.ctwatch.Unavailable";
    /// ctwatch's own: the message was not a Varlink call (bad JSON, too large, not an object).
    pub const INVALID_REQUEST: &str = "io.ctwatch.InvalidRequest";
    pub const NO_SUCH_INCIDENT: &str = "io.ctwatch.NoSuchIncident";
    /// ctwatch's own: the `netns` a call names is not one the daemon follows.
    pub const NO_SUCH_NETNS: &str = "io.ctwatch.NoSuchNetns";
    /// ctwatch's own: a parameter asks for more than one request may cost; names the
    /// parameter and its bound.
    pub const LIMIT_EXCEEDED: &str = "io.ctwatch.LimitExceeded";
    /// ctwatch's own: the request did not finish within the daemon's per-request deadline.
    pub const DEADLINE_EXCEEDED: &str = "io.ctwatch.DeadlineExceeded";
}

/// A method call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub oneway: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub upgrade: bool,
}

impl Request {
    pub fn new(method: impl Into<String>, parameters: Map<String, Value>) -> Self {
        Request {
            method: method.into(),
            parameters: Some(parameters),
            oneway: false,
            more: false,
            upgrade: false,
        }
    }
}

/// A reply: either `parameters`, or `error` with its parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub continues: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(parameters: Value) -> Self {
        Reply {
            parameters: Some(parameters),
            continues: false,
            error: None,
        }
    }

    pub fn error(name: &str, parameters: Value) -> Self {
        Reply {
            parameters: Some(parameters),
            continues: false,
            error: Some(name.to_string()),
        }
    }

    pub fn invalid_parameter(parameter: &str) -> Self {
        Self::error(
            errors::INVALID_PARAMETER,
            serde_json::json!({ "parameter": parameter }),
        )
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Methods and types named in an interface description, for checking it against a dispatch
/// table. A small scanner of the IDL grammar's top-level keywords, not a full parser.
pub fn idl_methods(description: &str) -> Vec<String> {
    description
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("method "))
        .filter_map(|rest| rest.split('(').next())
        .map(|name| name.trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idl_scanner_finds_methods() {
        assert_eq!(
            idl_methods(INTERFACE_DESCRIPTION),
            vec![
                "Status",
                "Top",
                "Query",
                "Incidents",
                "Incident",
                "Advise",
                "Dns",
                "Watch",
                "Netns"
            ]
        );
        assert_eq!(
            idl_methods(SERVICE_DESCRIPTION),
            vec!["GetInfo", "GetInterfaceDescription"]
        );
    }

    #[test]
    fn idl_names_the_interface() {
        assert!(INTERFACE_DESCRIPTION
            .lines()
            .any(|l| l.trim() == format!("interface {INTERFACE}")));
    }

    #[test]
    fn request_round_trip_and_defaults() {
        let r: Request = serde_json::from_str(r#"{"method":"io.ctwatch.Status"}"#).unwrap();
        assert_eq!(r.method, "io.ctwatch.Status");
        assert!(!r.more && !r.oneway && r.parameters.is_none());
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(back, r#"{"method":"io.ctwatch.Status"}"#);
    }

    #[test]
    fn error_reply_shape() {
        let r = Reply::invalid_parameter("limit");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["error"], "org.varlink.service.InvalidParameter");
        assert_eq!(v["parameters"]["parameter"], "limit");
        assert!(v.get("continues").is_none());
    }
}
