//! `tandem`: run a VM, or talk to a running one.

mod acpi;
mod boot;
mod config;
mod control;
mod cpu;
mod device_manager;
mod events;
mod failover;
mod interrupts;
mod layout;
mod memory;
mod migration;
mod seccomp;
mod steer;
mod vcpu;
mod vfio;
mod vm;
mod vmstate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, VmConfig};
use crate::control::{Exit, Vmm};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "A KVM virtual machine monitor built for failover-aware live migration of passthrough NICs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest.
    Run(RunArgs),
    /// Send a command to a running tandem through its API socket.
    Remote(RemoteArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: a bzImage or an uncompressed 64-bit ELF vmlinux.
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    kernel: Option<PathBuf>,
    /// Receive a live migration on tcp:HOST:PORT or unix:PATH instead of booting:
    /// the VM's configuration comes from the source; give each NIC's tap with
    /// --net id=ID,tap=NAME (other keys, if given, must agree with the source), and
    /// this host's passthrough devices with --device (a failover primary is plugged
    /// once the migrated standby reports STANDBY acked).
    #[arg(long, value_name = "URL", conflicts_with_all = ["kernel", "initramfs"])]
    incoming: Option<String>,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// vCPUs: boot=N (1 to 254).
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    cpus: String,
    /// Guest RAM: size=SIZE with K, M, G or T suffix (at least 64M).
    #[arg(long, value_name = "size=SIZE", default_value = "size=512M")]
    memory: String,
    /// COM1: tty (this terminal), off, file=PATH (output only) or
    /// socket=PATH (tandem listens; one client at a time reads output and sends input).
    #[arg(long, value_name = "MODE", default_value = "tty")]
    serial: String,
    /// Serve the control API on this unix socket: path=PATH or PATH.
    #[arg(long, value_name = "path=PATH")]
    api_socket: Option<String>,
    /// A virtio-net NIC on an existing tap (repeatable):
    /// id=ID,tap=NAME,mac=MAC[,standby=on][,num_queues=N][,queue_size=N][,mtu=N][,slot=S].
    /// standby=on offers VIRTIO_NET_F_STANDBY (the standby half of a failover pair);
    /// num_queues counts rx+tx queues (2 per pair, default 2); queue_size defaults to 256.
    #[arg(long, value_name = "id=ID,tap=NAME,mac=MAC,...")]
    net: Vec<String>,
    /// A host PCI function passed through with VFIO (repeatable):
    /// id=ID,path=/sys/bus/pci/devices/BDF[,failover=STANDBY_ID][,slot=S].
    /// The function must be bound to vfio-pci. failover= makes it the primary of a
    /// standby NIC: hidden until the guest's driver acks STANDBY on that NIC.
    #[arg(long, value_name = "id=ID,path=PATH,...")]
    device: Vec<String>,
    /// seccomp filters, one per thread kind: on (a forbidden system call ends
    /// tandem, naming the thread and the call), off, or log (forbidden calls go
    /// through and the kernel logs them).
    #[arg(long, value_name = "MODE", value_enum, default_value = "on")]
    seccomp: seccomp::Mode,
}

