//! Tandem's control API: the request and response types, the HTTP server on
//! a unix socket and the client behind `tandem remote`.
//!
//! How a request travels:
//! 1. The API thread (hyper on a tokio runtime of its own, see [`server`]) accepts a
//!    connection and reads one HTTP/1.1 request, its body bounded in size and time.
//! 2. [`Endpoint::route`] maps (method, path) to an [`Endpoint`]; the body must be
//!    JSON (or empty).
//! 3. The thread sends an [`ApiMessage`] (the request plus a reply channel)
//!    to the VMM's control loop and wakes it through the notifier.
//! 4. The control loop, the only place that changes the VM, acts and replies.
//! 5. The API thread writes the reply as JSON (2xx) or an [`ErrorBody`] (4xx/5xx).
//!
//! `GET /api/v1/events` never reaches the control loop: the server subscribes the
//! connection to the [`events::EventHub`] the control loop publishes to, and streams.
//!
//! [`ENDPOINTS`] is the single table the router, the client and the OpenAPI
//! document are checked against.

pub mod client;
pub mod events;
pub mod server;

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
    VmAddNet,
    VmAddDevice,
    VmRemoveDevice,
    VmSendMigration,
    VmCancelMigration,
    /// The event stream (served by the API thread itself).
    Events,
}

/// (method, path below [`API_PREFIX`], endpoint, CLI command name).
pub const ENDPOINTS: &[(Method, &str, Endpoint, &str)] = &[
    (Method::Get, "vmm.ping", Endpoint::Ping, "ping"),
    (Method::Get, "vm.info", Endpoint::VmInfo, "info"),
    (Method::Put, "vm.pause", Endpoint::VmPause, "pause"),
    (Method::Put, "vm.resume", Endpoint::VmResume, "resume"),
    (Method::Put, "vm.shutdown", Endpoint::VmShutdown, "shutdown"),
    (Method::Put, "vm.reboot", Endpoint::VmReboot, "reboot"),
    (Method::Put, "vm.add-net", Endpoint::VmAddNet, "add-net"),
    (
        Method::Put,
        "vm.add-device",
        Endpoint::VmAddDevice,
        "add-device",
    ),
    (
        Method::Put,
        "vm.remove-device",
        Endpoint::VmRemoveDevice,
        "remove-device",
    ),
    (
        Method::Put,
        "vm.send-migration",
        Endpoint::VmSendMigration,
        "send-migration",
    ),
    (
        Method::Put,
        "vm.cancel-migration",
        Endpoint::VmCancelMigration,
        "cancel-migration",
    ),
    (Method::Get, "events", Endpoint::Events, "events"),
];

/// The OpenAPI document served at `GET /api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Why a request was refused by [`Endpoint::route`].
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path takes only `allow` (the 405 answer names it in `Allow`).
    MethodNotAllowed {
        allow: Method,
    },
}

impl Endpoint {
    pub fn route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
        let name = path.strip_prefix(API_PREFIX).ok_or(RouteError::NotFound)?;
        let mut found = None;
        for (m, p, e, _) in ENDPOINTS {
            if *p == name {
                found = Some(*m);
                if m.as_str() == method {
                    return Ok(*e);
                }
            }
        }
        Err(match found {
            Some(allow) => RouteError::MethodNotAllowed { allow },
            None => RouteError::NotFound,
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
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            status: 504,
            message: message.into(),
        }
    }
}

/// The body of `vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDevice {
    pub id: String,
    /// Tear the device down without asking the guest.
    #[serde(default)]
    pub surprise: bool,
    /// How long an orderly removal waits for the guest to release the device.
    #[serde(default = "RemoveDevice::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

impl RemoveDevice {
    pub const MAX_TIMEOUT_MS: u64 = 60_000;
    fn default_timeout_ms() -> u64 {
        10_000
    }
}

/// What an orderly removal does when the guest does not release the device in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Fail the request; the device stays.
    #[default]
    Error,
    /// Remove the device by surprise.
    Surprise,
}

/// The answer of `vm.add-net`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceAdded {
    pub id: String,
    pub slot: usize,
    pub bdf: String,
}

/// The answer of `vm.remove-device`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRemoved {
    pub id: String,
    pub slot: usize,
    /// `released` (the guest ejected it), `surprise`, `timeout-surprise`, `reboot`
    /// (the VM rebooted while the removal waited) or `hidden` (a failover primary the
    /// guest could not see).
    pub how: String,
    /// From the request to the answer.
    pub elapsed_ms: u64,
    /// For `released`: where that time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<ReleaseSteps>,
}

/// The steps of an orderly removal the guest answered, as the VMM saw them (ms, to
/// 0.1 ms): the guest reading the eject request (interrupt and ACPI `_EVT`), the guest's
/// own release (driver unbound, device removed, up to its `_EJ0` write), and the VMM's
/// tear-down of the device and its answer after that write.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ReleaseSteps {
    pub notify_ms: f64,
    pub guest_ms: f64,
    pub vmm_ms: f64,
}

