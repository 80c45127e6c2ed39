//! Reproducible guest images built from Debian packages.
//!
//! The kernel is whatever ABI package `linux-image-amd64` depends on today (old ABI
//! packages leave the archive, so nothing is pinned). Packages are fetched with
//! `apt-get download` into `target/tandem-images/debs`, unpacked with `dpkg-deb -x`, and
//! packed into a newc initramfs by [`crate::cpio`]. An image lives in
//! `target/tandem-images/<name>-<key>/` where the key hashes the recipe version, the
//! recipe's text and the SHA-256 of every package file, so a new kernel upload or a
//! change of `/init` gives a new image and an unchanged recipe reuses the old one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::CpioWriter;
use crate::{err, Result};

/// Bump when the way images are assembled changes.
const RECIPE_VERSION: u32 = 2;

/// A bootable image: a bzImage and an uncompressed newc initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
}

impl GuestImage {
    /// The kernel command line the test guest is meant to boot with (serial console on
    /// COM1, quiet: every byte on an emulated UART is a VM exit; no KASLR, so a
    /// hung vCPU's RIP can be looked up in the kernel's System.map). A task blocked for
    /// 20 s prints its stack on the console, well inside the agent's 60 s timeout, whose
    /// error shows the console's last lines.
    pub fn cmdline(&self) -> String {
        "console=ttyS0 quiet panic=-1 nokaslr sysctl.kernel.hung_task_timeout_secs=20".to_string()
    }
}

/// The kernels the test guest is built with: guest behaviour Tandem relies on (acpiphp
/// bus checks, net_failover enslaving, virtio reset) differs between kernel versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GuestKernel {
    /// What `linux-image-amd64` depends on in Debian 12 itself (6.1).
    Stable,
    /// What it depends on in `bookworm-backports` (6.12 today: Debian 13's kernel).
    Backports,
}

impl GuestKernel {
    pub const ALL: [GuestKernel; 2] = [GuestKernel::Stable, GuestKernel::Backports];

    /// The suffix of `TANDEM_GUEST_IMAGE_<KEY>`.
    fn key(self) -> &'static str {
        match self {
            GuestKernel::Stable => "STABLE",
            GuestKernel::Backports => "BACKPORTS",
        }
    }

    /// Where the kernel package comes from.
    pub fn source(self) -> &'static str {
        match self {
            GuestKernel::Stable => "Debian 12 (bookworm)",
            GuestKernel::Backports => "bookworm-backports",
        }
    }
}

/// The test guest on Debian 12's own kernel.
pub fn test_guest() -> Result<GuestImage> {
    test_guest_with(GuestKernel::Stable)
}

/// The test guest (busybox, iperf3, virtio-net/failover/e1000e modules, the serial
/// agent) on `kernel`. `TANDEM_GUEST_IMAGE_<STABLE|BACKPORTS>=kernel|initramfs|version`
/// (how the test host passes its images in) or, for the stable kernel,
/// `TANDEM_GUEST_KERNEL` + `TANDEM_GUEST_INITRAMFS` name a ready image instead.
pub fn test_guest_with(kernel: GuestKernel) -> Result<GuestImage> {
    let var = format!("TANDEM_GUEST_IMAGE_{}", kernel.key());
    if let Ok(spec) = std::env::var(&var) {
        let mut f = spec.split('|');
        return match (f.next(), f.next(), f.next()) {
            (Some(k), Some(i), Some(v)) if !k.is_empty() && !i.is_empty() => Ok(GuestImage {
                kernel: k.into(),
                initramfs: i.into(),
                kernel_version: v.into(),
            }),
            _ => Err(err!("{var}={spec:?} is not kernel|initramfs|version")),
        };
    }
    if let Ok(e) = std::env::var(format!("{var}_ERROR")) {
        return Err(err!("no {} guest image: {e}", kernel.source()));
    }
    if kernel == GuestKernel::Stable {
        if let (Ok(k), Ok(i)) = (
            std::env::var("TANDEM_GUEST_KERNEL"),
            std::env::var("TANDEM_GUEST_INITRAMFS"),
        ) {
            let kernel_version = std::env::var("TANDEM_GUEST_KERNEL_VERSION").unwrap_or_default();
            return Ok(GuestImage {
                kernel: k.into(),
                initramfs: i.into(),
                kernel_version,
            });
        }
    }
    build(&GUEST_RECIPE, kernel)
}

