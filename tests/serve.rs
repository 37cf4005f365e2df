//! `kimi-actors serve`: the WebSocket protocol, the OpenAI-compatible API, bad input, the API key,
//! batching of concurrent requests, disconnects and the prompt-prefix cache.

mod common;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(server: &Server) -> Ws {
    tokio_tungstenite::connect_async(server.ws_url())
        .await
        .unwrap()
        .0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// Collects a generation: its text, token count, and the `done` frame.
async fn generation(ws: &mut Ws) -> (String, usize, Value) {
    let (mut text, mut n) = (String::new(), 0);
    loop {
        let f = recv(ws).await;
        match f["type"].as_str().unwrap() {
            "token" => {
                text.push_str(f["text"].as_str().unwrap());
                n += 1;
            }
            "done" => return (text, n, f),
            other => panic!("unexpected {other}: {f}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_streams_tokens_then_done_and_takes_several_requests() {
    let server = Server::start(&[]);
    let mut ws = ws(&server).await;
    let samples = json(&fixture("tiny-kimi-story-samples.json"));
    let want = samples["models"]["mlx_mixed"][1]["text"].as_str().unwrap();
    send(
        &mut ws,
        serde_json::json!({"prompt": "To be, or not to be", "max_tokens": 60}),
    )
    .await;
    let (text, n, done) = generation(&mut ws).await;
    assert_eq!(text, want, "greedy output of the bundled model");
    assert_eq!(n, 60);
    assert_eq!(done["usage"]["completion_tokens"], 60);
    assert_eq!(done["usage"]["prompt_tokens"], 8);
    assert!(done["timings"]["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(done["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(done["finish_reason"], "length");

    // A chat on the same socket stops at end of turn.
    send(&mut ws, serde_json::json!({"messages": [{"role": "user", "content": "Good morrow, sir. What news from the court?"}]})).await;
    let (text, _, done) = generation(&mut ws).await;
    assert_eq!(text, "I am glad to see you.");
    assert_eq!(done["finish_reason"], "stop");

    // Stop strings.
    send(&mut ws, serde_json::json!({"prompt": "To be, or not to be", "max_tokens": 60, "stop": ["pitch", "\n\nKING"]})).await;
    let (text, _, _) = generation(&mut ws).await;
    assert_eq!(text, want.split("\n\nKING").next().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_generation_and_the_socket_goes_on() {
    let server = Server::start(&[]);
    let mut ws = ws(&server).await;
    send(
        &mut ws,
        serde_json::json!({"prompt": "ROMEO:", "max_tokens": 5000}),
    )
    .await;
    let first = recv(&mut ws).await;
    assert_eq!(first["type"], "token");
    send(&mut ws, serde_json::json!({"type": "cancel"})).await;
    loop {
        let f = recv(&mut ws).await;
        if f["type"] == "cancelled" {
            break;
        }
        assert_eq!(f["type"], "token");
    }
    send(
        &mut ws,
        serde_json::json!({"prompt": "ROMEO:", "max_tokens": 3}),
    )
    .await;
    let (_, n, _) = generation(&mut ws).await;
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_bad_input_gets_error_frames_and_the_socket_stays_open() {
    let server = Server::start(&["--context", "64"]);
    let mut ws = ws(&server).await;
    let long = "word ".repeat(200);
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "invalid request"),
        (
            Message::text(r#"{"prompt": "x", "colour": 1}"#),
            "unknown field `colour`",
        ),
        (Message::text(r#"{"prompt": 5}"#), "invalid type"),
        (Message::text(r#"{"messages": []}"#), "`messages` is empty"),
        (
            Message::text(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#),
            "messages[0].role",
        ),
        (Message::text(r#"{}"#), "give `messages` or `prompt`"),
        (
            Message::text(format!(r#"{{"prompt": "{long}"}}"#)),
            "the context is 64 tokens",
        ),
        (
            Message::text(r#"{"prompt": "x", "max_tokens": 0}"#),
            "`max_tokens` must be at least 1",
        ),
        (
            Message::text(r#"{"prompt": "x", "max_tokens": 100000000}"#),
            "does not fit",
        ),
        (
            Message::text(r#"{"prompt": "x", "temperature": -1}"#),
            "temperature",
        ),
        (Message::text(r#"{"type": "cancel"}"#), "nothing to cancel"),
        (
            Message::Binary(vec![0xff, 0xfe].into()),
            "binary frames are not supported",
        ),
        (
            Message::text(format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2 << 20))),
            "the limit is",
        ),
    ];
    for (msg, want) in cases {
        ws.send(msg).await.unwrap();
        let f = recv(&mut ws).await;
        assert_eq!(f["type"], "error", "{f}");
        assert!(f["message"].as_str().unwrap().contains(want), "{want}: {f}");
    }
    send(
        &mut ws,
        serde_json::json!({"prompt": "ROMEO:", "max_tokens": 2}),
    )
    .await;
    assert_eq!(generation(&mut ws).await.1, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_chat_completions_models_health_and_metrics() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let models: Value = http
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-kimi-story");
    let health = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let body = serde_json::json!({"model": "tiny-kimi-story", "messages": [{"role": "user", "content": "Good morrow, sir. What news from the court?"}]});
    let r: Value = http
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(
        r["choices"][0]["message"]["content"],
        "I am glad to see you."
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 8);

    let mut body = body.clone();
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = http
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let datas: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "I am glad to see you.");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);

    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "# TYPE kimi_completion_tokens_total counter",
        "kimi_node_up{node=\"local\"} 1",
        "kimi_active_sequences 0",
    ] {
        assert!(metrics.contains(m), "{m} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_bad_input_is_a_4xx_naming_the_problem() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(server.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let user = r#"[{"role": "user", "content": "hi"}]"#;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{oops".to_vec(), 400, "JSON"),
        (
            format!(r#"{{"messages": {user}, "temprature": 1}}"#).into_bytes(),
            400,
            "unknown field `temprature`",
        ),
        (
            br#"{"messages": "hi"}"#.to_vec(),
            400,
            "`messages` must be an array",
        ),
        (br#"{"messages": []}"#.to_vec(), 400, "`messages` is empty"),
        (
            format!(r#"{{"messages": {user}, "max_tokens": -3}}"#).into_bytes(),
            400,
            "max_tokens",
        ),
        (
            format!(r#"{{"messages": {user}, "model": "gpt-9"}}"#).into_bytes(),
            404,
            "the model `gpt-9` does not exist",
        ),
        (
            format!(r#"{{"messages": {user}, "n": 2}}"#).into_bytes(),
            400,
            "`n`",
        ),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
            400,
            "invalid unicode",
        ),
    ];
    for (body, status, want) in cases {
        let r = post(body).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{want}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let r = http.get(server.url("/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_results_go_back_into_the_prompt() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let body = serde_json::json!({
        "messages": [
            {"role": "user", "content": "Weather in Tokyo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Tokyo\"}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny, 21 C"}
        ],
        "tools": tools, "max_tokens": 3
    });
    let r = http
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // The tool declaration, the call and its result are all in the prompt.
    let without: Value = http
        .post(server.url("/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "Weather in Tokyo?"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap()
            > without["usage"]["prompt_tokens"].as_u64().unwrap() + 40
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_is_required_everywhere_when_set() {
    let server = Server::start_env(&[], &[("KIMI_API_KEY", "k-123")]);
    let http = reqwest::Client::new();
    for path in ["/", "/health", "/metrics", "/v1/models", "/v1/cluster"] {
        assert_eq!(
            http.get(server.url(path)).send().await.unwrap().status(),
            401,
            "{path}"
        );
        let ok = http
            .get(server.url(path))
            .bearer_auth("k-123")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "{path}");
    }
    assert_eq!(
        http.get(server.url("/health?api_key=k-123"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(server.url("/health"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(
        tokio_tungstenite::connect_async(server.ws_url())
            .await
            .is_err(),
        "the socket needs the key too"
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}?api_key=k-123", server.ws_url()))
            .await
            .unwrap();
    send(&mut ws, serde_json::json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(generation(&mut ws).await.1, 1);
}

async fn metric(http: &reqwest::Client, server: &Server, name: &str) -> f64 {
    let text = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_share_forward_steps() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let steps_before = metric(&http, &server, "kimi_steps_total").await;
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let url = server.ws_url();
            tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                send(
                    &mut ws,
                    serde_json::json!({"prompt": format!("ROMEO{i}:"), "max_tokens": 40}),
                )
                .await;
                generation(&mut ws).await.1
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert_eq!(total, 160);
    let steps = metric(&http, &server, "kimi_steps_total").await - steps_before;
    // One step per token per client would be 160; batched, the clients share most steps.
    assert!(steps < 100.0, "{steps} steps for 160 tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_is_cancelled_and_freed() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let mut ws = ws(&server).await;
    send(
        &mut ws,
        serde_json::json!({"prompt": "ROMEO:", "max_tokens": 30000}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "token");
    assert_eq!(metric(&http, &server, "kimi_active_sequences").await, 1.0);
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&http, &server, "kimi_active_sequences").await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still generating after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_turn_reuses_the_first_turns_cache() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let mut ws = ws(&server).await;
    let first = serde_json::json!([{"role": "user", "content": "Good morrow, sir. What news from the court?"}]);
    send(&mut ws, serde_json::json!({"messages": first})).await;
    let (reply, _, done) = generation(&mut ws).await;
    let first_prompt = done["usage"]["prompt_tokens"].as_u64().unwrap();
    let before = metric(&http, &server, "kimi_prefix_cache_tokens_total").await;
    let second = serde_json::json!([
        {"role": "user", "content": "Good morrow, sir. What news from the court?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And the king?"}
    ]);
    send(&mut ws, serde_json::json!({"messages": second})).await;
    let (_, _, done) = generation(&mut ws).await;
    let reused = metric(&http, &server, "kimi_prefix_cache_tokens_total").await - before;
    assert!(
        reused as u64 >= first_prompt,
        "reused {reused} of the first turn's {first_prompt} prompt tokens"
    );
    assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > first_prompt);
}
