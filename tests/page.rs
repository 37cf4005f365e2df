//! The page at `/` in a real headless browser (`tests/tools/page_check.py`: Debian's chromium and
//! chromedriver with Python's selenium, installed by `.ci/run`): type a prompt, see tokens arrive, see the
//! expert heatmap change.

mod common;
use common::*;

#[test]
fn the_page_streams_a_reply_and_updates_the_heatmap() {
    let server = Server::start(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/page_check.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(server.url("/"))
        .output()
        .expect("python3 (run .ci/run to install the test tools)");
    assert!(
        out.status.success(),
        "{}\n{}\n(chromium, chromium-driver and selenium are installed by .ci/run)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
