//! Builds (or finds in the cache) both images and prints their paths.
fn main() {
    for (name, r) in [
        ("test-guest", harness::image::test_guest()),
        ("test-host", harness::image::test_host()),
    ] {
        match r {
            Ok(i) => println!(
                "{name}: kernel={} initramfs={} version={}",
                i.kernel.display(),
                i.initramfs.display(),
                i.kernel_version
            ),
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
    }
}
