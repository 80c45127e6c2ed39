//! The API server on any bytes a client sends on one connection: hyper's HTTP/1.1
//! parser, then Tandem's routing, early answers (404, 405, the OpenAPI document), body
//! limits and JSON reading, and the hand-off to the control loop, which here answers
//! every request it takes with 204. An event stream is ended once the client has waited
//! a moment.
//!
//! Beyond "no panic, no hang": what the server writes is nothing (the client closed
//! before a whole request head) or an HTTP/1.x response, each a status line and headers;
//! no status is 5xx (one client, a control loop that answers at once: nothing here may
//! be an internal error, a timeout or "busy").
#![no_main]

fn answer(_: &api::ApiRequest) -> api::ApiResponse {
    Ok(serde_json::Value::Null)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let out = api::server::fuzz::connection(data, answer);
    if out.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 ") || text.starts_with("HTTP/1.0 "),
        "not a response: {text:?}"
    );
    let status: u16 = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text:?}"));
    assert!(
        !(500..600).contains(&status),
        "{status} for {:?}: {text:?}",
        String::from_utf8_lossy(data)
    );
    assert!(text.contains("\r\n\r\n"), "no end of headers: {text:?}");
});
