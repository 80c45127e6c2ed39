//! The bodies of every API request that takes one (`vm.add-net`, `vm.add-device`,
//! `vm.remove-device`, `vm.send-migration`), any bytes, through what the VMM does with
//! them before it touches a device: the server's JSON reading, then the control loop's
//! parsing and checks (against a VM that has a NIC and a passthrough device already).
//!
//! Beyond "no panic", the body and `openapi.json` must agree, checked with a small
//! validator of the JSON Schema the document uses:
//! - a body the VMM takes is one the document allows;
//! - a body the document allows is taken, or refused with 404 (it names something that
//!   does not exist) or 409 (it clashes with what is there), never 400;
//! - every refusal is 400, 404 or 409.
//!
//! The first byte picks the endpoint; the rest is the body. `config.rs` and
//! `migration.rs` live in the `tandem` binary and are compiled in by path.
#![no_main]
#![allow(dead_code)]

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

#[path = "../../vmm/src/config.rs"]
mod config;
mod memory {
    pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
}
#[path = "../../vmm/src/migration.rs"]
mod migration;

const ENDPOINTS: [(&str, &str); 4] = [
    ("/api/v1/vm.add-net", "NetDevice"),
    ("/api/v1/vm.add-device", "PassthroughDevice"),
    ("/api/v1/vm.remove-device", "RemoveDevice"),
    ("/api/v1/vm.send-migration", "SendMigration"),
];

fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(api::OPENAPI).expect("openapi.json parses"))
}

/// The request body schema of one endpoint, checked to be the component named.
fn schema(path: &str, component: &str) -> &'static Value {
    let body = &doc()["paths"][path]["put"]["requestBody"]["content"]["application/json"];
    let want = format!("#/components/schemas/{component}");
    assert_eq!(body["schema"]["$ref"], Value::String(want), "{path}");
    &doc()["components"]["schemas"][component]
}

fn regex(pattern: &str) -> Regex {
    static CACHE: OnceLock<std::sync::Mutex<Vec<(String, Regex)>>> = OnceLock::new();
    let mut c = CACHE.get_or_init(Default::default).lock().expect("regex cache");
    if let Some((_, r)) = c.iter().find(|(p, _)| p == pattern) {
        return r.clone();
    }
    let r = Regex::new(pattern).expect("openapi.json's patterns compile");
    c.push((pattern.to_string(), r.clone()));
    r
}

/// Does `v` conform to `s`? The keywords `openapi.json`'s request bodies use; any
/// other keyword in a body schema is a failure here, so that the check grows with
/// the document.
fn valid(v: &Value, s: &Value) -> bool {
    let s = s.as_object().expect("a schema is an object");
    for (k, want) in s {
        let ok = match k.as_str() {
            "description" | "example" => true,
            "type" => match want.as_str().expect("type names one type") {
                "object" => v.is_object(),
                "string" => v.is_string(),
                "boolean" => v.is_boolean(),
                "integer" => v.is_i64() || v.is_u64(),
                t => panic!("type {t} in a request body"),
            },
            "required" => want
                .as_array()
                .expect("required is a list")
                .iter()
                .all(|r| v.get(r.as_str().expect("a name")).is_some()),
            "additionalProperties" => {
                assert_eq!(want, &Value::Bool(false));
                v.as_object().is_none_or(|o| {
                    o.keys().all(|key| s["properties"].get(key).is_some())
                })
            }
            "properties" => v.as_object().is_none_or(|o| {
                o.iter().all(|(key, val)| {
                    want.get(key).is_none_or(|sub| valid(val, sub))
                })
            }),
            "pattern" => v
                .as_str()
                .is_none_or(|t| regex(want.as_str().expect("a pattern")).is_match(t)),
            "not" => !valid(v, want),
            "enum" => want.as_array().expect("enum is a list").contains(v),
            "minimum" => v.as_f64().is_none_or(|n| n >= want.as_f64().expect("a number")),
            "maximum" => v.as_f64().is_none_or(|n| n <= want.as_f64().expect("a number")),
            "multipleOf" => v.as_u64().is_none_or(|n| {
                n % want.as_u64().expect("a whole number") == 0
            }) && v.as_i64().is_none_or(|n| n % want.as_i64().expect("a whole number") == 0),
            other => panic!("keyword {other} in a request body schema"),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A NIC and a passthrough device the VM has already, to clash with.
fn present() -> (Vec<config::NetSpec>, Vec<config::DeviceSpec>) {
    let net = config::parse_net("id=net0,tap=tap0,mac=52:54:00:00:00:01,standby=on", 0)
        .expect("the NIC present");
    let dev = config::parse_device("id=dev0,path=/sys/bus/pci/devices/0000:00:05.0", 0)
        .expect("the device present");
    (vec![net], vec![dev])
}

/// What the control loop answers before it touches a device: `Ok` or the status.
fn take(endpoint: usize, body: &Value) -> Result<(), u16> {
    let refused = |e: config::ConfigError| e.http_status();
    match endpoint {
        0 | 1 => {
            let kind = [api::SpecBody::Net, api::SpecBody::Device][endpoint];
            let kv = api::json_to_kv(kind, body).map_err(|_| 400u16)?;
            let (mut nets, mut devs) = present();
            if endpoint == 0 {
                nets.push(config::parse_net(&kv, 1).map_err(refused)?);
                config::check_nets(&nets).map_err(refused)
            } else {
                devs.push(config::parse_device(&kv, 1).map_err(refused)?);
                config::check_devices(&nets, &devs).map_err(refused)
            }
        }
        2 => {
            let r: api::RemoveDevice = api::from_body(body).map_err(|_| 400u16)?;
            if !(1..=api::RemoveDevice::MAX_TIMEOUT_MS).contains(&r.timeout_ms) {
                return Err(400);
            }
            // Which ids exist is the control loop's next question (404).
            Ok(())
        }
        _ => {
            let p: migration::SendParams = api::from_body(body).map_err(|_| 400u16)?;
            migration::Url::parse(&p.url).map_err(|_| 400u16)?;
            p.check().map_err(|_| 400u16)
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let endpoint = which as usize % ENDPOINTS.len();
    // As the server reads it: blank is no body, anything else must be JSON (400).
    let body = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Value::Null
    } else {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(v) => v,
            Err(_) => return,
        }
    };
    let (path, component) = ENDPOINTS[endpoint];
    let allowed = valid(&body, schema(path, component));
    match take(endpoint, &body) {
        Ok(()) => assert!(allowed, "{path} took a body openapi.json does not allow: {body}"),
        Err(status) => {
            assert!([400, 404, 409].contains(&status), "{path}: {status} for {body}");
            assert!(
                !(allowed && status == 400),
                "{path}: 400 for a body openapi.json allows: {body}"
            );
        }
    }
});
