//! The VM configuration: parsed from the command line, validated once, shown
//! by `vm.info`. Option syntax follows Cloud Hypervisor (`--memory size=1G`).

use std::path::PathBuf;

use devices::virtio::net::{format_mac, parse_mac, NetConfig};
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
    #[error("--incoming {0}")]
    Incoming(String),
    #[error("--kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("--initramfs {path}: {reason}")]
    Initramfs { path: String, reason: String },
    #[error("--serial: '{0}' is not tty, off, file=PATH or socket=PATH")]
    Serial(String),
    #[error("--cmdline: {0}")]
    Cmdline(String),
    #[error("--net {0}")]
    Net(String),
    #[error("--device {0}")]
    Device(String),
    /// A request that is well formed but names something that does not exist, or
    /// clashes with what the VM or the host has: the API answers 404 or 409 (see
    /// [`ConfigError::http_status`]), not 400.
    #[error("--{opt} {msg}")]
    Refused {
        opt: &'static str,
        msg: String,
        fault: Fault,
    },
}

/// Why a well-formed `--net` or `--device` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It names something that does not exist (a PCI function, a NIC).
    Missing,
    /// It clashes with what is there: an id, slot, tap or MAC in use, a function bound
    /// to another driver.
    Conflict,
}

impl ConfigError {
    fn missing(opt: &'static str, msg: String) -> Self {
        Self::Refused {
            opt,
            msg,
            fault: Fault::Missing,
        }
    }

    fn conflict(opt: &'static str, msg: String) -> Self {
        Self::Refused {
            opt,
            msg,
            fault: Fault::Conflict,
        }
    }

    /// The status the API answers with: 404 for something named that does not exist,
    /// 409 for a clash with what is there, 400 for a request that is wrong in itself.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Refused {
                fault: Fault::Missing,
                ..
            } => 404,
            Self::Refused {
                fault: Fault::Conflict,
                ..
            } => 409,
            _ => 400,
        }
    }
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
    pub nets: Vec<NetSpec>,
    pub devices: Vec<DeviceSpec>,
    /// `--incoming URL`: the VM comes from a migration source, not from a kernel.
    pub incoming: Option<IncomingSpec>,
    /// What `kernel` and `initramfs` held when Tandem started (or what the migration
    /// source sent); None only on a destination still waiting for its source.
    #[serde(skip)]
    pub boot: Option<std::sync::Arc<BootFiles>>,
}

/// A migration destination's own settings: where it listens, each NIC's tap, and the
/// passthrough devices this host adds once the guest runs here (a failover primary
/// with the standby's MAC, plugged when the migrated standby reports STANDBY acked).
#[derive(Debug, Clone, Serialize)]
pub struct IncomingSpec {
    pub url: String,
    pub nets: Vec<IncomingNet>,
    pub devices: Vec<DeviceSpec>,
}

/// `--net` on a destination: `id` and `tap` at least; any other key must agree
/// with the source.
#[derive(Debug, Clone, Serialize)]
pub struct IncomingNet {
    pub id: String,
    pub given: Vec<(String, String)>,
}

pub fn parse_incoming_net(s: &str, index: usize) -> Result<IncomingNet, ConfigError> {
    let given: Vec<(String, String)> = pairs(
        "net",
        s,
        NET_KEYS,
        "id, tap, mac, standby, num_queues, queue_size, mtu, slot, announce",
    )?
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let get = |k: &str| given.iter().find(|(g, _)| g == k).map(|(_, v)| v.clone());
    if get("tap").is_none() {
        return Err(ConfigError::Net(format!(
            "{s}: a migration destination needs tap= for each NIC"
        )));
    }
    Ok(IncomingNet {
        id: get("id").unwrap_or_else(|| format!("net{index}")),
        given,
    })
}

