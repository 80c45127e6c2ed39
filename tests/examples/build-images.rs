//! Builds (or finds in the cache) every image and prints its paths and kernel:
//! the test guest on each guest kernel, and the test host.
use harness::image::{self, GuestKernel};

fn main() {
    let mut images: Vec<(String, harness::Result<harness::GuestImage>)> = GuestKernel::ALL
        .iter()
        .map(|k| {
            (
                format!("test-guest ({})", k.source()),
                image::test_guest_with(*k),
            )
        })
        .collect();
    images.push(("test-host".into(), image::test_host()));
    for (name, r) in images {
        match r {
            Ok(i) => println!(
                "{name}: kernel {} ({}), initramfs {}",
                i.kernel_version,
                i.kernel.display(),
                i.initramfs.display()
            ),
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
    }
}
