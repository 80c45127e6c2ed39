//! The client side behind `tandem remote`: one request over the unix socket, or the
//! event stream line by line. Understands `Content-Length`, chunked and close-delimited
//! response bodies.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Response {
    pub status: u16,
    pub body: String,
}

/// How long `request` waits for the answer (an orderly removal may wait 60 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(130);

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Sends the request; returns the reader positioned at the body, the status, and how
/// the body is framed.
fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    read_timeout: Option<Duration>,
) -> io::Result<(BufReader<UnixStream>, u16, Framing)> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", socket.display()),
        )
    })?;
    s.set_read_timeout(read_timeout)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("malformed HTTP status line"))?;
    let mut framing = Framing::UntilClose;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the connection closed in the response headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(value.parse().map_err(|_| bad("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = Framing::Chunked;
        }
    }
    Ok((r, status, framing))
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads the body as it arrives, handing each piece to `sink`; stops early when `sink`
/// returns false.
fn read_body(
    r: &mut BufReader<UnixStream>,
    framing: Framing,
    mut sink: impl FnMut(&[u8]) -> bool,
) -> io::Result<()> {
    match framing {
        Framing::Length(n) => {
            let mut buf = vec![0; n];
            r.read_exact(&mut buf)?;
            sink(&buf);
        }
        Framing::UntilClose => {
            let mut buf = [0u8; 4096];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 || !sink(&buf[..n]) {
                    break;
                }
            }
        }
        Framing::Chunked => {
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(bad("the connection closed inside a chunked body"));
                }
                let size = line.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    break;
                }
                let mut chunk = vec![0; size];
                r.read_exact(&mut chunk)?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
                if !sink(&chunk) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Send `method path` with an optional JSON body; wait for the answer.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<Response> {
    let (mut r, status, framing) = send(socket, method, path, body, Some(ANSWER_TIMEOUT))?;
    let mut raw = Vec::new();
    read_body(&mut r, framing, |b| {
        raw.extend_from_slice(b);
        true
    })?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

/// `GET path` and hand each line of a streamed answer to `on_line` as it arrives, until
/// the server ends it or `on_line` returns false. An error status comes back as the
/// `Err` of the result, with the body.
pub fn stream_lines(
    socket: &Path,
    path: &str,
    on_line: impl FnMut(&str) -> bool,
) -> io::Result<Result<(), Response>> {
    stream_lines_from(socket, path, || true, on_line)
}

/// [`stream_lines`], calling `on_open` once the server has answered (a subscriber of
/// the event stream is registered by then: what happens after it is on the stream).
/// `on_open` returning false ends the stream at once.
pub fn stream_lines_from(
    socket: &Path,
    path: &str,
    on_open: impl FnOnce() -> bool,
    mut on_line: impl FnMut(&str) -> bool,
) -> io::Result<Result<(), Response>> {
    let (mut r, status, framing) = send(socket, "GET", path, None, None)?;
    if !(200..300).contains(&status) {
        let mut raw = Vec::new();
        read_body(&mut r, framing, |b| {
            raw.extend_from_slice(b);
            true
        })?;
        return Ok(Err(Response {
            status,
            body: String::from_utf8_lossy(&raw).into_owned(),
        }));
    }
    if !on_open() {
        return Ok(Ok(()));
    }
    let mut pending = Vec::new();
    read_body(&mut r, framing, |b| {
        pending.extend_from_slice(b);
        while let Some(i) = pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if !on_line(String::from_utf8_lossy(&line[..i]).trim_end()) {
                return false;
            }
        }
        true
    })?;
    Ok(Ok(()))
}