/// The source's NIC with this side's tap; a key given here that disagrees with the
/// source is an error.
pub fn merge_incoming_net(src: &NetSpec, dest: &IncomingNet) -> Result<NetSpec, String> {
    let on = |b: bool| if b { "on" } else { "off" };
    let n = &src.net;
    let mut kv: Vec<(String, String)> = vec![
        ("id".into(), n.id.clone()),
        ("tap".into(), n.tap.clone()),
        ("mac".into(), devices::virtio::net::format_mac(&n.mac)),
        ("standby".into(), on(n.standby).into()),
        ("num_queues".into(), n.num_queues.to_string()),
        ("queue_size".into(), n.queue_size.to_string()),
        ("announce".into(), on(n.announce).into()),
    ];
    if let Some(m) = n.mtu {
        kv.push(("mtu".into(), m.to_string()));
    }
    if let Some(sl) = src.slot {
        kv.push(("slot".into(), sl.to_string()));
    }
    let join = |kv: &[(String, String)]| {
        kv.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let source = parse_net(&join(&kv), 0).map_err(|e| format!("the source's NIC {}: {e}", n.id))?;
    let mut mine = kv.clone();
    for (k, v) in &dest.given {
        mine.retain(|(m, _)| m != k);
        mine.push((k.clone(), v.clone()));
    }
    let here = parse_net(&join(&mine), 0).map_err(|e| e.to_string())?;
    let (a, b) = (&source.net, &here.net);
    let differs = [
        ("mac", a.mac != b.mac),
        ("standby", a.standby != b.standby),
        ("num_queues", a.num_queues != b.num_queues),
        ("queue_size", a.queue_size != b.queue_size),
        ("mtu", a.mtu != b.mtu),
        ("slot", source.slot != here.slot),
    ];
    if let Some((k, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(format!(
            "--net {}: {k} differs from the source's (the source has {})",
            n.id,
            join(&kv)
        ));
    }
    Ok(here)
}

/// One `--device`: a host PCI function passed through with VFIO.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: String,
    /// `/sys/bus/pci/devices/BDF`.
    pub path: PathBuf,
    /// The standby NIC this device is the failover primary of: hidden from the
    /// guest until its driver acks STANDBY on that NIC.
    pub failover: Option<String>,
    pub slot: Option<usize>,
}

/// One `--net`: the device and where it goes.
#[derive(Debug, Clone, Serialize)]
pub struct NetSpec {
    #[serde(flatten)]
    pub net: NetConfig,
    pub slot: Option<usize>,
}

const NET_KEYS: &[&str] = &[
    "id",
    "tap",
    "mac",
    "standby",
    "num_queues",
    "queue_size",
    "mtu",
    "slot",
    "announce",
];

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// `id=ID,tap=NAME,mac=MAC[,standby=on][,num_queues=N][,queue_size=N][,mtu=N][,slot=S]`
pub fn parse_net(s: &str, index: usize) -> Result<NetSpec, ConfigError> {
    let bad = |what: String| ConfigError::Net(what);
    let mut id = format!("net{index}");
    let (mut tap, mut mac, mut standby, mut slot, mut mtu) = (None, None, false, None, None);
    let mut announce = true;
    let (mut num_queues, mut queue_size) = (2u16, devices::virtio::net::DEFAULT_QUEUE_SIZE);
    for (k, v) in pairs(
        "net",
        s,
        NET_KEYS,
        "id, tap, mac, standby, num_queues, queue_size, mtu, slot, announce",
    )? {
        let num = |what: &'static str| -> Result<u16, ConfigError> {
            v.parse().map_err(|_| ConfigError::BadValue {
                opt: "net",
                value: format!("{k}={v}"),
                what,
            })
        };
        match k {
            "id" => id = parse_id(&bad, v)?,
            "tap" => tap = Some(parse_tap(&bad, v)?),
            "mac" => {
                let m = parse_mac(v).ok_or_else(|| {
                    bad(format!("mac={v}: not a MAC address like 52:54:00:12:34:56"))
                })?;
                if m[0] & 1 != 0 || m == [0; 6] {
                    return Err(bad(format!(
                        "mac={v}: a NIC needs a unicast, non-zero address"
                    )));
                }
                mac = Some(m);
            }
            "standby" => {
                standby =
                    on_off(v).ok_or_else(|| bad(format!("standby={v}: expected on or off")))?
            }
            "announce" => {
                announce =
                    on_off(v).ok_or_else(|| bad(format!("announce={v}: expected on or off")))?
            }
            "num_queues" => num_queues = num("a number")?,
            "queue_size" => queue_size = num("a number")?,
            "mtu" => mtu = Some(num("a number")?),
            "slot" => {
                let n = num("a slot number")?;
                if !(1..devices::pci::PCI_SLOTS as u16).contains(&n) {
                    return Err(bad(format!(
                        "slot={n}: slots are 1 to {}",
                        devices::pci::PCI_SLOTS - 1
                    )));
                }
                slot = Some(usize::from(n));
            }
            _ => {}
        }
    }
    let tap = tap.ok_or_else(|| bad(format!("{id}: tap=NAME is required")))?;
    let mac = mac.unwrap_or_else(|| generated_mac(&id));
    let net = NetConfig {
        id,
        tap,
        mac,
        standby,
        num_queues,
        queue_size,
        mtu,
        announce,
    };
    net.validate()
        .map_err(|e| bad(format!("{}: {e}", net.id)))?;
    Ok(NetSpec { net, slot })
}

