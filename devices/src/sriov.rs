//! SR-IOV virtual functions: the MAC address their physical function gave them.
//!
//! A failover primary pairs with its standby in the guest only when the primary's
//! permanent MAC is the standby's. For an SR-IOV VF the host can know that MAC before the
//! guest does: the PF's driver keeps a table of its VFs (what `ip link set PF vf N mac M`
//! writes), and rtnetlink reports it as `IFLA_VFINFO_LIST` in the PF's link message when
//! the request asks for it with `RTEXT_FILTER_VF`.
//!
//! Finding the entry of one VF, from its sysfs directory:
//! - `DEV/physfn` links to the PF's directory; no `physfn`, not a VF;
//! - the PF's `virtfnN` links name its VFs: the one that resolves to `DEV` gives N;
//! - the PF's `net/` directory names its network interface, `net/IF/ifindex` its index;
//! - an `RTM_GETLINK` for that index returns the table; entry N holds the MAC.
//!
//! The reply is parsed without trusting a length in it: every attribute is bounds-checked
//! against the bytes received.

use std::io;
use std::path::{Path, PathBuf};

/// What the host can tell about a device's MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfMac {
    /// The device is not an SR-IOV VF (no `physfn`): the host cannot tell its MAC.
    NotAVf,
    /// VF `vf` of the PF whose interface is `pf`: its MAC in the PF's table (all zeros when
    /// none is set: the VF's driver then makes one up).
    Known { pf: String, vf: u32, mac: [u8; 6] },
}

#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("{vf} is a VF of {pf}, but none of the PF's virtfn links resolves to it")]
    NotListed { pf: PathBuf, vf: PathBuf },
    #[error("its PF {pf} has no network interface (no net/ directory: is the PF bound to its network driver?)")]
    NoPfNetdev { pf: PathBuf },
    #[error("cannot read {path}: {source}")]
    Sysfs { path: PathBuf, source: io::Error },
    #[error("rtnetlink: {0}")]
    Netlink(io::Error),
    #[error("the PF {pf}'s VF table has no entry for VF {vf}")]
    NoEntry { pf: String, vf: u32 },
}

/// The MAC the PF's table gives the VF at `dev` (a `/sys/bus/pci/devices/BDF` directory).
pub fn vf_mac(dev: &Path) -> Result<VfMac, SriovError> {
    let physfn = dev.join("physfn");
    if std::fs::symlink_metadata(&physfn).is_err() {
        return Ok(VfMac::NotAVf);
    }
    let sysfs = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SriovError::Sysfs { path, source }
    };
    let pf = physfn.canonicalize().map_err(sysfs(&physfn))?;
    let me = dev.canonicalize().map_err(sysfs(dev))?;
    let vf = vf_index(&pf, &me)?;
    let (ifname, ifindex) = pf_netdev(&pf)?;
    let table = query_vf_macs(ifindex).map_err(SriovError::Netlink)?;
    match table.iter().find(|(n, _)| *n == vf) {
        Some((_, mac)) => Ok(VfMac::Known {
            pf: ifname,
            vf,
            mac: *mac,
        }),
        None => Err(SriovError::NoEntry { pf: ifname, vf }),
    }
}

