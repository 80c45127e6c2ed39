//! Where guest-boot tests run: directly on hardware KVM, or inside the test host.

use std::fmt;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// /dev/kvm is hardware-backed (kvm_intel or kvm_amd): tests boot guests here.
    Direct,
    /// Tests run inside an L1 Linux under QEMU TCG (see `testhost`).
    TestHost,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::TestHost => "testhost",
        })
    }
}

/// True in the process the test host's job runs (inside L1).
pub fn in_testhost() -> bool {
    std::env::var_os("TANDEM_IN_TESTHOST").is_some()
}

impl Mode {
    /// Chooses the mode and says why. `TANDEM_TEST_MODE=direct|testhost` forces it.
    pub fn detect() -> crate::Result<(Mode, String)> {
        if in_testhost() {
            return Ok((Mode::TestHost, "running inside the test host (L1)".into()));
        }
        match std::env::var("TANDEM_TEST_MODE").ok().as_deref() {
            Some("direct") => {
                return Ok((Mode::Direct, "forced by TANDEM_TEST_MODE=direct".into()))
            }
            Some("testhost") => {
                return Ok((Mode::TestHost, "forced by TANDEM_TEST_MODE=testhost".into()))
            }
            Some("") | None => {}
            Some(other) => {
                return Err(crate::err!(
                    "TANDEM_TEST_MODE={other:?} is not `direct` or `testhost`"
                ));
            }
        }
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !usable {
            return Ok((Mode::TestHost, "/dev/kvm is absent or not usable".into()));
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return Ok((
                Mode::TestHost,
                "/dev/kvm is kvm_pvm (software KVM that cannot boot Linux)".into(),
            ));
        }
        for m in ["kvm_intel", "kvm_amd"] {
            if Path::new("/sys/module").join(m).exists() {
                return Ok((Mode::Direct, format!("/dev/kvm is hardware KVM ({m})")));
            }
        }
        Ok((
            Mode::TestHost,
            "/dev/kvm is neither kvm_intel nor kvm_amd".into(),
        ))
    }
}
