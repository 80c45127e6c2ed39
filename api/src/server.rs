//! A small HTTP/1.1 server on a unix socket: one request per connection, each
//! connection on its own short-lived thread (at most [`MAX_CONNECTIONS`] at
//! once), so that a request the control loop answers late — an orderly device
//! removal waits for the guest — does not hold up the others.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::{ApiError, ApiMessage, ApiRequest, Endpoint, ErrorBody, RouteError, OPENAPI};

const MAX_HEADERS: usize = 32;
const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Wakes the control loop after a message was queued.
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

/// Bind `path` and serve requests on a thread until the process exits.
pub fn start(
    path: &Path,
    to_vmm: Sender<ApiMessage>,
    notify: Notifier,
) -> io::Result<JoinHandle<()>> {
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("api socket {}: {e}", path.display())))?;
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new().name("api".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                let (status, body) = error(503, "too many API connections at once".into());
                let _ = write_response(&mut stream, status, &body);
                continue;
            }
            let (to_vmm, notify, done) = (to_vmm.clone(), notify.clone(), active.clone());
            let served = thread::Builder::new()
                .name("api-conn".into())
                .spawn(move || {
                    let (status, body) = match read_request(&mut stream) {
                        Ok((method, path, body)) => {
                            dispatch(&method, &path, &body, &to_vmm, &notify)
                        }
                        Err(e) => error(400, format!("bad request: {e}")),
                    };
                    let _ = write_response(&mut stream, status, &body);
                    done.fetch_sub(1, Ordering::SeqCst);
                });
            if served.is_err() {
                active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    })
}

fn error(status: u16, message: String) -> (u16, String) {
    let body = serde_json::to_string(&ErrorBody { error: message }).unwrap_or_default();
    (status, body)
}

fn dispatch(
    method: &str,
    path: &str,
    body: &[u8],
    to_vmm: &Sender<ApiMessage>,
    notify: &Notifier,
) -> (u16, String) {
    if method == "GET" && path == "/api/v1/openapi.json" {
        return (200, OPENAPI.to_string());
    }
    let endpoint = match Endpoint::route(method, path) {
        Ok(e) => e,
        Err(RouteError::NotFound) => return error(404, format!("no such endpoint: {path}")),
        Err(RouteError::MethodNotAllowed) => {
            return error(405, format!("{method} is not allowed on {path}"))
        }
    };
    let body = if body.iter().all(|b| b.is_ascii_whitespace()) {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(400, format!("request body is not valid JSON: {e}")),
        }
    };
    let (reply, answer) = channel();
    let msg = ApiMessage {
        request: ApiRequest { endpoint, body },
        reply,
    };
    if to_vmm.send(msg).is_err() {
        return error(503, "the VMM is shutting down".into());
    }
    notify();
    match answer.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(serde_json::Value::Null)) => (204, String::new()),
        Ok(Ok(v)) => (200, v.to_string()),
        Ok(Err(ApiError { status, message })) => error(status, message),
        Err(_) => error(503, "the VMM did not answer".into()),
    }
}

/// Read one request: (method, path, body).
fn read_request(stream: &mut UnixStream) -> Result<(String, String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the request was complete".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(format!("request larger than {MAX_REQUEST} bytes"));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf).map_err(|e| e.to_string())? {
            httparse::Status::Partial => continue,
            httparse::Status::Complete(n) => n,
        };
        let mut content_length = 0usize;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or("bad Content-Length")?;
            }
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked bodies are not supported; send Content-Length".into());
            }
        }
        if head_len + content_length > MAX_REQUEST {
            return Err(format!("request larger than {MAX_REQUEST} bytes"));
        }
        let method = req.method.unwrap_or_default().to_string();
        let path = req.path.unwrap_or_default().to_string();
        while buf.len() < head_len + content_length {
            let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed in the middle of the body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_len..head_len + content_length].to_vec();
        return Ok((method, path, body));
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(stream: &mut UnixStream, status: u16, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::client::{request, Response};

    fn serve() -> (tempdir::Dir, std::sync::mpsc::Receiver<ApiMessage>) {
        let dir = tempdir::Dir::new();
        let (tx, rx) = channel();
        start(&dir.path.join("api.sock"), tx, Arc::new(|| {})).unwrap();
        (dir, rx)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let path = std::env::temp_dir()
                    .join(format!("tandem-api-test-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Self { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn request_reaches_the_vmm_and_replies() {
        let (dir, rx) = serve();
        thread::spawn(move || {
            while let Ok(m) = rx.recv() {
                let r = match m.request.endpoint {
                    Endpoint::Ping => Ok(serde_json::json!({"version": "x"})),
                    Endpoint::VmPause => Err(ApiError::conflict("already paused")),
                    _ => Ok(serde_json::Value::Null),
                };
                let _ = m.reply.send(r);
            }
        });
        let sock = dir.path.join("api.sock");
        let Response { status, body } = request(&sock, "GET", "/api/v1/vmm.ping", None).unwrap();
        assert_eq!((status, body.as_str()), (200, r#"{"version":"x"}"#));
        let r = request(&sock, "PUT", "/api/v1/vm.pause", None).unwrap();
        assert_eq!(r.status, 409);
        assert!(r.body.contains("already paused"));
        let r = request(&sock, "PUT", "/api/v1/vm.resume", None).unwrap();
        assert_eq!(r.status, 204);
    }

    #[test]
    fn bad_input_gets_4xx_with_json() {
        let (dir, _rx) = serve();
        let sock = dir.path.join("api.sock");
        let r = request(&sock, "GET", "/api/v1/nothing", None).unwrap();
        assert_eq!(r.status, 404);
        let e: ErrorBody = serde_json::from_str(&r.body).unwrap();
        assert!(e.error.contains("no such endpoint"));
        assert_eq!(
            request(&sock, "GET", "/api/v1/vm.pause", None)
                .unwrap()
                .status,
            405
        );
        let r = request(&sock, "PUT", "/api/v1/vm.pause", Some("{not json")).unwrap();
        assert_eq!(r.status, 400);
        assert!(r.body.contains("not valid JSON"));
        // Garbage that is not HTTP at all.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let r = request(&sock, "GET", "/api/v1/openapi.json", None).unwrap();
        assert_eq!(r.status, 200);
    }
}
