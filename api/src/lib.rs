//! Tandem's control API: the request and response types, the HTTP server on
//! a unix socket and the client behind `tandem remote`.
//!
//! How a request travels:
//! 1. The API thread accepts a connection and parses one HTTP/1.1 request.
//! 2. [`Endpoint::route`] maps (method, path) to an [`Endpoint`]; the body,
//!    if the endpoint takes one, is parsed into its typed request.
//! 3. The thread sends an [`ApiMessage`] (the request plus a reply channel)
//!    to the VMM's control loop and wakes it through the notifier.
//! 4. The control loop, the only place that changes the VM, acts and replies.
//! 5. The API thread writes the reply as JSON (2xx) or an [`ErrorBody`] (4xx/5xx).
//!
//! [`ENDPOINTS`] is the single table the router, the client and the OpenAPI
//! document are checked against.

pub mod client;
pub mod server;

use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

pub const API_PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Every API action. Adding one means: a variant here, a row in
/// [`ENDPOINTS`], a path in `openapi.json` (a test checks the last two agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    Ping,
    VmInfo,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
}

/// (method, path below [`API_PREFIX`], endpoint, CLI command name).
pub const ENDPOINTS: &[(Method, &str, Endpoint, &str)] = &[
    (Method::Get, "vmm.ping", Endpoint::Ping, "ping"),
    (Method::Get, "vm.info", Endpoint::VmInfo, "info"),
    (Method::Put, "vm.pause", Endpoint::VmPause, "pause"),
    (Method::Put, "vm.resume", Endpoint::VmResume, "resume"),
    (Method::Put, "vm.shutdown", Endpoint::VmShutdown, "shutdown"),
    (Method::Put, "vm.reboot", Endpoint::VmReboot, "reboot"),
];

/// The OpenAPI document served at `GET /api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Why a request was refused by [`Endpoint::route`].
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed,
}

impl Endpoint {
    pub fn route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
        let name = path.strip_prefix(API_PREFIX).ok_or(RouteError::NotFound)?;
        let mut found = false;
        for (m, p, e, _) in ENDPOINTS {
            if *p == name {
                found = true;
                if m.as_str() == method {
                    return Ok(*e);
                }
            }
        }
        Err(if found {
            RouteError::MethodNotAllowed
        } else {
            RouteError::NotFound
        })
    }

    fn row(self) -> &'static (Method, &'static str, Endpoint, &'static str) {
        ENDPOINTS
            .iter()
            .find(|r| r.2 == self)
            .expect("every endpoint has a row in ENDPOINTS")
    }

    pub fn method(self) -> Method {
        self.row().0
    }

    pub fn path(self) -> String {
        format!("{API_PREFIX}{}", self.row().1)
    }

    pub fn command(self) -> &'static str {
        self.row().3
    }

    pub fn from_command(cmd: &str) -> Option<Endpoint> {
        ENDPOINTS.iter().find(|r| r.3 == cmd).map(|r| r.2)
    }
}

/// A request as the control loop receives it.
#[derive(Debug)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// The JSON body, already checked to be well-formed JSON (or `Null`).
    pub body: serde_json::Value,
}

/// The control loop's answer: a JSON value, or an error with an HTTP status.
pub type ApiResponse = Result<serde_json::Value, ApiError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: Sender<ApiResponse>,
}

/// What `vm.info` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: serde_json::Value,
    pub devices: Vec<DeviceInfo>,
    /// How many times the guest has been (re)booted in this process.
    pub boots: u32,
    /// While paused: where each vCPU stopped (registers), for diagnosis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpus: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: String,
    /// Where the device sits: "pci 00:03.0", "pio 0x3f8", ...
    pub location: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            Endpoint::route("GET", "/api/v1/vmm.ping"),
            Ok(Endpoint::Ping)
        );
        assert_eq!(
            Endpoint::route("PUT", "/api/v1/vm.pause"),
            Ok(Endpoint::VmPause)
        );
        assert_eq!(
            Endpoint::route("GET", "/api/v1/vm.pause"),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            Endpoint::route("GET", "/api/v1/nope"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            Endpoint::route("GET", "/vmm.ping"),
            Err(RouteError::NotFound)
        );
        for (_, _, e, cmd) in ENDPOINTS {
            assert_eq!(Endpoint::from_command(cmd), Some(*e));
            assert_eq!(Endpoint::route(e.method().as_str(), &e.path()), Ok(*e));
        }
    }

    /// The OpenAPI document and the endpoint table describe the same API.
    #[test]
    fn openapi_matches_endpoints() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = vec![];
        for (path, ops) in paths {
            for m in ops.as_object().expect("operations").keys() {
                documented.push((m.to_uppercase(), path.clone()));
            }
        }
        documented.retain(|(_, p)| p != "/api/v1/openapi.json");
        let mut table: Vec<_> = ENDPOINTS
            .iter()
            .map(|(m, p, _, _)| (m.as_str().to_string(), format!("{API_PREFIX}{p}")))
            .collect();
        documented.sort();
        table.sort();
        assert_eq!(documented, table);
    }
}