/// The environment that hands every guest image to a process in the test host (which
/// cannot build them: the outer root is read-only there). An image that cannot be built
/// is passed as `..._ERROR`, so only the tests that need it fail, with the reason.
pub fn guest_images_env() -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for k in GuestKernel::ALL {
        match test_guest_with(k) {
            Ok(i) => env.push((
                format!("TANDEM_GUEST_IMAGE_{}", k.key()),
                format!(
                    "{}|{}|{}",
                    i.kernel.display(),
                    i.initramfs.display(),
                    i.kernel_version
                ),
            )),
            Err(e) if k != GuestKernel::Stable => env.push((
                format!("TANDEM_GUEST_IMAGE_{}_ERROR", k.key()),
                e.to_string(),
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(env)
}

const GUEST_RECIPE: Recipe = Recipe {
    name: "test-guest",
    extra_packages: &["iperf3", "libiperf0", "libsctp1", "libssl3", "libc6"],
    modules: &[
        ("virtio_pci", ""),
        ("virtio_net", ""),
        ("failover", ""),
        ("net_failover", ""),
        // Throttling off: QEMU 7.2's emulated e1000e (the test host's NIC behind VFIO)
        // can abort on its throttling timer while MSI-X is enabled.
        ("e1000e", "InterruptThrottleRate=0,0,0,0"),
        // The test host's SR-IOV VFs (QEMU's igb) as failover primaries.
        ("igbvf", ""),
    ],
    binaries: &["usr/bin/iperf3"],
    init: GUEST_INIT,
    extra_files: &[("bin/tandem-agent", AGENT)],
};

/// The test host (L1): kvm_amd, VFIO, 9p, bridge/tun/veth; its init runs a harness job.
pub fn test_host() -> Result<GuestImage> {
    build(
        &Recipe {
            name: "test-host",
            extra_packages: &[],
            modules: &[
                ("virtio_pci", ""),
                ("virtio_net", ""),
                ("9pnet_virtio", ""),
                ("9p", ""),
                ("kvm", ""),
                ("kvm_amd", ""),
                ("vfio", ""),
                ("vfio_iommu_type1", ""),
                ("vfio_pci", ""),
                ("bridge", ""),
                ("tun", ""),
                ("veth", ""),
                ("vhost_net", ""),
                // The SR-IOV PF (QEMU's igb): its VFs and their MAC table.
                ("igb", ""),
            ],
            binaries: &[],
            init: HOST_INIT,
            extra_files: &[],
        },
        GuestKernel::Stable,
    )
}

struct Recipe {
    name: &'static str,
    extra_packages: &'static [&'static str],
    modules: &'static [(&'static str, &'static str)],
    /// Dynamically linked binaries to copy with the libraries they need.
    binaries: &'static [&'static str],
    init: &'static str,
    extra_files: &'static [(&'static str, &'static str)],
}

impl Recipe {
    fn text(&self) -> String {
        format!(
            "v{RECIPE_VERSION}\n{}\n{:?}\n{:?}\n{:?}\n{}\n{:?}\n",
            self.name,
            self.extra_packages,
            self.modules,
            self.binaries,
            self.init,
            self.extra_files
        )
    }
}

struct Deb {
    package: String,
    file: String,
    size: u64,
    sha256: String,
}

/// `target/` of this workspace, found from the running test binary
/// (`target/<profile>/deps/<bin>`), or `CARGO_TARGET_DIR`.
pub fn target_dir() -> Result<PathBuf> {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(t));
    }
    let exe =
        std::env::current_exe().map_err(|e| err!("cannot find the running executable: {e}"))?;
    for dir in exe.ancestors() {
        if dir.join("CACHEDIR.TAG").exists() {
            return Ok(dir.to_path_buf());
        }
    }
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("E:"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("");
        return Err(err!("{what} failed ({}): {}", out.status, line.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(err!("building guest images needs root (apt-get download, device nodes): run the tests as root"));
    }
    for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(err!("`{tool}` not found: guest images are built from Debian packages; run on Debian/Ubuntu"));
        }
    }
    let lists = fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false);
    if !lists {
        return Err(err!(
            "apt package lists are missing: run `apt-get update` (as root)"
        ));
    }
    Ok(())
}

