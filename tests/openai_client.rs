//! The server driven by the official OpenAI Python client (`tests/tools/openai_check.py`; `.ci/run`
//! installs Python's `openai` package).

mod common;
use common::*;

#[test]
fn the_openai_python_client_works_against_the_server() {
    let server = Server::start_env(&[], &[("KIMI_API_KEY", "sk-test")]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/openai_check.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(server.url(""))
        .arg("sk-test")
        .output()
        .expect("python3 (run .ci/run to install the test tools)");
    assert!(
        out.status.success(),
        "{}\n{}\n(the `openai` package is installed by .ci/run)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