/// A tap's name: what Linux allows (at most 15 bytes), narrowed to the characters
/// `openapi.json` states, so that the API and the command line take the same names.
fn parse_tap(opt_err: &dyn Fn(String) -> ConfigError, v: &str) -> Result<String, ConfigError> {
    if (1..=15).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v != "."
        && v != ".."
    {
        Ok(v.into())
    } else {
        Err(opt_err(format!(
            "tap={v}: a tap name is 1 to 15 letters, digits, '.', '-' and '_'"
        )))
    }
}

fn parse_id(opt_err: &dyn Fn(String) -> ConfigError, v: &str) -> Result<String, ConfigError> {
    if !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(v.into())
    } else {
        Err(opt_err(format!(
            "id={v}: use 1 to 64 letters, digits, '-' and '_'"
        )))
    }
}

fn parse_slot(opt_err: &dyn Fn(String) -> ConfigError, v: &str) -> Result<usize, ConfigError> {
    match v.parse::<usize>() {
        Ok(n) if (1..devices::pci::PCI_SLOTS).contains(&n) => Ok(n),
        _ => Err(opt_err(format!(
            "slot={v}: slots are 1 to {}",
            devices::pci::PCI_SLOTS - 1
        ))),
    }
}

/// `id=ID,path=/sys/bus/pci/devices/BDF[,failover=STANDBY_ID][,slot=N]`; `path=` also
/// takes a bare address (`0000:00:05.0`).
pub fn parse_device(s: &str, index: usize) -> Result<DeviceSpec, ConfigError> {
    let bad = |what: String| ConfigError::Device(what);
    let mut d = DeviceSpec {
        id: format!("dev{index}"),
        path: PathBuf::new(),
        failover: None,
        slot: None,
    };
    for (k, v) in pairs(
        "device",
        s,
        &["id", "path", "failover", "slot"],
        "id, path, failover, slot",
    )? {
        match k {
            "id" => d.id = parse_id(&bad, v)?,
            "path" if v.is_empty() => return Err(bad("path=: empty".into())),
            "path" if !v.contains('/') => d.path = PathBuf::from("/sys/bus/pci/devices").join(v),
            "path" => d.path = v.into(),
            "failover" => d.failover = Some(parse_id(&bad, v)?),
            "slot" => d.slot = Some(parse_slot(&bad, v)?),
            _ => {}
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err(bad(format!(
            "{}: path=/sys/bus/pci/devices/BDF is required",
            d.id
        )));
    }
    Ok(d)
}

/// The host side of `--device`: the function exists, is bound to vfio-pci, and
/// nothing else in its IOMMU group is held by a host driver.
pub fn check_vfio_host(d: &DeviceSpec) -> Result<(), ConfigError> {
    let msg = |what: String| format!("{}: {}: {what}", d.id, d.path.display());
    if !d.path.join("config").exists() {
        return Err(ConfigError::missing(
            "device",
            msg("no such PCI device (see /sys/bus/pci/devices)".into()),
        ));
    }
    // The function exists; what is wrong from here on is the host's state.
    let bad = |what: String| ConfigError::conflict("device", msg(what));
    let driver = |p: &std::path::Path| {
        std::fs::read_link(p.join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|f| f.to_string_lossy().into_owned()))
    };
    let bdf = d
        .path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| d.path.display().to_string());
    match driver(&d.path) {
        Some(drv) if drv == "vfio-pci" => {}
        Some(drv) => {
            return Err(bad(format!(
                "bound to {drv}, not vfio-pci (echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
                 echo {bdf} > /sys/bus/pci/drivers/{drv}/unbind; echo {bdf} > /sys/bus/pci/drivers_probe)"
            )))
        }
        None => {
            return Err(bad(format!(
                "not bound to any driver; bind it to vfio-pci (echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe)"
            )))
        }
    }
    let group = std::fs::read_link(d.path.join("iommu_group")).map_err(|_| {
        bad("has no IOMMU group (is the IOMMU on? intel_iommu=on / amd_iommu=on)".into())
    })?;
    let group_id = group
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let members = std::fs::read_dir(d.path.join("iommu_group/devices"))
        .map_err(|e| bad(format!("cannot list its IOMMU group {group_id}: {e}")))?;
    for m in members.flatten() {
        let p = m.path();
        if let Some(drv) = driver(&p) {
            if !matches!(drv.as_str(), "vfio-pci" | "pci-stub" | "pcieport") {
                return Err(bad(format!(
                    "IOMMU group {group_id} also holds {}, bound to the host driver {drv}; every device of the group must be bound to vfio-pci",
                    m.file_name().to_string_lossy()
                )));
            }
        }
    }
    if !std::path::Path::new("/dev/vfio").join(&group_id).exists() {
        return Err(bad(format!("/dev/vfio/{group_id} does not exist")));
    }
    Ok(())
}

