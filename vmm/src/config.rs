//! The VM configuration: parsed from the command line, validated once, shown
//! by `vm.info`. Option syntax follows Cloud Hypervisor (`--memory size=1G`).

use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

pub const MIN_MEMORY: u64 = 64 << 20;
pub const MAX_VCPUS: u8 = 254;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{opt}: unknown key '{key}' (expected {expected})")]
    UnknownKey {
        opt: &'static str,
        key: String,
        expected: &'static str,
    },
    #[error("--{opt}: '{item}' is not key=value")]
    NotKeyValue { opt: &'static str, item: String },
    #[error("--{opt}: '{value}' is not {what}")]
    BadValue {
        opt: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("--cpus boot={0}: a VM needs 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    #[error("--memory size={0}: at least 64M is needed to boot Linux")]
    MemoryTooSmall(String),
    #[error("--memory size={size}: more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { size: String, host_mib: u64 },
    #[error("--kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("--initramfs {path}: {reason}")]
    Initramfs { path: String, reason: String },
    #[error("--serial: '{0}' is not tty, off, file=PATH or socket=PATH")]
    Serial(String),
    #[error("--cmdline: {0}")]
    Cmdline(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "path")]
pub enum SerialConfig {
    Tty,
    Off,
    File(PathBuf),
    Socket(PathBuf),
}

#[derive(Debug, Clone, Serialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
}

/// Split `a=1,b=2` into pairs, refusing keys outside `allowed`.
fn pairs<'a>(
    opt: &'static str,
    s: &'a str,
    allowed: &[&str],
    expected: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue {
                    opt,
                    item: item.to_string(),
                })?;
            if !allowed.contains(&k) {
                return Err(ConfigError::UnknownKey {
                    opt,
                    key: k.to_string(),
                    expected,
                });
            }
            Ok((k, v))
        })
        .collect()
}

/// `512M`, `2G`, `1048576`, `64K`, `1T`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    let mut boot = 1u64;
    for (_, v) in pairs("cpus", s, &["boot"], "boot=N")? {
        boot = v.parse().map_err(|_| ConfigError::BadValue {
            opt: "cpus",
            value: v.into(),
            what: "a number",
        })?;
    }
    if boot == 0 || boot > u64::from(MAX_VCPUS) {
        return Err(ConfigError::VcpuCount(boot));
    }
    Ok(boot as u8)
}

pub fn parse_memory(s: &str, host_bytes: u64) -> Result<u64, ConfigError> {
    let mut size = 512u64 << 20;
    let mut text = "512M".to_string();
    for (_, v) in pairs("memory", s, &["size"], "size=SIZE")? {
        size = parse_size(v).ok_or_else(|| ConfigError::BadValue {
            opt: "memory",
            value: v.into(),
            what: "a size such as 512M or 2G",
        })?;
        text = v.to_string();
    }
    if size < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(text));
    }
    if size > host_bytes {
        return Err(ConfigError::MemoryTooLarge {
            size: text,
            host_mib: host_bytes >> 20,
        });
    }
    // KVM maps whole pages.
    Ok(size & !0xfff)
}

pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "tty" => Ok(SerialConfig::Tty),
        "off" => Ok(SerialConfig::Off),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
            Some(("socket", p)) if !p.is_empty() => Ok(SerialConfig::Socket(p.into())),
            _ => Err(ConfigError::Serial(s.into())),
        },
    }
}

/// `path=/run/a.sock` or just `/run/a.sock`.
pub fn parse_api_socket(s: &str) -> Result<PathBuf, ConfigError> {
    if !s.contains('=') {
        return Ok(s.into());
    }
    let mut path = None;
    for (_, v) in pairs("api-socket", s, &["path"], "path=PATH")? {
        path = Some(PathBuf::from(v));
    }
    path.ok_or_else(|| ConfigError::BadValue {
        opt: "api-socket",
        value: s.into(),
        what: "path=PATH",
    })
}

/// The kernel must be a readable bzImage ("HdrS" at 0x202) or ELF64 file.
pub fn check_kernel(path: &std::path::Path) -> Result<(), ConfigError> {
    use std::io::Read;
    let err = |reason: String| ConfigError::Kernel {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut head = vec![0u8; 0x210];
    let n = f.read(&mut head).map_err(|e| err(e.to_string()))?;
    head.truncate(n);
    let is_elf = head.starts_with(b"\x7fELF") && head.get(4) == Some(&2);
    let is_bzimage = head.get(0x202..0x206) == Some(b"HdrS");
    if is_elf || is_bzimage {
        Ok(())
    } else {
        Err(err(
            "not a Linux kernel (neither a bzImage nor a 64-bit ELF)".into(),
        ))
    }
}

pub fn check_initramfs(path: &std::path::Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Initramfs {
        path: path.display().to_string(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if len == 0 {
        return Err(err("the file is empty".into()));
    }
    Ok(())
}

/// Physical RAM of this host.
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn memory_limits() {
        let host = 8u64 << 30;
        assert_eq!(parse_memory("size=1G", host), Ok(1 << 30));
        assert_eq!(parse_memory("", host), Ok(512 << 20));
        assert!(matches!(
            parse_memory("size=1M", host),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            parse_memory("size=1T", host),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert!(matches!(
            parse_memory("size=lots", host),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_memory("big=1G", host),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_memory("1G", host),
            Err(ConfigError::NotKeyValue { .. })
        ));
    }

    #[test]
    fn cpus_serial_api() {
        assert_eq!(parse_cpus("boot=2"), Ok(2));
        assert_eq!(parse_cpus("boot=0"), Err(ConfigError::VcpuCount(0)));
        assert_eq!(parse_cpus("boot=255"), Err(ConfigError::VcpuCount(255)));
        assert!(parse_cpus("boot=two").is_err());
        assert_eq!(
            parse_serial("socket=/x"),
            Ok(SerialConfig::Socket("/x".into()))
        );
        assert_eq!(parse_serial("off"), Ok(SerialConfig::Off));
        assert!(parse_serial("pty").is_err());
        assert!(parse_serial("file=").is_err());
        assert_eq!(parse_api_socket("path=/a").unwrap(), PathBuf::from("/a"));
        assert_eq!(parse_api_socket("/b").unwrap(), PathBuf::from("/b"));
    }

    #[test]
    fn kernel_check() {
        let dir = std::env::temp_dir().join(format!("tandem-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(check_kernel(&p), Err(ConfigError::Kernel { .. })));
        assert!(check_kernel(&dir.join("missing")).is_err());
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        std::fs::write(&p, &elf).unwrap();
        assert!(check_kernel(&p).is_ok());
        std::fs::write(&p, b"").unwrap();
        assert!(check_initramfs(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
