//! The reference VMM: QEMU with `-accel kvm` booting the same test guest as Tandem.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::agent::Agent;
use crate::image::GuestImage;
use crate::{err, Result};

/// The reference QEMU binary: `TANDEM_REFERENCE_QEMU` (for example an unpacked QEMU 7.2, see
/// `scripts/qemu-7.2`), else `qemu-system-x86_64` on the PATH (QEMU 10 from
/// bookworm-backports after `scripts/setup`).
pub fn reference_qemu() -> String {
    std::env::var("TANDEM_REFERENCE_QEMU")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// A running QEMU; killed when dropped.
pub struct QemuVm {
    child: Child,
    /// COM1's unix socket (QEMU is the server).
    pub serial: PathBuf,
    /// QMP's unix socket.
    pub qmp: PathBuf,
    /// QEMU's stderr.
    pub log: PathBuf,
}

/// Builds a QEMU command line: q35, KVM, no default devices, direct kernel boot.
pub struct QemuBuilder {
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
    cpus: u32,
    mem_mib: u32,
    dir: PathBuf,
    name: String,
    devices: Vec<String>,
    extra: Vec<String>,
    root_ports: u32,
}

impl QemuVm {
    /// A builder for `image`; sockets and logs go in `dir` as `<name>.serial` etc.
    pub fn builder(image: &GuestImage, dir: &Path, name: &str) -> QemuBuilder {
        QemuBuilder {
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            cmdline: image.cmdline(),
            cpus: 1,
            mem_mib: 512,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            devices: Vec::new(),
            extra: Vec::new(),
            root_ports: 0,
        }
    }

    /// Connects the guest agent to COM1; the console is logged to `<dir>/<name>.console.log`.
    pub fn agent(&self, console_log: PathBuf) -> Result<Agent> {
        Agent::connect_unix(&self.serial, console_log)
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's stderr so far (for error messages).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl QemuBuilder {
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    fn root_port(&mut self) -> String {
        self.root_ports += 1;
        let n = self.root_ports;
        self.devices.push(format!(
            "pcie-root-port,id=rp{n},chassis={n},slot={n},bus=pcie.0"
        ));
        format!("rp{n}")
    }

    /// virtio-net `id` on tap `tap` with `mac`, on its own PCIe root port;
    /// `failover` offers VIRTIO_NET_F_STANDBY. Option ROMs are off (no iPXE delay).
    pub fn virtio_net(mut self, id: &str, tap: &str, mac: &str, failover: bool) -> Self {
        let bus = self.root_port();
        self.extra.extend([
            "-netdev".into(),
            format!("tap,id=nd-{id},ifname={tap},script=no,downscript=no"),
        ]);
        let fo = if failover { ",failover=on" } else { "" };
        self.devices.push(format!(
            "virtio-net-pci,id={id},netdev=nd-{id},mac={mac},bus={bus},romfile={fo}"
        ));
        self
    }

    /// The host PCI device `bdf` passed through with vfio-pci on its own root port;
    /// `failover_pair_id` names the virtio-net standby it pairs with.
    pub fn vfio(mut self, id: &str, bdf: &str, failover_pair_id: Option<&str>) -> Self {
        let bus = self.root_port();
        let pair = failover_pair_id
            .map(|p| format!(",failover_pair_id={p}"))
            .unwrap_or_default();
        self.devices.push(format!(
            "vfio-pci,id={id},host={bdf},bus={bus},rombar=0{pair}"
        ));
        self
    }

    /// Any extra QEMU arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }

    pub fn spawn(self) -> Result<QemuVm> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| err!("cannot create {}: {e}", self.dir.display()))?;
        let serial = self.dir.join(format!("{}.serial", self.name));
        let qmp = self.dir.join(format!("{}.qmp", self.name));
        let log = self.dir.join(format!("{}.qemu.log", self.name));
        let _ = fs::remove_file(&serial);
        let _ = fs::remove_file(&qmp);
        let logf =
            fs::File::create(&log).map_err(|e| err!("cannot create {}: {e}", log.display()))?;
        let qemu = reference_qemu();
        let mut cmd = Command::new(&qemu);
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-nographic",
            "-no-reboot",
        ])
        .args([
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &format!("{}M", self.mem_mib),
        ])
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(&self.initramfs)
        .args(["-append", &self.cmdline])
        .arg("-chardev")
        .arg(format!(
            "socket,id=s0,path={},server=on,wait=off",
            serial.display()
        ))
        .args(["-serial", "chardev:s0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-monitor", "none"]);
        for d in &self.devices {
            cmd.args(["-device", d]);
        }
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let child = cmd
            .spawn()
            .map_err(|e| err!("cannot start {qemu}: {e} (run scripts/setup)"))?;
        Ok(QemuVm {
            child,
            serial,
            qmp,
            log,
        })
    }
}