#[derive(Args)]
struct RemoteArgs {
    /// The API socket of the running tandem.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// One of: ping, info, pause, resume, shutdown, reboot, add-net, add-device,
    /// remove-device, send-migration, cancel-migration, events.
    command: String,
    /// add-net: id=ID,tap=NAME,mac=MAC[,standby=on][,num_queues=N][,queue_size=N][,mtu=N][,slot=S]
    /// (the --net syntax). add-device: id=ID,path=PATH[,failover=STANDBY_ID][,slot=S]
    /// (the --device syntax). remove-device: ID [--surprise] [--timeout-ms N]
    /// [--on-timeout error|surprise]. send-migration: URL [--downtime-ms N]
    /// [--bandwidth-mbps N] [--timeout-s N] [--unplug-timeout-ms N] (prints progress,
    /// then the result).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The JSON body for `command` from its arguments.
fn remote_body(command: &str, args: &[String]) -> Result<Option<String>, String> {
    match command {
        "add-net" => match args {
            [spec] => Ok(Some(api::kv_to_json(api::SpecBody::Net, spec)?.to_string())),
            _ => Err("add-net takes one argument: id=ID,tap=NAME,mac=MAC,...".into()),
        },
        "add-device" => match args {
            [spec] => Ok(Some(
                api::kv_to_json(api::SpecBody::Device, spec)?.to_string(),
            )),
            _ => {
                Err("add-device takes one argument: id=ID,path=/sys/bus/pci/devices/BDF,...".into())
            }
        },
        "send-migration" => {
            let mut it = args.iter();
            let url = it.next().filter(|a| !a.starts_with('-')).ok_or(
                "send-migration takes the destination URL first (tcp:HOST:PORT or unix:PATH)",
            )?;
            let mut body = serde_json::json!({ "url": url });
            while let Some(a) = it.next() {
                let key = match a.as_str() {
                    "--downtime-ms" => "downtime_ms",
                    "--bandwidth-mbps" => "bandwidth_mbps",
                    "--timeout-s" => "timeout_s",
                    "--unplug-timeout-ms" => "unplug_timeout_ms",
                    other => return Err(format!("send-migration: unknown option {other}")),
                };
                let v = it.next().ok_or(format!("{a} needs a value"))?;
                let n: u64 = v.parse().map_err(|_| format!("{a} {v}: not a number"))?;
                body[key] = n.into();
            }
            Ok(Some(body.to_string()))
        }
        "remove-device" => {
            let mut it = args.iter();
            let id = it
                .next()
                .filter(|a| !a.starts_with('-'))
                .ok_or("remove-device takes a device id first")?;
            let mut body = serde_json::json!({ "id": id });
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--surprise" => body["surprise"] = true.into(),
                    "--timeout-ms" => {
                        let v = it.next().ok_or("--timeout-ms needs a value")?;
                        let ms: u64 = v
                            .parse()
                            .map_err(|_| format!("--timeout-ms {v}: not a number"))?;
                        body["timeout_ms"] = ms.into();
                    }
                    "--on-timeout" => {
                        let v = it.next().ok_or("--on-timeout needs error or surprise")?;
                        if v != "error" && v != "surprise" {
                            return Err(format!("--on-timeout {v}: expected error or surprise"));
                        }
                        body["on_timeout"] = v.as_str().into();
                    }
                    other => return Err(format!("remove-device: unknown option {other}")),
                }
            }
            Ok(Some(body.to_string()))
        }
        _ if args.is_empty() => Ok(None),
        _ => Err(format!("{command} takes no arguments")),
    }
}

/// Every `--device`, parsed (ids default to devN by position).
fn parse_devices(specs: &[String]) -> Result<Vec<config::DeviceSpec>, ConfigError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| config::parse_device(s, i))
        .collect()
}