/// The package the meta-package `linux-image-amd64` (of `kernel`'s suite) depends on today, preferring its
/// `-unsigned` twin (same kernel, no signature wrapper). Returns (package, ABI).
fn kernel_package(kernel: GuestKernel) -> Result<(String, String)> {
    let meta = match kernel {
        GuestKernel::Stable => "linux-image-amd64".to_string(),
        GuestKernel::Backports => {
            let out = run(
                Command::new("apt-cache").args(["madison", "linux-image-amd64"]),
                "apt-cache madison linux-image-amd64",
            )?;
            let version = out
                .lines()
                .find(|l| l.contains("bookworm-backports"))
                .and_then(|l| l.split('|').nth(1))
                .map(str::trim)
                .ok_or_else(|| err!("apt knows no linux-image-amd64 in bookworm-backports: run scripts/setup (it adds the suite)"))?;
            format!("linux-image-amd64={version}")
        }
    };
    let out = run(
        Command::new("apt-cache").args(["depends", &meta]),
        &format!("apt-cache depends {meta}"),
    )?;
    let dep = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim().trim_matches(|c| c == '<' || c == '>'))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
        .ok_or_else(|| err!("`linux-image-amd64` has no linux-image-<abi>-amd64 dependency (apt lists stale? run `apt-get update`)"))?
        .to_string();
    let abi = dep.trim_start_matches("linux-image-").to_string();
    let unsigned = format!("{dep}-unsigned");
    let has_unsigned = Command::new("apt-cache")
        .args(["show", "--no-all-versions", &unsigned])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    Ok((if has_unsigned { unsigned } else { dep }, abi))
}

fn resolve_debs(packages: &[String]) -> Result<Vec<Deb>> {
    let out = run(
        Command::new("apt-get")
            .arg("--print-uris")
            .arg("-qq")
            .arg("download")
            .args(packages),
        "apt-get --print-uris download",
    )?;
    let mut debs = Vec::new();
    // apt lists the URIs in its own order, not the order asked: the package
    // name is the file name's first field.
    for line in out.lines().filter(|l| l.starts_with('\'')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(file), Some(size), Some(sum)) = (f.get(1), f.get(2), f.get(3)) else {
            return Err(err!("unexpected apt-get --print-uris line: {line}"));
        };
        let package = file.split('_').next().unwrap_or(file).to_string();
        debs.push(Deb {
            package,
            file: file.to_string(),
            size: size
                .parse()
                .map_err(|_| err!("bad size in apt-get --print-uris line: {line}"))?,
            sha256: sum.trim_start_matches("SHA256:").to_string(),
        });
    }
    if debs.len() != packages.len() {
        return Err(err!(
            "apt-get --print-uris listed {} of {} packages ({packages:?})",
            debs.len(),
            packages.len()
        ));
    }
    Ok(debs)
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path), "sha256sum")?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}