/// N of the PF's `virtfnN` link that resolves to `vf`.
fn vf_index(pf: &Path, vf: &Path) -> Result<u32, SriovError> {
    let entries = std::fs::read_dir(pf).map_err(|source| SriovError::Sysfs {
        path: pf.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("virtfn"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if e.path().canonicalize().ok().as_deref() == Some(vf) {
            return Ok(n);
        }
    }
    Err(SriovError::NotListed {
        pf: pf.to_path_buf(),
        vf: vf.to_path_buf(),
    })
}

/// The PF's network interface: its name and index.
fn pf_netdev(pf: &Path) -> Result<(String, u32), SriovError> {
    let net = pf.join("net");
    let name = std::fs::read_dir(&net)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .ok_or_else(|| SriovError::NoPfNetdev {
            pf: pf.to_path_buf(),
        })?;
    let path = net.join(&name).join("ifindex");
    let text = std::fs::read_to_string(&path).map_err(|source| SriovError::Sysfs {
        path: path.clone(),
        source,
    })?;
    let index = text.trim().parse().map_err(|_| SriovError::Sysfs {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, format!("{:?}", text.trim())),
    })?;
    Ok((name, index))
}

use crate::netlink::{attrs, u16_at, u32_at, NLMSG_ERROR, NLMSG_HDR, NLM_F_REQUEST};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_EXT_MASK: u16 = 29;
const RTEXT_FILTER_VF: u32 = 1;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
/// ifinfomsg, after the netlink header.
const IFINFOMSG: usize = 16;

/// The PF's VF table through rtnetlink: (VF number, MAC) for each entry.
pub fn query_vf_macs(ifindex: u32) -> io::Result<Vec<(u32, [u8; 6])>> {
    let index = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    let seq = 1;
    let answer = crate::netlink::request(&link_request(index, seq))?;
    parse_link_reply(&answer, seq).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))
}