/// A failover primary's MAC against its standby's: the guest pairs the two only if the
/// primary's permanent MAC is the standby's. For an SR-IOV VF the host knows that MAC
/// (its PF's VF table, [`devices::sriov`]): a different one, or none set (the VF's
/// driver then makes one up), is refused with the command that sets it. Otherwise the
/// answer is a note for the log saying what the host could not check. Nothing to say
/// for a device that is no primary.
pub fn check_primary_mac(d: &DeviceSpec, nets: &[NetSpec]) -> Result<Option<String>, ConfigError> {
    let Some(standby) = d.failover.as_ref() else {
        return Ok(None);
    };
    let Some(want) = nets
        .iter()
        .find(|n| &n.net.id == standby)
        .map(|n| n.net.mac)
    else {
        return Ok(None);
    };
    let msg = |what: String| format!("{}: {}: {what}", d.id, d.path.display());
    let note = |what: &str| {
        Ok(Some(msg(format!(
            "{what}; the guest pairs it with {standby} only if its permanent MAC is {}",
            format_mac(&want)
        ))))
    };
    match devices::sriov::vf_mac(&d.path) {
        Ok(devices::sriov::VfMac::NotAVf) => {
            note("not an SR-IOV VF, so the host cannot tell its MAC")
        }
        Ok(devices::sriov::VfMac::Known { mac, .. }) if mac == want => Ok(Some(msg(format!(
            "an SR-IOV VF whose MAC in its PF's table is {}, its standby {standby}'s",
            format_mac(&mac)
        )))),
        Ok(devices::sriov::VfMac::Known { pf, vf, mac }) => {
            let has = if mac == [0; 6] {
                "has no MAC in its PF's table (its driver would make one up)".to_string()
            } else {
                format!("has MAC {} in its PF's table", format_mac(&mac))
            };
            Err(ConfigError::conflict(
                "device",
                msg(format!(
                    "VF {vf} of {pf} {has}, but its standby {standby} has {w}: the guest would not pair them (ip link set {pf} vf {vf} mac {w})",
                    w = format_mac(&want)
                )),
            ))
        }
        Err(e) => note(&format!("an SR-IOV VF whose MAC cannot be read ({e})")),
    }
}

