//! The option parsers of `tandem run` (`--net`, `--device`, a destination's `--net`,
//! `--memory`, `--cpus`, `--serial`, `--api-socket`) and the checks across them, on any
//! text. Beyond "no panic": a destination that repeats the source's `--net` word for
//! word, or gives only its id and tap, must be taken, and must end up with the source's
//! NIC (its own tap aside).
//!
//! The parsers live in the `tandem` binary, which has no library target: the module is
//! compiled in here from its source file. It depends on std, serde, thiserror and
//! `devices` only.
#![no_main]
#![allow(dead_code)]

#[path = "../../vmm/src/config.rs"]
mod config;

fn json(n: &config::NetSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(n).expect("a NetSpec serializes");
    v["tap"] = serde_json::Value::Null;
    v
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (mut nets, mut devs) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let Some((what, arg)) = line.split_once(':') else {
            continue;
        };
        match what {
            "net" => {
                let Ok(n) = config::parse_net(arg, i) else {
                    continue;
                };
                if let Ok(inc) = config::parse_incoming_net(arg, i) {
                    let same = config::merge_incoming_net(&n, &inc)
                        .unwrap_or_else(|e| panic!("`{arg}` on both sides refused: {e}"));
                    assert_eq!(json(&same), json(&n), "`{arg}` on both sides");
                }
                let inc = config::parse_incoming_net(&format!("id={},tap=t0", n.net.id), i)
                    .unwrap_or_else(|e| panic!("id={},tap=t0 refused: {e}", n.net.id));
                let here = config::merge_incoming_net(&n, &inc)
                    .unwrap_or_else(|e| panic!("`{arg}` then id and tap: {e}"));
                assert_eq!(json(&here), json(&n), "`{arg}` then id and tap");
                assert_eq!(here.net.tap, "t0");
                nets.push(n);
            }
            "device" => {
                if let Ok(d) = config::parse_device(arg, i) {
                    devs.push(d);
                }
            }
            "incoming" => {
                if let Ok(inc) = config::parse_incoming_net(arg, i) {
                    for n in &nets {
                        let _ = config::merge_incoming_net(n, &inc);
                    }
                }
            }
            "memory" => {
                let _ = config::parse_memory(arg, 4 << 30);
                let _ = config::parse_size(arg);
            }
            "cpus" => {
                let _ = config::parse_cpus(arg);
            }
            "serial" => {
                let _ = config::parse_serial(arg);
            }
            "api" => {
                let _ = config::parse_api_socket(arg);
            }
            _ => {}
        }
    }
    let _ = config::check_nets(&nets);
    let _ = config::check_devices(&nets, &devs);
    for d in &devs {
        let _ = config::check_primary_mac(d, &nets);
    }
});
