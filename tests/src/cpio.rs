//! A minimal writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Entries are written with fixed inode numbers, uid/gid 0 and mtime 0 so the same
//! inputs always give the same bytes (the image cache is keyed by content).

use std::collections::BTreeSet;
use std::io::{self, Write};

/// Builds an archive in memory; parent directories are added automatically.
#[derive(Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, mode: u32, len: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
            0,
            len as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.header(&a, S_IFDIR | 0o755, 0, (0, 0));
            }
        }
    }

    fn norm(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    pub fn dir(&mut self, path: &str) {
        let p = Self::norm(path);
        self.parents(&p);
        if self.dirs.insert(p.clone()) {
            self.header(&p, S_IFDIR | 0o755, 0, (0, 0));
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let p = Self::norm(path);
        self.parents(&p);
        self.header(&p, S_IFREG | (mode & 0o7777), data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let p = Self::norm(path);
        self.parents(&p);
        self.header(&p, S_IFLNK | 0o777, target.len(), (0, 0));
        self.buf.extend_from_slice(target.as_bytes());
        self.pad();
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let p = Self::norm(path);
        self.parents(&p);
        self.header(&p, S_IFCHR | (mode & 0o7777), 0, (major, minor));
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while self.buf.len() & 511 != 0 {
            self.buf.push(0);
        }
        self.buf
    }

    pub fn write_to(self, mut w: impl Write) -> io::Result<()> {
        w.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = CpioWriter::new();
        c.file("/a/b", 0o644, b"hi");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // first entry is the implicit parent directory "a"
        assert_eq!(&out[110..112], b"a\0");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 512, 0);
    }
}
