//! rtnetlink, the few requests Tandem makes: one request, one answer, on a socket of
//! its own with a receive timeout (a kernel that does not answer must not hold the
//! control loop). Answers are parsed without trusting a length in them: every header
//! and attribute is bounds-checked against the bytes received.
//!
//! - [`request`]: send one message, read one answer ([`crate::sriov`] asks for a PF's VF
//!   table with it);
//! - [`forget_bridge_entry`]: make the bridge a tap is a port of forget where it last saw
//!   a MAC (`bridge fdb del MAC dev TAP master`), so that its next frame for that MAC
//!   floods instead of going to the tap (see `vmm`'s failover steering).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLMSG_ERROR: u16 = 2;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const RTM_DELNEIGH: u16 = 29;
/// nlmsghdr.
pub const NLMSG_HDR: usize = 16;
/// The flag bits some kernels set in an attribute's type (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// struct ndmsg: family, pad, pad, ifindex, state, flags, type.
const NDMSG: usize = 12;
const NDA_LLADDR: u16 = 2;
/// The bridge's own table, not the port device's.
const NTF_MASTER: u8 = 0x04;

/// The index of network device `name` in the calling thread's network namespace; 0 when
/// there is none. (Not from sysfs, which shows the namespace it was mounted in.)
pub fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string `c` owns and nothing else.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Sends `msg` (a whole netlink message) to the kernel and returns its answer.
pub fn request(msg: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor this function just opened and owns alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = sock.as_raw_fd();
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval; the pointer and size describe `timeout`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_nl is valid; the field set below makes it the kernel's.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` and `kernel` are live for the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // One message; a PF with many VFs makes a link message large.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length for the duration of the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `b`: (type without the nested/byte-order flags, payload). Stops with
/// an error at an attribute whose length does not fit.
pub fn attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16_at(b, 0).unwrap_or(0));
        let kind = u16_at(b, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return Err(format!(
                "attribute {kind} says {len} bytes, {} are left",
                b.len()
            ));
        }
        out.push((kind, &b[4..len]));
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or(&[]);
    }
    Ok(out)
}

/// A netlink message: header (`kind`, `flags`, `seq`), then `body`.
pub fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// `RTM_DELNEIGH` of `mac` on bridge port `ifindex`, in the bridge's table, every VLAN.
fn fdb_delete_request(ifindex: i32, mac: [u8; 6], seq: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(NDMSG + 12);
    body.extend_from_slice(&[libc::AF_BRIDGE as u8, 0, 0, 0]);
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&0u16.to_ne_bytes()); // state
    body.extend_from_slice(&[NTF_MASTER, 0]); // flags, type
    body.extend_from_slice(&10u16.to_ne_bytes()); // NDA_LLADDR: 4 + 6 bytes
    body.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
    body.extend_from_slice(&mac);
    body.extend_from_slice(&[0, 0]); // padding to 4
    message(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, seq, &body)
}

/// The kernel's acknowledgement of request `seq`: `Ok(())`, or the error it reports.
pub fn parse_ack(b: &[u8], seq: u32) -> Result<(), io::Error> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let len = u32_at(b, 0).ok_or_else(|| bad(format!("an answer of {} bytes", b.len())))? as usize;
    if len < NLMSG_HDR + 4 || len > b.len() {
        return Err(bad(format!(
            "the answer says {len} bytes, {} were received",
            b.len()
        )));
    }
    if u16_at(b, 4) != Some(NLMSG_ERROR) {
        let kind = u16_at(b, 4).unwrap_or(0);
        return Err(bad(format!("not an acknowledgement (type {kind})")));
    }
    let got = u32_at(b, 8).unwrap_or(0);
    if got != seq {
        return Err(bad(format!("an answer to request {got}, not {seq}")));
    }
    match u32_at(b, NLMSG_HDR).map(|e| e as i32) {
        Some(0) => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e.saturating_neg())),
        None => Err(bad("a truncated acknowledgement".into())),
    }
}