/// A request body as `T`: a JSON object only (serde would also take a struct
/// from an array of its fields, which openapi.json does not allow).
pub fn from_body<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
    if !v.is_object() {
        return Err("the body must be a JSON object".into());
    }
    serde_json::from_value(v.clone()).map_err(|e| e.to_string())
}

/// The request bodies that are `--net` and `--device` specs in JSON form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecBody {
    /// `vm.add-net`: `NetDevice` in openapi.json.
    Net,
    /// `vm.add-device`: `PassthroughDevice` in openapi.json.
    Device,
}

impl SpecBody {
    /// The JSON type openapi.json gives `key` in this body, if it has the key.
    fn type_of(self, key: &str) -> Option<&'static str> {
        static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
        let doc = DOC.get_or_init(|| serde_json::from_str(OPENAPI).unwrap_or_default());
        let component = match self {
            SpecBody::Net => "NetDevice",
            SpecBody::Device => "PassthroughDevice",
        };
        doc["components"]["schemas"][component]["properties"][key]["type"].as_str()
    }
}

/// `key=value,...` (the `--net` or `--device` syntax) as the JSON object the API
/// takes: each value of the type openapi.json gives its key (booleans from on/off).
pub fn kv_to_json(body: SpecBody, spec: &str) -> Result<serde_json::Value, String> {
    let mut m = serde_json::Map::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let value = match (body.type_of(k), v) {
            (Some("boolean"), "on" | "true" | "yes") => serde_json::Value::Bool(true),
            (Some("boolean"), "off" | "false" | "no") => serde_json::Value::Bool(false),
            (Some("boolean"), _) => return Err(format!("{k}={v}: on or off")),
            (Some("integer"), n) => n
                .parse::<u64>()
                .map(serde_json::Value::from)
                .map_err(|_| format!("{k}={v}: not a number"))?,
            (_, v) => serde_json::Value::String(v.to_string()),
        };
        if m.insert(k.to_string(), value).is_some() {
            return Err(format!("{k} given twice"));
        }
    }
    Ok(serde_json::Value::Object(m))
}

/// The JSON object of `vm.add-net` or `vm.add-device` back in `key=value,...`
/// form. Refuses anything but a flat object, a value of another type than
/// openapi.json gives its key, and values that could smuggle another key in (`,`
/// or `=`). Keys openapi.json does not know are left to the spec's parser to
/// refuse by name.
pub fn json_to_kv(body: SpecBody, v: &serde_json::Value) -> Result<String, String> {
    use serde_json::Value;
    let obj = v
        .as_object()
        .ok_or("the body must be a JSON object such as {\"tap\": \"tap0\", \"mac\": \"52:54:00:12:34:56\"}")?;
    let mut parts = Vec::new();
    for (k, v) in obj {
        let text = match (body.type_of(k), v) {
            (Some("string") | None, Value::String(s)) => s.clone(),
            (Some("integer") | None, Value::Number(n)) => n.to_string(),
            (Some("boolean") | None, Value::Bool(b)) => if *b { "on" } else { "off" }.to_string(),
            (Some(t), _) => return Err(format!("{k}: expected {t}")),
            (None, _) => return Err(format!("{k}: expected a string, number or boolean")),
        };
        if text.contains([',', '=']) || k.contains([',', '=']) {
            return Err(format!("{k}: ',' and '=' are not allowed"));
        }
        parts.push(format!("{k}={text}"));
    }
    Ok(parts.join(","))
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Where the control loop sends a request's answer. Sending needs no runtime; the
/// API thread awaits it, with no thread of its own per request.
pub type Answer = tokio::sync::oneshot::Sender<ApiResponse>;
/// Where an [`Answer`] arrives.
pub type Answered = tokio::sync::oneshot::Receiver<ApiResponse>;

/// Why an [`Answered`] has nothing yet (`Empty`) or never will (`Closed`).
pub use tokio::sync::oneshot::error::TryRecvError;

/// A request's answer channel.
pub fn answer_channel() -> (Answer, Answered) {
    tokio::sync::oneshot::channel()
}

pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: Answer,
    /// The control loop takes the request before carrying it out; the API thread
    /// gives it up when it stops waiting. Whichever comes first wins, so a request
    /// whose client was told it was not carried out never is.
    pub claim: Claim,
}

/// Who owns an API request: see [`ApiMessage::claim`].
#[derive(Clone, Debug, Default)]
pub struct Claim(std::sync::Arc<std::sync::atomic::AtomicU8>);

impl Claim {
    const PENDING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    fn swap(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.0
            .compare_exchange(Self::PENDING, to, SeqCst, SeqCst)
            .is_ok()
    }

    /// The control loop: whether to carry the request out (it is now taken).
    pub fn take(&self) -> bool {
        self.swap(Self::TAKEN)
    }