/// Checks across NICs and passthrough devices: ids unique, slots distinct, each
/// `failover=` names a standby NIC that has no other primary.
pub fn check_devices(nets: &[NetSpec], devs: &[DeviceSpec]) -> Result<(), ConfigError> {
    let bad = |m: String| ConfigError::conflict("device", m);
    for (i, d) in devs.iter().enumerate() {
        if nets.iter().any(|n| n.net.id == d.id) || devs[..i].iter().any(|o| o.id == d.id) {
            return Err(bad(format!("{}: duplicate id", d.id)));
        }
        let same_path = |o: &DeviceSpec| {
            o.path == d.path
                || matches!((o.path.canonicalize(), d.path.canonicalize()), (Ok(a), Ok(b)) if a == b)
        };
        if let Some(o) = devs[..i].iter().find(|o| same_path(o)) {
            return Err(bad(format!(
                "{}: {} is already passed through as {}",
                d.id,
                d.path.display(),
                o.id
            )));
        }
        if let Some(slot) = d.slot {
            if let Some(n) = nets.iter().find(|n| n.slot == Some(slot)) {
                return Err(bad(format!(
                    "{}: slot {slot} is already used by {}",
                    d.id, n.net.id
                )));
            }
            if let Some(o) = devs[..i].iter().find(|o| o.slot == Some(slot)) {
                return Err(bad(format!(
                    "{}: slot {slot} is already used by {}",
                    d.id, o.id
                )));
            }
        }
        if let Some(f) = &d.failover {
            let Some(n) = nets.iter().find(|n| &n.net.id == f) else {
                return Err(ConfigError::missing(
                    "device",
                    format!("{}: failover={f}: no NIC with that id", d.id),
                ));
            };
            if !n.net.standby {
                return Err(bad(format!(
                    "{}: failover={f}: {f} is not a standby NIC (give it standby=on)",
                    d.id
                )));
            }
            if let Some(o) = devs[..i].iter().find(|o| o.failover.as_deref() == Some(f)) {
                return Err(bad(format!(
                    "{}: failover={f}: {f} already has the primary {}",
                    d.id, o.id
                )));
            }
        }
    }
    Ok(())
}

/// A stable locally administered address derived from the id.
fn generated_mac(id: &str) -> [u8; 6] {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Checks across all NICs: ids, taps, MACs and slots are unique.
pub fn check_nets(nets: &[NetSpec]) -> Result<(), ConfigError> {
    for (i, a) in nets.iter().enumerate() {
        for b in &nets[..i] {
            let (x, y) = (&a.net, &b.net);
            if x.id == y.id {
                return Err(ConfigError::conflict(
                    "net",
                    format!("{}: duplicate id", x.id),
                ));
            }
            if x.tap == y.tap {
                return Err(ConfigError::conflict(
                    "net",
                    format!("{}: tap {} is already used by {}", x.id, x.tap, y.id),
                ));
            }
            if x.mac == y.mac {
                return Err(ConfigError::conflict(
                    "net",
                    format!(
                        "{}: MAC {} is already used by {} (only a failover pair may share a MAC)",
                        x.id,
                        format_mac(&x.mac),
                        y.id
                    ),
                ));
            }
            if a.slot.is_some() && a.slot == b.slot {
                return Err(ConfigError::conflict(
                    "net",
                    format!(
                        "{}: slot {} is already used by {}",
                        x.id,
                        a.slot.unwrap_or(0),
                        y.id
                    ),
                ));
            }
        }
    }
    Ok(())
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

/// The kernel and initramfs a VM boots from, opened once: every reboot and every
/// migration uses these same bytes, whatever happens to the files on disk later. A
/// migrated VM's come with it (the destination keeps them in memory files), so it
/// can reboot where it landed.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: std::fs::File,
    pub initramfs: Option<std::fs::File>,
}

impl BootFiles {
    pub fn open(
        kernel: &std::path::Path,
        initramfs: Option<&std::path::Path>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            kernel: open_kernel(kernel)?,
            initramfs: initramfs.map(open_initramfs).transpose()?,
        })
    }
}

