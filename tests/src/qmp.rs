//! A small QMP client for the reference QEMU: commands, and the events that
//! arrive in between (kept with the time they were read).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{err, Result};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read so far: (when, name, data).
    pub events: Vec<(Instant, String, serde_json::Value)>,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves capabilities negotiation.
    pub fn connect(path: &Path, limit: Duration) -> Result<Self> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(err!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| err!("{e}"))?;
        let writer = stream.try_clone().map_err(|e| err!("{e}"))?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        q.read_until(|v| v.get("QMP").is_some(), limit)?;
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read_line(&mut self) -> Result<Option<serde_json::Value>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(err!("QMP: QEMU closed the connection")),
            Ok(_) => {
                let v: serde_json::Value =
                    serde_json::from_str(line.trim()).map_err(|e| err!("QMP: {e}: {line}"))?;
                if let Some(name) = v.get("event").and_then(|e| e.as_str()) {
                    self.events
                        .push((Instant::now(), name.to_string(), v["data"].clone()));
                }
                Ok(Some(v))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(err!("QMP: {e}")),
        }
    }

    fn read_until(
        &mut self,
        pred: impl Fn(&serde_json::Value) -> bool,
        limit: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.read_line()? {
                if pred(&v) {
                    return Ok(v);
                }
            }
            if Instant::now() > deadline {
                return Err(err!("QMP: no answer within {limit:?}"));
            }
        }
    }

    /// Runs `cmd`; its `return`, or an error with QEMU's.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let req = serde_json::json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{req}").map_err(|e| err!("QMP: {e}"))?;
        let v = self.read_until(
            |v| v.get("return").is_some() || v.get("error").is_some(),
            Duration::from_secs(30),
        )?;
        match v.get("error") {
            Some(e) => Err(err!("QMP {cmd}: {e}")),
            None => Ok(v["return"].clone()),
        }
    }

    /// Waits for event `name` whose data satisfies `pred` (one already read counts);
    /// when it was read.
    pub fn wait_event(
        &mut self,
        name: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
        limit: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((t, _, _)) = self.events.iter().find(|(_, n, d)| n == name && pred(d)) {
                return Ok(*t);
            }
            self.read_line()?;
            if Instant::now() > deadline {
                return Err(err!("QMP: no {name} event within {limit:?}"));
            }
        }
    }

    /// Forgets the events read so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}