    /// The API thread: whether the request was never taken (and now never will be).
    pub fn abandon(&self) -> bool {
        self.swap(Self::ABANDONED)
    }
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
    /// The failover pairs (standbys with or without a primary).
    #[serde(default)]
    pub pairs: Vec<PairInfo>,
}

/// One failover pair in `vm.info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairInfo {
    pub standby: String,
    /// The guest's driver acked STANDBY on the standby.
    pub negotiated: bool,
    pub primary: Option<String>,
    pub slot: Option<usize>,
    /// `hidden`, `plugged` or `ejecting`; `none` without a primary.
    pub state: String,
    /// The guest ejected the primary on its own: it stays hidden until STANDBY is
    /// negotiated afresh.
    pub parked: bool,
    /// A live migration holds the primary off the bus (until it ends; if it fails, the
    /// primary comes back).
    #[serde(default)]
    pub held: bool,
    /// The primary is off the bus with its host function kept open (quiet, no DMA):
    /// plugging it again skips opening the function and mapping guest RAM for DMA.
    #[serde(default)]
    pub kept_open: bool,
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
    /// A NIC's data-path counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<NetCounters>,
}

/// What a virtio-net NIC moved and dropped, per queue pair, since it was added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub queues: Vec<QueueCounters>,
    /// Frames for the guest the host's tap dropped because its queue was full (the
    /// guest did not post rx buffers fast enough). The kernel counts them per tap,
    /// not per queue; absent if the tap is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_dropped: Option<u64>,
}

/// One queue pair's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    pub pair: usize,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the tap dropped here: the guest's buffers were malformed or too
    /// small for the frame.
    pub rx_dropped: u64,
    /// Frames from the guest dropped here: malformed chains, or the tap refused them.
    pub tx_dropped: u64,
    /// Chains the guest posted that broke the rules (outside its memory, wrong
    /// direction, too short...).
    pub bad_chains: u64,
    /// Times a frame waited because the guest had posted no rx buffer.
    pub rx_no_buffers: u64,
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
            Err(RouteError::MethodNotAllowed { allow: Method::Put })
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

    #[test]
    fn net_specs_round_trip_and_refuse_smuggling() {
        let net = SpecBody::Net;
        let j = kv_to_json(net, "id=n1,tap=t1,mac=52:54:00:00:00:01,standby=on,slot=5").unwrap();
        assert_eq!(j["standby"], true);
        assert_eq!(j["slot"], 5);
        let kv = json_to_kv(net, &j).unwrap();
        assert_eq!(kv_to_json(net, &kv).unwrap(), j);
        assert!(kv_to_json(net, "slot=x").is_err());
        assert!(kv_to_json(net, "standby=maybe").is_err());
        assert!(kv_to_json(net, "tap").is_err());
        assert!(kv_to_json(net, "id=a,id=b").is_err());
        // Types as openapi.json gives them (api_bodies found a number taken as a path).
        let dev = SpecBody::Device;
        assert!(json_to_kv(dev, &serde_json::json!({"path": 7})).is_err());
        assert!(json_to_kv(net, &serde_json::json!({"tap": "t", "slot": "5"})).is_err());
        assert!(json_to_kv(net, &serde_json::json!({"tap": "t", "standby": "on"})).is_err());
        assert_eq!(
            kv_to_json(dev, "path=7,slot=3").unwrap(),
            serde_json::json!({"path": "7", "slot": 3})
        );
        for bad in [
            serde_json::json!("tap=t"),
            serde_json::json!({"tap": "t,mac=52:54:00:00:00:02"}),
            serde_json::json!({"tap": ["t"]}),
            serde_json::json!({"tap": null}),
            serde_json::json!({"a=b": "c"}),
        ] {
            assert!(json_to_kv(SpecBody::Net, &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remove_device_defaults_and_unknown_fields() {
        let r: RemoveDevice = serde_json::from_str(r#"{"id": "n1"}"#).unwrap();
        assert_eq!(
            (r.surprise, r.timeout_ms, r.on_timeout),
            (false, 10_000, OnTimeout::Error)
        );
        let r: RemoveDevice =
            serde_json::from_str(r#"{"id": "n1", "on_timeout": "surprise", "timeout_ms": 5}"#)
                .unwrap();
        assert_eq!((r.timeout_ms, r.on_timeout), (5, OnTimeout::Surprise));
        assert!(serde_json::from_str::<RemoveDevice>(r#"{"id": "n1", "force": true}"#).is_err());
        assert!(serde_json::from_str::<RemoveDevice>(r#"{"surprise": true}"#).is_err());
        // Found by api_bodies: serde takes a struct from an array of its fields.
        assert!(from_body::<RemoveDevice>(&serde_json::json!(["n1"])).is_err());
        assert!(from_body::<RemoveDevice>(&serde_json::json!({"id": "n1"})).is_ok());
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