fn sha256_bytes(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| err!("cannot run sha256sum: {e}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| err!("sha256sum: no stdin"))?
        .write_all(data)
        .map_err(|e| err!("sha256sum: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| err!("sha256sum: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

fn download(debs: &[Deb], dir: &Path) -> Result<()> {
    let missing: Vec<&Deb> = debs
        .iter()
        .filter(|d| {
            fs::metadata(dir.join(&d.file))
                .map(|m| m.len() != d.size)
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|d| d.package.as_str()).collect();
    eprintln!("tandem-images: downloading {}", names.join(" "));
    run(
        Command::new("apt-get")
            .arg("-qq")
            .arg("download")
            .args(&names)
            .current_dir(dir),
        "apt-get download",
    )
    .map_err(|e| err!("{e} (network or mirror problem? try `apt-get update`)"))?;
    for d in missing {
        let sum = sha256_file(&dir.join(&d.file))?;
        if sum != d.sha256 {
            let _ = fs::remove_file(dir.join(&d.file));
            return Err(err!(
                "downloaded {} has SHA-256 {sum}, apt expected {}",
                d.file,
                d.sha256
            ));
        }
    }
    Ok(())
}

/// An exclusive `flock(2)` held until dropped.
pub struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    pub fn exclusive(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| err!("cannot open lock file {}: {e}", path.display()))?;
        // SAFETY: the fd is owned by `f` and open for the duration of the call.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(err!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(FileLock(f))
    }
}

/// Images built or found by this process: a recipe resolves the same way for the life
/// of a test run, and asking apt again costs a second or two per test host.
static BUILT: std::sync::Mutex<BTreeMap<String, GuestImage>> =
    std::sync::Mutex::new(BTreeMap::new());

fn build(recipe: &Recipe, kernel: GuestKernel) -> Result<GuestImage> {
    let memo = format!("{kernel:?}\n{}", recipe.text());
    if let Some(image) = BUILT.lock().ok().and_then(|b| b.get(&memo).cloned()) {
        return Ok(image);
    }
    let image = build_uncached(recipe, kernel)?;
    if let Ok(mut b) = BUILT.lock() {
        b.insert(memo, image.clone());
    }
    Ok(image)
}

fn build_uncached(recipe: &Recipe, kernel: GuestKernel) -> Result<GuestImage> {
    check_prerequisites()?;
    let cache = target_dir()?.join("tandem-images");
    let debdir = cache.join("debs");
    fs::create_dir_all(&debdir).map_err(|e| err!("cannot create {}: {e}", debdir.display()))?;
    let _lock = FileLock::exclusive(&cache.join(".lock"))?;

    let (kpkg, abi) = kernel_package(kernel)?;
    let mut packages = vec![kpkg, "busybox-static".to_string()];
    packages.extend(recipe.extra_packages.iter().map(|s| s.to_string()));
    let debs = resolve_debs(&packages)?;
    let mut key_text = recipe.text();
    for d in &debs {
        key_text.push_str(&format!("{} {}\n", d.file, d.sha256));
    }
    let key = sha256_bytes(key_text.as_bytes())?;
    let out = cache.join(format!("{}-{}", recipe.name, &key[..16]));
    let image = GuestImage {
        kernel: out.join("vmlinuz"),
        initramfs: out.join("initramfs.cpio"),
        kernel_version: abi.clone(),
    };
    if image.kernel.exists() && image.initramfs.exists() {
        return Ok(image);
    }
    download(&debs, &debdir)?;

    let tmp = cache.join(format!("{}-{}.tmp", recipe.name, &key[..16]));
    let _ = fs::remove_dir_all(&tmp);
    let root = tmp.join("root");
    fs::create_dir_all(&root).map_err(|e| err!("cannot create {}: {e}", root.display()))?;
    for d in &debs {
        run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(debdir.join(&d.file))
                .arg(&root),
            &format!("dpkg-deb -x {}", d.file),
        )?;
    }
    let cpio = assemble(recipe, &root, &abi)?;
    fs::write(tmp.join("initramfs.cpio"), cpio).map_err(|e| err!("cannot write initramfs: {e}"))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{abi}"));
    fs::copy(&vmlinuz, tmp.join("vmlinuz"))
        .map_err(|e| err!("cannot copy {}: {e}", vmlinuz.display()))?;
    fs::write(tmp.join("recipe.txt"), key_text).map_err(|e| err!("cannot write recipe: {e}"))?;
    fs::remove_dir_all(&root).map_err(|e| err!("cannot clean {}: {e}", root.display()))?;
    let _ = fs::remove_dir_all(&out);
    fs::rename(&tmp, &out).map_err(|e| err!("cannot move image into {}: {e}", out.display()))?;
    eprintln!("tandem-images: built {}", out.display());
    Ok(image)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| err!("cannot read {}: {e}", path.display()))
}

fn assemble(recipe: &Recipe, root: &Path, abi: &str) -> Result<Vec<u8>> {
    let mut c = CpioWriter::new();
    for d in [
        "dev", "proc", "sys", "tmp", "run", "root", "etc", "usr/bin", "mnt",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    c.file("etc/group", 0o644, b"root:x:0:\n");

    let busybox = root.join("bin/busybox");
    c.file("bin/busybox", 0o755, &read(&busybox)?);
    let list = run(Command::new(&busybox).arg("--list"), "busybox --list")?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        c.symlink(&format!("bin/{applet}"), "busybox");
    }
    c.file("init", 0o755, recipe.init.as_bytes());
    for (path, text) in recipe.extra_files {
        c.file(path, 0o755, text.as_bytes());
    }

    // Modules, dependencies first, and the insmod lines /init runs.
    let moddir = format!("lib/modules/{abi}");
    let index = module_index(&root.join(&moddir))?;
    let builtin =
        fs::read_to_string(root.join(&moddir).join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for (m, _) in recipe.modules {
        let name = m.replace('-', "_");
        if !index.contains_key(&name) {
            let builtin_hit = builtin.lines().any(|l| {
                l.rsplit('/')
                    .next()
                    .map(|f| {
                        uncompressed_name(f)
                            .trim_end_matches(".ko")
                            .replace('-', "_")
                            == name
                    })
                    .unwrap_or(false)
            });
            if builtin_hit {
                continue;
            }
            return Err(err!(
                "kernel {abi} has no module `{m}` (neither loadable nor built in)"
            ));
        }
        visit(&name, &index, root, &mut seen, &mut order)?;
    }
    let params: BTreeMap<String, &str> = recipe
        .modules
        .iter()
        .map(|(m, p)| (m.replace('-', "_"), *p))
        .collect();
    let mut load = String::new();
    for name in &order {
        let (rel, ko) = (&index[name], read_module(&root.join(&index[name]))?);
        // Written uncompressed: busybox's insmod takes plain ELF.
        let rel = uncompressed_name(rel);
        c.file(rel, 0o644, &ko);
        let p = params.get(name).copied().unwrap_or("");
        load.push_str(&format!("/{rel} {p}\n"));
    }
    c.file("etc/tandem-modules", 0o644, load.as_bytes());

    // Binaries and the shared libraries the unpacked dynamic loader resolves for them.
    for bin in recipe.binaries {
        c.file(bin, 0o755, &read(&root.join(bin))?);
        let ld_real = root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
        let libpath = format!(
            "{}:{}",
            root.join("lib/x86_64-linux-gnu").display(),
            root.join("usr/lib/x86_64-linux-gnu").display()
        );
        let out = run(
            Command::new(&ld_real)
                .arg("--library-path")
                .arg(&libpath)
                .arg("--list")
                .arg(root.join(bin)),
            &format!("resolve libraries of {bin}"),
        )?;
        for line in out.lines() {
            let Some((_, rest)) = line.split_once("=> ") else {
                continue;
            };
            let path = rest.split(" (").next().unwrap_or("").trim();
            if path == "not found" || path.is_empty() {
                return Err(err!(
                    "{bin}: a library is missing from the unpacked packages: {}",
                    line.trim()
                ));
            }
            let p = Path::new(path);
            let rel = p.strip_prefix(root).unwrap_or(p);
            let rel = rel.to_string_lossy().trim_start_matches('/').to_string();
            c.file(&rel, 0o755, &read(&root.join(&rel))?);
        }
        c.file(
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            0o755,
            &read(&ld_real)?,
        );
        c.symlink(
            "lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
    }
    Ok(c.finish())
}

/// Module name (with `_`) → path relative to the unpacked root.
fn module_index(moddir: &Path) -> Result<BTreeMap<String, String>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    let root = moddir.ancestors().nth(3).unwrap_or(moddir).to_path_buf();
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| err!("cannot read {}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| uncompressed_name(n).strip_suffix(".ko"))
            {
                let rel = p
                    .strip_prefix(&root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                index.insert(name.replace('-', "_"), rel);
            }
        }
    }
    if index.is_empty() {
        return Err(err!("no kernel modules under {}", moddir.display()));
    }
    Ok(index)
}

/// Compression suffixes of kernel modules (Debian's 6.12 ships `.ko.xz`) and the tool
/// that undoes each.
const MODULE_COMPRESSION: [(&str, &str); 3] = [(".xz", "xz"), (".zst", "zstd"), (".gz", "gzip")];

/// `foo.ko.xz` → `foo.ko`.
fn uncompressed_name(name: &str) -> &str {
    MODULE_COMPRESSION
        .iter()
        .find_map(|(suffix, _)| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// A module's ELF, decompressed if its name says it is compressed.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let Some((_, tool)) = MODULE_COMPRESSION
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix))
    else {
        return read(path);
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            err!("cannot run `{tool}` to decompress {name}: {e} (scripts/setup installs xz-utils)")
        })?;
    if !out.status.success() {
        return Err(err!(
            "`{tool} -dc {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, String>,
    root: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some(rel) = index.get(name) else {
        return Err(err!(
            "module dependency `{name}` not found in the kernel package"
        ));
    };
    for dep in modinfo_depends(&read_module(&root.join(rel))?) {
        visit(&dep.replace('-', "_"), index, root, seen, order)?;
    }
    order.push(name.to_string());
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` ELF section.
fn modinfo_depends(elf: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a) as usize
        })
    };
    let section = || -> Option<&[u8]> {
        if elf.get(..4)? != b"\x7fELF" {
            return None;
        }
        let shoff = u64_at(0x28)?;
        let shentsize = u16_at(0x3a)?;
        let shnum = u16_at(0x3c)?;
        let shstrndx = u16_at(0x3e)?;
        let sh = |i: usize| shoff + i * shentsize;
        let stroff = u64_at(sh(shstrndx) + 0x18)?;
        for i in 0..shnum {
            let name_off = stroff + u32_at(sh(i))?;
            let name = elf.get(name_off..)?.split(|b| *b == 0).next()?;
            if name == b".modinfo" {
                let off = u64_at(sh(i) + 0x18)?;
                let size = u64_at(sh(i) + 0x20)?;
                return elf.get(off..off + size);
            }
        }
        None
    };
    let Some(info) = section() else {
        return Vec::new();
    };
    info.split(|b| *b == 0)
        .filter_map(|s| s.strip_prefix(b"depends="))
        .flat_map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect()
}

const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
read up _ < /proc/uptime
echo "TANDEM-INIT $up"
echo "1 4 1 7" > /proc/sys/kernel/printk
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# tandem.skip=a,b on the command line: modules not to load (a test loads them later).
skip=$(sed -n 's/.*tandem\.skip=\([^ ]*\).*/\1/p' /proc/cmdline)
while read -r ko params; do
    [ -n "$ko" ] || continue
    m=${ko##*/}; m=${m%.ko}
    case ",$skip," in *,$m,*) echo "TANDEM-INIT skipped $m"; continue;; esac
    insmod $ko $params || echo "TANDEM-INIT-WARN insmod $ko failed"
done < /etc/tandem-modules
hostname tandem-guest
ip link set lo up
# A watchdog: an agent command still running after 30 s gets the tasks that are
# blocked or running (state, kernel wait channel, kernel stack) and sysrq w's report
# on the console, where the harness's timeout error shows them (the console
# loglevel above hides the kernel's own report). The harness drops these lines from a
# command's output.
( last=; while sleep 5; do
    read -r id since 2>/dev/null < /tmp/.agent-busy || continue
    read up _ < /proc/uptime
    [ "$id" != "$last" ] && [ $(( ${up%.*} - since )) -ge 30 ] || continue
    last=$id
    tasks=$(for p in /proc/[0-9]*; do
        st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' $p/status 2>/dev/null)
        case $st in D|R) echo "$st ${p#/proc/} $(cat $p/comm 2>/dev/null) $(cat $p/wchan 2>/dev/null)"
            sed 's/^/    /' $p/stack 2>/dev/null
            sleep 1; echo "  a second later:"; sed -n 's/^/    /; 1,4p' $p/stack 2>/dev/null;; esac
    done)
    echo w > /proc/sysrq-trigger
    dump=$(dmesg | awk '/sysrq: Show Blocked State/ { b = "" } { b = b $0 "\n" } END { printf "%s", b }' | tail -n 50)
    read -r now _ 2>/dev/null < /tmp/.agent-busy && [ "$now" = "$id" ] || continue
    printf '%s\n' "agent command $id has run for 30 s; tasks running or blocked:" "$tasks" "sysrq w:" "$dump" \
        | sed 's/^/TANDEM-WATCHDOG /' > /dev/ttyS0
done ) &
while :; do /bin/tandem-agent; sleep 1; done
"#;

/// The guest agent: reads `<id> <base64 command>` lines on COM1 and answers with
/// `@@BEGIN <id>@@`, the command's output, `@@END <id> <status>@@`.
const AGENT: &str = r#"#!/bin/sh
tty=/dev/ttyS0
stty -F $tty raw -echo
exec <$tty >$tty 2>&1
cd /
printf '\n@@AGENT-READY@@\n'
while IFS=' ' read -r id b64; do
    id=${id%$(printf '\r')}
    b64=${b64%$(printf '\r')}
    [ -n "$id" ] || continue
    if echo "$b64" | base64 -d > /tmp/.agent-cmd 2>/dev/null; then
        read up _ < /proc/uptime
        echo "$id ${up%.*}" > /tmp/.agent-busy
        sh /tmp/.agent-cmd </dev/null >/tmp/.agent-out 2>&1
        st=$?
        rm -f /tmp/.agent-busy
    else
        echo "agent: bad base64" > /tmp/.agent-out
        st=254
    fi
    printf '\n@@BEGIN %s@@\n' "$id"
    cat /tmp/.agent-out
    printf '\n@@END %s %d@@\n' "$id" "$st"
done
"#;

/// L1's init. Stage markers go to the console (ttyS0); the job's output to ttyS1.
/// `TANDEM_WORK` (the rw 9p work dir's path on the outer machine) comes from the kernel
/// command line.
const HOST_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
stage() { read up _ < /proc/uptime; echo "TANDEM-STAGE $1 $up"; }
fail() { stage "failed: $1"; echo "TANDEM-FAIL $1"; poweroff -f; }
stage init
# A heartbeat on the console: the watchdog tells a frozen L1 (no beat) from a
# job that merely takes long (beats go on).
( while :; do read up _ < /proc/uptime; echo "TANDEM-BEAT $up"; sleep 5; done ) &
echo "1 4 1 7" > /proc/sys/kernel/printk
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stage modules
while read -r ko params; do
    [ -n "$ko" ] || continue
    insmod $ko $params || fail "insmod $ko"
done < /etc/tandem-modules
stage 9p
[ -n "$TANDEM_WORK" ] || fail "no TANDEM_WORK= on the kernel command line"
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fail "mount hostroot"
# A checkout under /tmp (CI may clone there) must stay visible through the
# chroot's fresh /tmp: set its top directory aside and bind it back.
keep=""
case "$TANDEM_WORK" in /tmp/*) keep=${TANDEM_WORK#/tmp/}; keep=${keep%%/*} ;; esac
if [ -n "$keep" ]; then
    mkdir -p /keep && mount --bind "/host/tmp/$keep" /keep || fail "set aside /tmp/$keep"
fi
mount -t tmpfs tmpfs /host/tmp || fail "tmpfs /host/tmp"
if [ -n "$keep" ]; then
    mkdir -p "/host/tmp/$keep" && mount --bind /keep "/host/tmp/$keep" || fail "bind /tmp/$keep back"
fi
mount -t tmpfs tmpfs /host/run || fail "tmpfs /host/run"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work "/host$TANDEM_WORK" || fail "mount work dir"
mount -t proc proc /host/proc || fail "proc in chroot"
mount -t sysfs sysfs /host/sys || fail "sysfs in chroot"
mount --bind /dev /host/dev || fail "bind /dev into chroot"
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts
stage network
ip link set lo up
# Each job builds its own bridge over this uplink, in a network namespace of its own.
uplink=
for n in /sys/class/net/*; do
    drv=$(readlink $n/device/driver)
    [ "${drv##*/}" = virtio_net ] && uplink=${n##*/}
done
[ -n "$uplink" ] || fail "no virtio-net uplink"
stage vfio
nics=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x10d3 ] || continue
    bdf=${d##*/}
    echo vfio-pci > $d/driver_override
    echo $bdf > /sys/bus/pci/drivers_probe
    g=$(readlink $d/iommu_group); g=${g##*/}
    [ -n "$g" ] && [ -e /dev/vfio/$g ] || fail "bind $bdf to vfio-pci (iommu group '$g')"
    nics="$nics $bdf:$g"
done
echo "TANDEM-VFIO$nics"
W="/host$TANDEM_WORK"
n=1
stage ready
while :; do
    if [ -e "$W/jobs/$n/job.sh" ]; then
        stage "job-$n"
        echo "TANDEM-JOB-START $n" > /dev/ttyS1
        chroot /host /bin/sh "$TANDEM_WORK/jobs/$n/job.sh" </dev/null >/dev/ttyS1 2>&1
        st=$?
        echo $st > "$W/jobs/$n/exit-status"
        echo "TANDEM-JOB-END $n $st" > /dev/ttyS1
        stage ready
        n=$((n+1))
    elif [ -e "$W/poweroff" ]; then
        break
    else
        sleep 0.2
    fi
done
stage done
sync
umount "$W"
poweroff -f
"#;