fn build_config(a: RunArgs) -> Result<VmConfig, ConfigError> {
    if let Some(url) = &a.incoming {
        migration::Url::parse(url).map_err(ConfigError::Incoming)?;
        let nets = a
            .net
            .iter()
            .enumerate()
            .map(|(i, s)| config::parse_incoming_net(s, i))
            .collect::<Result<Vec<_>, _>>()?;
        // What can be checked before the source says which NICs the guest has: the
        // keys, the host function, ids and functions not given twice. Pairing and
        // slots are checked against the source's NICs before any memory moves.
        let devices = parse_devices(&a.device)?;
        let unpaired: Vec<_> = devices
            .iter()
            .map(|d| config::DeviceSpec {
                failover: None,
                ..d.clone()
            })
            .collect();
        config::check_devices(&[], &unpaired)?;
        for d in &devices {
            config::check_vfio_host(d)?;
        }
        return Ok(VmConfig {
            nets: vec![],
            devices: vec![],
            vcpus: 1,
            memory_bytes: 0,
            serial: config::parse_serial(&a.serial)?,
            api_socket: a
                .api_socket
                .as_deref()
                .map(config::parse_api_socket)
                .transpose()?,
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            incoming: Some(config::IncomingSpec {
                url: url.clone(),
                nets,
                devices,
            }),
            boot: None,
        });
    }
    let kernel = a.kernel.unwrap_or_default();
    let boot = config::BootFiles::open(&kernel, a.initramfs.as_deref())?;
    if a.cmdline.contains('\0') {
        return Err(ConfigError::Cmdline("contains a NUL byte".into()));
    }
    let nets = a
        .net
        .iter()
        .enumerate()
        .map(|(i, s)| config::parse_net(s, i))
        .collect::<Result<Vec<_>, _>>()?;
    config::check_nets(&nets)?;
    let devices = parse_devices(&a.device)?;
    config::check_devices(&nets, &devices)?;
    for d in &devices {
        config::check_vfio_host(d)?;
        if let Some(note) = config::check_primary_mac(d, &nets)? {
            tracing::info!("{note}");
        }
    }
    Ok(VmConfig {
        nets,
        devices,
        vcpus: config::parse_cpus(&a.cpus)?,
        memory_bytes: config::parse_memory(&a.memory, config::host_memory_bytes())?,
        serial: config::parse_serial(&a.serial)?,
        api_socket: a
            .api_socket
            .as_deref()
            .map(config::parse_api_socket)
            .transpose()?,
        kernel,
        initramfs: a.initramfs,
        cmdline: a.cmdline,
        incoming: None,
        boot: Some(std::sync::Arc::new(boot)),
    })
}

fn run(a: RunArgs) -> ExitCode {
    let mode = a.seccomp;
    let cfg = match build_config(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = seccomp::init(mode) {
        eprintln!("tandem: {e}");
        return ExitCode::FAILURE;
    }
    let signals = match control::block_exit_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tandem: cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let vmm = match Vmm::new(cfg, signals) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::FAILURE;
        }
    };
    match vmm.run() {
        Ok(Exit::Shutdown) => ExitCode::SUCCESS,
        Ok(Exit::Migrated) => {
            eprintln!("tandem: the guest migrated; it runs on the destination now");
            ExitCode::SUCCESS
        }
        Ok(Exit::Signal(sig)) => {
            eprintln!("tandem: stopped by signal {sig}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::FAILURE
        }
    }
}