/// RTM_GETLINK for interface `index`, asking for the VF table.
fn link_request(index: i32, seq: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(IFINFOMSG + 8);
    // ifinfomsg: family AF_UNSPEC, pad, type, index, flags, change.
    body.extend_from_slice(&[0, 0, 0, 0]);
    body.extend_from_slice(&index.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    body.extend_from_slice(&RTEXT_FILTER_VF.to_ne_bytes());
    crate::netlink::message(RTM_GETLINK, NLM_F_REQUEST, seq, &body)
}

/// The VF table in the kernel's answer to [`link_request`] (sequence `seq`).
pub fn parse_link_reply(b: &[u8], seq: u32) -> Result<Vec<(u32, [u8; 6])>, String> {
    let short = || format!("a reply of {} bytes is too short", b.len());
    let len = u32_at(b, 0).ok_or_else(short)? as usize;
    let kind = u16_at(b, 4).ok_or_else(short)?;
    let got_seq = u32_at(b, 8).ok_or_else(short)?;
    if len < NLMSG_HDR || len > b.len() {
        return Err(format!(
            "the reply says {len} bytes, {} were received",
            b.len()
        ));
    }
    if got_seq != seq {
        return Err(format!("a reply to request {got_seq}, not {seq}"));
    }
    let body = &b[NLMSG_HDR..len];
    match kind {
        NLMSG_ERROR => {
            let errno = u32_at(body, 0).ok_or_else(short)? as i32;
            return Err(format!(
                "the kernel refused the request: {}",
                io::Error::from_raw_os_error(-errno)
            ));
        }
        RTM_NEWLINK => {}
        other => return Err(format!("unexpected message type {other}")),
    }
    let link_attrs = body.get(IFINFOMSG..).ok_or_else(short)?;
    let mut table = Vec::new();
    for (kind, list) in attrs(link_attrs)? {
        if kind != IFLA_VFINFO_LIST {
            continue;
        }
        for (kind, info) in attrs(list)? {
            if kind != IFLA_VF_INFO {
                continue;
            }
            for (kind, v) in attrs(info)? {
                // struct ifla_vf_mac { __u32 vf; __u8 mac[32]; }
                if kind != IFLA_VF_MAC {
                    continue;
                }
                let vf = u32_at(v, 0).ok_or("IFLA_VF_MAC too short")?;
                let mac: [u8; 6] = v
                    .get(4..10)
                    .and_then(|m| m.try_into().ok())
                    .ok_or("IFLA_VF_MAC too short")?;
                table.push((vf, mac));
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn vf_mac_attr(vf: u32, mac: [u8; 6]) -> Vec<u8> {
        let mut p = vf.to_ne_bytes().to_vec();
        p.extend_from_slice(&mac);
        p.extend_from_slice(&[0; 26]);
        attr(IFLA_VF_MAC, &p)
    }

    /// An RTM_NEWLINK with a name attribute, then the VF list (nested flag set as the
    /// kernel may), each VF with a MAC and another attribute.
    fn reply(seq: u32, vfs: &[(u32, [u8; 6])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (vf, mac) in vfs {
            let mut info = attr(2, &[0; 8]); // IFLA_VF_VLAN-like neighbour
            info.extend(vf_mac_attr(*vf, *mac));
            list.extend(attr(IFLA_VF_INFO | 0x8000, &info));
        }
        let mut body = vec![0u8; IFINFOMSG];
        body.extend(attr(3, b"eth9\0"));
        body.extend(attr(IFLA_VFINFO_LIST | 0x8000, &list));
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend(body);
        m
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 7];

    #[test]
    fn reads_every_vf_of_the_table() {
        let r = reply(7, &[(0, B), (1, A), (2, [0; 6])]);
        assert_eq!(
            parse_link_reply(&r, 7).unwrap(),
            vec![(0, B), (1, A), (2, [0; 6])]
        );
        assert_eq!(parse_link_reply(&reply(1, &[]), 1).unwrap(), vec![]);
    }

    #[test]
    fn refuses_what_does_not_add_up() {
        let r = reply(7, &[(0, B), (1, A)]);
        // Another request's answer.
        assert!(parse_link_reply(&r, 8).unwrap_err().contains("request 7"));
        // Every truncation: an error or a shorter table, never a panic or a made-up MAC.
        for cut in 0..r.len() {
            if let Ok(t) = parse_link_reply(&r[..cut], 7) {
                panic!("a reply cut at {cut} of {} parsed: {t:?}", r.len());
            }
        }
        // An attribute whose length runs past the message.
        let mut bad = r.clone();
        let at = NLMSG_HDR + IFINFOMSG;
        bad[at..at + 2].copy_from_slice(&0xfff0u16.to_ne_bytes());
        assert!(parse_link_reply(&bad, 7).unwrap_err().contains("attribute"));
        // A length below the attribute header.
        bad[at..at + 2].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_link_reply(&bad, 7).is_err());
        // The kernel's error message.
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&0u16.to_ne_bytes());
        err.extend_from_slice(&7u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert!(parse_link_reply(&err, 7).unwrap_err().contains("refused"));
    }

    #[test]
    fn the_request_asks_for_the_vf_table() {
        let m = link_request(42, 3);
        assert_eq!(m.len() as u32, u32_at(&m, 0).unwrap());
        assert_eq!(u16_at(&m, 4), Some(RTM_GETLINK));
        assert_eq!(u32_at(&m, NLMSG_HDR + 4), Some(42));
        let a = attrs(&m[NLMSG_HDR + IFINFOMSG..]).unwrap();
        assert_eq!(a, vec![(IFLA_EXT_MASK, &RTEXT_FILTER_VF.to_ne_bytes()[..])]);
    }

    #[test]
    fn a_function_without_physfn_is_not_a_vf() {
        let d = std::env::temp_dir().join(format!("tandem-sriov-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(vf_mac(&d).unwrap(), VfMac::NotAVf);
        // A VF whose PF does not list it, and one whose PF has no interface.
        let (pf, vf) = (d.join("pf"), d.join("vf"));
        std::fs::create_dir_all(&pf).unwrap();
        std::fs::create_dir_all(&vf).unwrap();
        std::os::unix::fs::symlink(&pf, vf.join("physfn")).unwrap();
        let e = vf_mac(&vf).unwrap_err().to_string();
        assert!(e.contains("virtfn"), "{e}");
        std::os::unix::fs::symlink(&vf, pf.join("virtfn3")).unwrap();
        let e = vf_mac(&vf).unwrap_err().to_string();
        assert!(e.contains("no network interface"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