/// The kernel must be a readable bzImage ("HdrS" at 0x202) or ELF64 file.
pub fn open_kernel(path: &std::path::Path) -> Result<std::fs::File, ConfigError> {
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
        Ok(f)
    } else {
        Err(err(
            "not a Linux kernel (neither a bzImage nor a 64-bit ELF)".into(),
        ))
    }
}

pub fn open_initramfs(path: &std::path::Path) -> Result<std::fs::File, ConfigError> {
    let err = |reason: String| ConfigError::Initramfs {
        path: path.display().to_string(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if len == 0 {
        return Err(err("the file is empty".into()));
    }
    Ok(f)
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

    /// What the api_bodies fuzz target found the parser taking that openapi.json
    /// does not allow.
    #[test]
    fn net_keys_as_openapi_json_states_them() {
        let ok = |s: &str| parse_net(s, 0).is_ok();
        assert!(ok("tap=tap.0-_x,mac=26:54:00:00:00:01"));
        assert!(!ok("tap=aaaaaaaaaaaaaaaa"), "16 bytes");
        assert!(ok("tap=aaaaaaaaaaaaaaa"), "15 bytes");
        assert!(!ok("tap=.") && !ok("tap=..") && !ok("tap=ta:p") && !ok("tap=t p"));
        assert!(!ok("tap=t,mac=26:54:00:+0:00:01"), "a sign in an octet");
        assert!(!ok(&format!("tap=t,id={}", "n".repeat(65))), "65-byte id");
        assert!(ok(&format!("tap=t,id={}", "n".repeat(64))));
    }

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
    fn device_options_and_pairing_checks() {
        let d = parse_device("id=vf0,path=0000:00:05.0,failover=net0,slot=6", 0).unwrap();
        assert_eq!(d.path, PathBuf::from("/sys/bus/pci/devices/0000:00:05.0"));
        assert_eq!((d.failover.as_deref(), d.slot), (Some("net0"), Some(6)));
        assert_eq!(
            parse_device("path=/sys/bus/pci/devices/x", 2).unwrap().id,
            "dev2"
        );
        let err = |s: &str| parse_device(s, 0).unwrap_err().to_string();
        assert!(err("id=vf0").contains("path=/sys/bus/pci/devices/BDF is required"));
        assert!(err("path=x,slot=0").contains("slots are 1 to 31"));
        assert!(err("path=x,slot=32").contains("slots are 1 to 31"));
        assert!(err("path=x,failover=a b").contains("id=a b"));
        assert!(err("path=x,vfio=y").contains("unknown key 'vfio'"));

        let nets = vec![
            parse_net("id=sb,tap=t0,standby=on,slot=3", 0).unwrap(),
            parse_net("id=plain,tap=t1", 1).unwrap(),
        ];
        let dev = |s: &str| parse_device(s, 0).unwrap();
        let check = |devs: &[DeviceSpec]| check_devices(&nets, devs).map_err(|e| e.to_string());
        assert!(check(&[dev("id=a,path=x,failover=sb")]).is_ok());
        let e = check(&[dev("id=a,path=x,failover=nope")]).unwrap_err();
        assert!(e.contains("failover=nope: no NIC with that id"), "{e}");
        let e = check(&[dev("id=a,path=x,failover=plain")]).unwrap_err();
        assert!(e.contains("not a standby NIC"), "{e}");
        let e = check(&[
            dev("id=a,path=x,failover=sb"),
            dev("id=b,path=y,failover=sb"),
        ])
        .unwrap_err();
        assert!(e.contains("sb already has the primary a"), "{e}");
        let e = check(&[dev("id=a,path=x,slot=3")]).unwrap_err();
        assert!(e.contains("slot 3 is already used by sb"), "{e}");
        let e = check(&[dev("id=a,path=x,slot=5"), dev("id=b,path=y,slot=5")]).unwrap_err();
        assert!(e.contains("slot 5 is already used by a"), "{e}");
        let e = check(&[dev("id=a,path=x"), dev("id=b,path=x")]).unwrap_err();
        assert!(e.contains("already passed through as a"), "{e}");
        let e = check(&[dev("id=plain,path=x")]).unwrap_err();
        assert!(e.contains("duplicate id"), "{e}");
    }

    #[test]
    fn vfio_host_checks_read_sysfs() {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("tandem-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mk = |bdf: &str, driver: Option<&str>| {
            let d = root.join("devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config"), [0u8; 64]).unwrap();
            if let Some(drv) = driver {
                std::fs::create_dir_all(root.join("drivers").join(drv)).unwrap();
                symlink(root.join("drivers").join(drv), d.join("driver")).unwrap();
            }
            d
        };
        let spec = |p: &std::path::Path| DeviceSpec {
            id: "vf0".into(),
            path: p.to_path_buf(),
            failover: None,
            slot: None,
        };
        let e = |p: &std::path::Path| check_vfio_host(&spec(p)).unwrap_err().to_string();
        assert!(e(&root.join("devices/0000:00:1e.0")).contains("no such PCI device"));
        let nic = mk("0000:00:03.0", Some("e1000e"));
        let msg = e(&nic);
        assert!(
            msg.contains("bound to e1000e, not vfio-pci") && msg.contains("driver_override"),
            "{msg}"
        );
        let loose = mk("0000:00:04.0", None);
        assert!(e(&loose).contains("not bound to any driver"));
        // Bound to vfio-pci, but its IOMMU group also holds a device a host driver has.
        let vf = mk("0000:00:05.0", Some("vfio-pci"));
        assert!(e(&vf).contains("no IOMMU group"));
        let group = root.join("groups/7");
        std::fs::create_dir_all(group.join("devices")).unwrap();
        symlink(&vf, group.join("devices/0000:00:05.0")).unwrap();
        symlink(&nic, group.join("devices/0000:00:03.0")).unwrap();
        symlink(&group, vf.join("iommu_group")).unwrap();
        let msg = e(&vf);
        assert!(
            msg.contains("IOMMU group 7 also holds 0000:00:03.0, bound to the host driver e1000e"),
            "{msg}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn net_options() {
        let n = parse_net("id=a,tap=tap0,mac=52:54:00:12:34:56,standby=on,num_queues=4,queue_size=512,mtu=9000,slot=4", 0).unwrap();
        assert_eq!(n.net.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(n.net.standby);
        assert_eq!(
            (n.net.num_queues, n.net.queue_size, n.net.mtu, n.slot),
            (4, 512, Some(9000), Some(4))
        );
        let d = parse_net("tap=t", 3).unwrap();
        assert_eq!(d.net.id, "net3");
        assert_eq!(d.net.mac[..3], [0x52, 0x54, 0]);
        let err = |s: &str| parse_net(s, 0).unwrap_err().to_string();
        assert!(err("id=a").contains("tap=NAME is required"));
        assert!(err("tap=t,mac=52:54:00:12:34").contains("not a MAC"));
        assert!(err("tap=t,mac=01:00:5e:00:00:01").contains("unicast"));
        assert!(err("tap=t,queue_size=100").contains("power of two"));
        assert!(err("tap=t,num_queues=3").contains("even"));
        assert!(err("tap=t,slot=0").contains("slots are 1 to 31"));
        assert!(err("tap=t,mtu=10").contains("mtu"));
        assert!(err("tap=t,standby=maybe").contains("on or off"));
        assert!(err("tap=t,color=red").contains("unknown key"));
        let a = parse_net("id=a,tap=t0,mac=52:54:00:00:00:01", 0).unwrap();
        let b = parse_net("id=b,tap=t1,mac=52:54:00:00:00:01", 1).unwrap();
        assert!(check_nets(&[a.clone(), b])
            .unwrap_err()
            .to_string()
            .contains("only a failover pair"));
        let c = parse_net("id=a,tap=t2,mac=52:54:00:00:00:02", 1).unwrap();
        assert!(check_nets(&[a.clone(), c])
            .unwrap_err()
            .to_string()
            .contains("duplicate id"));
        let e = parse_net("id=e,tap=t0,mac=52:54:00:00:00:03", 1).unwrap();
        assert!(check_nets(&[a, e])
            .unwrap_err()
            .to_string()
            .contains("already used"));
    }

    #[test]
    fn kernel_check() {
        let dir = std::env::temp_dir().join(format!("tandem-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(open_kernel(&p), Err(ConfigError::Kernel { .. })));
        assert!(open_kernel(&dir.join("missing")).is_err());
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        std::fs::write(&p, &elf).unwrap();
        assert!(open_kernel(&p).is_ok());
        std::fs::write(&p, b"").unwrap();
        assert!(open_initramfs(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_incoming_nic_takes_the_source_config_with_its_own_tap() {
        let src = parse_net(
            "id=net0,tap=tapA,mac=52:54:00:aa:00:01,standby=on,slot=4",
            0,
        )
        .unwrap();
        let mine = parse_incoming_net("id=net0,tap=tapB", 0).unwrap();
        let got = merge_incoming_net(&src, &mine).unwrap();
        assert_eq!(got.net.tap, "tapB");
        assert!(got.net.standby);
        assert_eq!(got.slot, Some(4));
        assert_eq!(got.net.mac, src.net.mac);
        let agrees =
            parse_incoming_net("id=net0,tap=tapB,standby=on,mac=52:54:00:aa:00:01", 0).unwrap();
        assert!(merge_incoming_net(&src, &agrees).is_ok());
        let differs = parse_incoming_net("id=net0,tap=tapB,mac=52:54:00:aa:00:02", 0).unwrap();
        let e = merge_incoming_net(&src, &differs).unwrap_err();
        assert!(e.contains("mac differs"), "{e}");
        assert!(
            parse_incoming_net("id=net0", 0).is_err(),
            "tap= is required"
        );
    }

    #[test]
    fn a_primary_mac_is_checked_only_where_the_host_can_tell_it() {
        let nets = [parse_net("id=net0,tap=t0,mac=52:54:00:aa:00:01,standby=on", 0).unwrap()];
        let dir = std::env::temp_dir().join(format!("tandem-mac-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = parse_device(&format!("id=v,path={}", dir.display()), 0).unwrap();
        assert_eq!(
            check_primary_mac(&plain, &nets).unwrap(),
            None,
            "no primary, nothing to say"
        );
        let primary =
            parse_device(&format!("id=v,path={},failover=net0", dir.display()), 0).unwrap();
        let note = check_primary_mac(&primary, &nets).unwrap().unwrap();
        assert!(
            note.contains("not an SR-IOV VF") && note.contains("52:54:00:aa:00:01"),
            "{note}"
        );
        // A VF whose PF has no interface: said in the note, not refused (the host
        // cannot tell).
        let pf = dir.join("pf");
        std::fs::create_dir_all(&pf).unwrap();
        std::os::unix::fs::symlink(&pf, dir.join("physfn")).unwrap();
        std::os::unix::fs::symlink(&dir, pf.join("virtfn0")).unwrap();
        let note = check_primary_mac(&primary, &nets).unwrap().unwrap();
        assert!(
            note.contains("cannot be read") && note.contains("no network interface"),
            "{note}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