fn remote(a: RemoteArgs) -> ExitCode {
    let Some(endpoint) = api::Endpoint::from_command(&a.command) else {
        let names: Vec<&str> = api::ENDPOINTS.iter().map(|r| r.3).collect();
        eprintln!(
            "tandem remote: unknown command '{}' (expected one of: {})",
            a.command,
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if endpoint == api::Endpoint::Events {
        return remote_events(&a.api_socket, &endpoint.path());
    }
    if endpoint == api::Endpoint::VmSendMigration {
        return match remote_body(&a.command, &a.args) {
            Ok(Some(body)) => remote_send_migration(&a.api_socket, &body),
            Ok(None) => ExitCode::from(2),
            Err(e) => {
                eprintln!("tandem remote: {e}");
                ExitCode::from(2)
            }
        };
    }
    let body = match remote_body(&a.command, &a.args) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tandem remote: {e}");
            return ExitCode::from(2);
        }
    };
    match api::client::request(
        &a.api_socket,
        endpoint.method().as_str(),
        &endpoint.path(),
        body.as_deref(),
    ) {
        Ok(r) if (200..300).contains(&r.status) => {
            if !r.body.is_empty() {
                match serde_json::from_str::<serde_json::Value>(&r.body) {
                    Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(r.body)),
                    Err(_) => println!("{}", r.body),
                }
            }
            ExitCode::SUCCESS
        }
        Ok(r) => refused(r),
        Err(e) => {
            eprintln!("tandem remote: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error answer: its message and status on stderr.
fn refused(r: api::client::Response) -> ExitCode {
    let msg = serde_json::from_str::<api::ErrorBody>(&r.body)
        .map(|e| e.error)
        .unwrap_or(r.body);
    eprintln!("tandem remote: {} (HTTP {})", msg, r.status);
    ExitCode::FAILURE
}

/// `tandem remote send-migration`: start it, print its progress as it goes and its
/// result at the end. Exit status 0 only if the destination runs the guest.
fn remote_send_migration(socket: &std::path::Path, body: &str) -> ExitCode {
    let mut outcome: Option<Result<String, String>> = None;
    let mut start_error = None;
    let streamed = api::client::stream_lines_from(
        socket,
        &api::Endpoint::Events.path(),
        || {
            let ep = api::Endpoint::VmSendMigration;
            match api::client::request(socket, ep.method().as_str(), &ep.path(), Some(body)) {
                Ok(r) if (200..300).contains(&r.status) => true,
                Ok(r) => {
                    start_error = Some(refused(r));
                    false
                }
                Err(e) => {
                    eprintln!("tandem remote: {e}");
                    start_error = Some(ExitCode::FAILURE);
                    false
                }
            }
        },
        |line| {
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
                return true;
            };
            let n = |k: &str| ev.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            match ev.get("type").and_then(|t| t.as_str()).unwrap_or("") {
                "migration-started" => println!("migration to {} started", ev["url"].as_str().unwrap_or("?")),
                "migration-progress" => println!(
                    "round {:>2}: {:>8} KiB sent, {:>7} pages left, {:>6} Mbit/s, downtime estimate {} ms{}",
                    n("round"),
                    n("bytes_sent") >> 10,
                    n("pages_left"),
                    n("rate_mbps"),
                    n("estimated_downtime_ms"),
                    if ev["phase"].as_str() == Some("wait-destination") {
                        " (the destination is opening its passthrough functions)"
                    } else {
                        ""
                    }
                ),
                "migration-paused" => println!(
                    "guest paused after round {} with {} pages left",
                    n("round"),
                    n("pages_left")
                ),
                // A failover primary leaving before the copying (or back after a failure).
                kind @ ("eject-requested" | "device-released" | "surprise-removed"
                | "removal-timed-out" | "primary-plugged") => println!(
                    "failover primary {}: {} (slot {})",
                    ev["device"].as_str().unwrap_or("?"),
                    match kind {
                        "eject-requested" => "the guest is asked to release it",
                        "device-released" => "released by the guest",
                        "surprise-removed" => "removed by surprise",
                        "removal-timed-out" => "the guest did not release it in time",
                        _ => "plugged again",
                    },
                    n("slot")
                ),
                "migration-completed" => {
                    outcome = Some(Ok(format!(
                        "completed in {} ms: downtime {} ms, {} rounds, {} MiB sent",
                        n("elapsed_ms"),
                        n("downtime_ms"),
                        n("round") + 1,
                        n("bytes_sent") >> 20
                    )));
                    return false;
                }
                "migration-failed" => {
                    outcome = Some(Err(format!(
                        "failed: {}; the guest {}",
                        ev["reason"].as_str().unwrap_or("?"),
                        ev["guest"].as_str().unwrap_or("?")
                    )));
                    return false;
                }
                _ => {}
            }
            true
        },
    );
    if let Some(code) = start_error {
        return code;
    }
    match (streamed, outcome) {
        (_, Some(Ok(msg))) => {
            println!("migration {msg}");
            ExitCode::SUCCESS
        }
        (_, Some(Err(msg))) => {
            eprintln!("tandem remote: migration {msg}");
            ExitCode::FAILURE
        }
        (Ok(Err(r)), None) => refused(r),
        (Err(e), None) => {
            eprintln!("tandem remote: the event stream broke before the migration ended: {e}");
            ExitCode::FAILURE
        }
        (Ok(Ok(())), None) => {
            eprintln!("tandem remote: the VMM went away before the migration ended");
            ExitCode::FAILURE
        }
    }
}

/// `tandem remote events`: print each event line as it comes, until the VMM goes.
fn remote_events(socket: &std::path::Path, path: &str) -> ExitCode {
    match api::client::stream_lines(socket, path, |line| {
        println!("{line}");
        true
    }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(r)) => refused(r),
        Err(e) => {
            eprintln!("tandem remote: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a test's capture gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Run(a) => run(a),
        Command::Remote(a) => remote(a),
    }
}