/// Whether the bridge that the device `ifindex` is a port of had an entry for `mac`
/// on that port (it is gone now): `Ok(false)` when it had none there (the MAC is
/// unknown to it, or it last saw it on another port). An error when `ifindex` is not a
/// bridge port, or the kernel refuses.
pub fn forget_bridge_entry(ifindex: u32, mac: [u8; 6]) -> io::Result<bool> {
    let index = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    let seq = 1;
    let answer = request(&fdb_delete_request(index, mac, seq))?;
    match parse_ack(&answer, seq) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delete_names_port_mac_and_the_bridge_table() {
        let m = fdb_delete_request(7, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 9);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(m.len() % 4, 0);
        assert_eq!(u16_at(&m, 4), Some(RTM_DELNEIGH));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&m, 8), Some(9));
        let nd = &m[NLMSG_HDR..];
        assert_eq!(nd[0], libc::AF_BRIDGE as u8);
        assert_eq!(u32_at(nd, 4), Some(7));
        assert_eq!(nd[10], NTF_MASTER);
        let a = attrs(&nd[NDMSG..]).unwrap();
        assert_eq!(
            a,
            vec![(NDA_LLADDR, &[0x52, 0x54, 0, 0x12, 0x34, 0x56][..])]
        );
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut body = errno.to_ne_bytes().to_vec();
        body.extend(message(RTM_DELNEIGH, 0, seq, &[0; 12]));
        message(NLMSG_ERROR, 0, seq, &body)
    }

    #[test]
    fn acks_and_refusals() {
        assert!(parse_ack(&ack(3, 0), 3).is_ok());
        let e = parse_ack(&ack(3, -libc::ENOENT), 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(parse_ack(&ack(3, 0), 4)
            .unwrap_err()
            .to_string()
            .contains("request 3"));
        // Every truncation is an error, never a panic or a made-up success.
        let a = ack(3, 0);
        for cut in 0..NLMSG_HDR + 4 {
            assert!(parse_ack(&a[..cut], 3).is_err(), "cut at {cut}");
        }
        // A length past what was received; a message that is not an ack.
        let mut long = a.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_ack(&long, 3).is_err());
        assert!(parse_ack(&message(16, 0, 3, &[0; 16]), 3).is_err());
        // An error code of i32::MIN does not overflow.
        assert!(parse_ack(&ack(3, i32::MIN), 3).is_err());
    }

    #[test]
    fn attributes_are_bounds_checked() {
        assert!(attrs(&[8, 0, 1, 0, 1, 2]).is_err());
        assert!(attrs(&[2, 0, 1, 0]).is_err());
        assert_eq!(attrs(&[]).unwrap(), vec![]);
    }

    /// A real bridge in a network namespace of its own: the entry goes, a second
    /// deletion finds nothing, a device that is not a bridge port is an error.
    #[test]
    fn forgets_an_entry_of_a_real_bridge() {
        let ns = format!("tandem-nl-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(["-n", &ns])
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            eprintln!("skipped: cannot create a network namespace (not root, or no ip)");
            return;
        }
        let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        let setup = ip(&["link", "add", "br0", "type", "bridge"])
            && ip(&["link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            && ip(&["link", "set", "p0", "master", "br0"])
            && std::process::Command::new("bridge")
                .args([
                    "-n",
                    &ns,
                    "fdb",
                    "add",
                    "52:54:00:ab:cd:ef",
                    "dev",
                    "p0",
                    "master",
                ])
                .status()
                .is_ok_and(|s| s.success());
        let result = setup.then(|| {
            let path = format!("/var/run/netns/{ns}");
            std::thread::spawn(move || {
                let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
                // SAFETY: setns(2) on a namespace file this thread opened; it moves only
                // this thread, which ends right after.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error().to_string());
                }
                let p0 = ifindex("p0");
                Ok((
                    forget_bridge_entry(p0, mac).map_err(|e| e.to_string()),
                    forget_bridge_entry(p0, mac).map_err(|e| e.to_string()),
                    forget_bridge_entry(ifindex("p1"), mac).is_err(),
                ))
            })
            .join()
        });
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        assert!(setup, "could not build the bridge in {ns}");
        let (first, second, not_a_port) = result.unwrap().unwrap().unwrap();
        assert_eq!(first, Ok(true));
        assert_eq!(second, Ok(false));
        assert!(
            not_a_port,
            "a device that is no bridge port must be an error"
        );
    }
}
