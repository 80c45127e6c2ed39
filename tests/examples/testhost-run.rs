//! Runs a command inside the test host by hand: `testhost-run <cmd> [args...]`.
fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!("usage: testhost-run <command> [args...]");
        std::process::exit(2);
    }
    match harness::testhost::TestHost::new("manual").run(&argv) {
        Ok(o) => {
            eprintln!(
                "status {} boot {:.1}s total {:.1}s",
                o.status,
                o.boot_time.as_secs_f64(),
                o.total_time.as_secs_f64()
            );
            std::process::exit(o.status);
        }
        Err(e) => {
            eprintln!("testhost-run: {e}");
            std::process::exit(1);
        }
    }
}
