//! Faults: a worker with another model or another placement is refused; a peer without the secret cannot
//! join; a worker killed or frozen mid-generation fails the request within 5 s; a spawned worker that exits
//! before joining fails the head at once.

mod common;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped, and the file its log goes to.
struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Worker `b` of `placement`; it logs at info level to `worker-b.log` beside the placement (appended, so a
/// restarted worker's log follows the first one's).
fn worker(placement: &Path, extra: &[&str], secret: &str) -> Proc {
    let log = placement.with_file_name("worker-b.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut c = kimi();
    c.args([
        "node",
        "--placement",
        placement.to_str().unwrap(),
        "--name",
        "b",
        "--log",
        "info",
    ])
    .args(extra);
    c.env("KIMI_TEST_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(file);
    Proc(c.spawn().unwrap(), log)
}

/// Runs `logits` as the head of placement `p` with `extra` arguments; it must fail: its stderr.
fn head_fails(p: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "logits",
        "--placement",
        p.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ];
    args.extend(extra);
    let out = kimi().args(&args).output().unwrap();
    assert!(!out.status.success(), "kimi-actors {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Points node `b` (the last node of `p`) at `model`.
fn set_worker_model(p: &Path, model: &Path) {
    let text = std::fs::read_to_string(p).unwrap();
    let pos = text.rfind("model = ").unwrap();
    let line_end = pos + text[pos..].find('\n').unwrap();
    let text = format!(
        "{}model = \"{}\"{}",
        &text[..pos],
        model.display(),
        &text[line_end..]
    );
    std::fs::write(p, text).unwrap();
}

#[test]
fn a_spawned_worker_that_exits_fails_the_head_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = two_node_placement(
        dir.path(),
        "layer-split",
        &fixture("tiny-kimi-mlx-mixed"),
        "",
    );
    // Worker `b` is pointed at a model that does not exist: it exits while the head waits for it.
    set_worker_model(&p, &dir.path().join("no-such-model"));
    let t = Instant::now();
    let err = head_fails(&p, &["--spawn-local"]);
    assert!(err.contains("node `b` exited"), "{err}");
    // The default `--wait` is 300 s.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

#[test]
fn a_worker_with_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = two_node_placement(
        dir.path(),
        "expert-split",
        &fixture("tiny-kimi-mlx-mixed"),
        "",
    );
    // Node b points at another checkpoint of the same architecture.
    set_worker_model(&p, &fixture("tiny-kimi-bf16"));
    let _b = worker(&p, &[], SECRET);
    let err = head_fails(&p, &["--wait", "20"]);
    assert!(
        err.contains("refused") && err.contains("node `b` has a different model"),
        "{err}"
    );
}

#[test]
fn a_worker_with_another_placement_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-kimi-mlx-mixed");
    let p = two_node_placement(dir.path(), "expert-split", &model, "");
    let theirs = dir.path().join("theirs.toml");
    std::fs::write(
        &theirs,
        std::fs::read_to_string(&p).unwrap() + "[experts]\na = \"0-3\"\nb = \"4-15\"\n",
    )
    .unwrap();
    let _b = worker(&theirs, &[], SECRET);
    let err = head_fails(&p, &["--wait", "20"]);
    assert!(
        err.contains("refused") && err.contains("different placement"),
        "{err}"
    );
}

#[test]
fn a_worker_without_the_secret_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let p = two_node_placement(
        dir.path(),
        "expert-split",
        &fixture("tiny-kimi-mlx-mixed"),
        "",
    );
    let _b = worker(&p, &[], "not-the-secret");
    let t = Instant::now();
    let err = head_fails(&p, &["--wait", "4"]);
    assert!(err.contains("no authenticated cluster session"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// Starts a long generation against worker `b`, waits for tokens, applies `fault` to the worker, and
/// returns how long the head took to fail after it, with its error and the worker's log.
fn fault_during_generation(mode: &str, fault: impl FnOnce(u32)) -> (Duration, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = two_node_placement(dir.path(), mode, &story_model(), "");
    let b = worker(&p, &[], SECRET);
    let mut head = kimi()
        .args([
            "generate",
            "--placement",
            p.to_str().unwrap(),
            "--prompt",
            "ROMEO:",
            "--max-tokens",
            "1000000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    head.stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    fault(b.0.id());
    let t = Instant::now();
    let deadline = t + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = head.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the head did not fail");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    assert!(!status.success());
    let mut err = String::new();
    head.stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let log = b.1.clone();
    drop(b);
    (took, err, std::fs::read_to_string(log).unwrap_or_default())
}

#[test]
fn killing_a_worker_mid_generation_fails_within_5_s() {
    for mode in ["expert-split", "layer-split"] {
        let (took, err, log) = fault_during_generation(mode, |pid| {
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
        });
        assert!(took < Duration::from_secs(5), "{mode}: {took:?}");
        assert!(
            err.contains("node `b` is down"),
            "{mode}: {err}\nworker b:\n{log}"
        );
    }
}

#[test]
fn a_frozen_worker_is_caught_by_the_heartbeat() {
    let (took, err, log) = fault_during_generation("expert-split", |pid| {
        std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
    });
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(err.contains("no heartbeat"), "{err}\nworker b:\n{log}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next(ws: &mut Ws) -> serde_json::Value {
    use futures::StreamExt;
    let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let tokio_tungstenite::tungstenite::Message::Text(t) = m else {
        panic!("not text")
    };
    serde_json::from_str(t.as_str()).unwrap()
}

/// Under `serve`: a worker killed mid-generation gives the client an error frame within 5 s, the head stays
/// up (reporting the node down), and once the worker is back the next request succeeds.
#[test]
fn the_head_survives_a_worker_and_serves_again_after_its_restart() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let p = two_node_placement(dir.path(), "expert-split", &story_model(), "");
    let b = worker(&p, &[], SECRET);
    let server = Server::start(&["--placement", p.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
            .await
            .unwrap();
        ws.send(Message::text(
            r#"{"prompt": "ROMEO:", "max_tokens": 30000}"#,
        ))
        .await
        .unwrap();
        assert_eq!(next(&mut ws).await["type"], "token");
        drop(b); // kill -9
        let t = Instant::now();
        let error = loop {
            let f = next(&mut ws).await;
            if f["type"] == "error" {
                break f;
            }
        };
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("node `b` is down"),
            "{error}"
        );

        let http = reqwest::Client::new();
        let health = http.get(server.url("/health")).send().await.unwrap();
        assert_eq!(
            health.status(),
            503,
            "the head is up and reports the node down"
        );

        let _b = worker(&p, &[], SECRET);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .status()
            != 200
        {
            assert!(
                Instant::now() < deadline,
                "the head did not reconnect the restarted worker"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ws.send(Message::text(r#"{"prompt": "ROMEO:", "max_tokens": 5}"#))
            .await
            .unwrap();
        let mut tokens = 0;
        loop {
            let f = next(&mut ws).await;
            match f["type"].as_str().unwrap() {
                "token" => tokens += 1,
                "done" => break,
                other => panic!("{other}: {f}"),
            }
        }
        assert_eq!(tokens, 5);
    });
}
