//! The client against a scripted server: protocol edge cases that a real QEMU will not produce
//! on demand (malformed input, disconnects, reordered replies, slow replies).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{os::fd::AsFd, sync::Arc, time::Duration};

use qmp::{
    commands::{QueryJobs, QueryStatus, Stop},
    Client, ClientOptions, Error, Event, JobOptions, RunState,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines, ReadHalf, WriteHalf};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// The server's end of the connection.
struct Server {
    lines: Lines<BufReader<ReadHalf<DuplexStream>>>,
    writer: WriteHalf<DuplexStream>,
}

impl Server {
    async fn request(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
            .await
            .expect("client sent nothing")
            .unwrap()
            .expect("client closed");
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).await.unwrap();
        self.writer.write_all(b"\r\n").await.unwrap();
    }

    async fn reply(&mut self, request: &Value, value: Value) {
        let text = json!({"return": value, "id": request["id"]}).to_string();
        self.send(&text).await;
    }

    async fn event(&mut self, name: &str, data: Value) {
        let text = json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}});
        self.send(&text.to_string()).await;
    }
}

async fn connect_with(options: ClientOptions) -> (Client, Server) {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (read, writer) = tokio::io::split(server_end);
    let mut server = Server {
        lines: BufReader::new(read).lines(),
        writer,
    };
    let handshake = tokio::spawn(async move {
        server.send(GREETING).await;
        let negotiate = server.request().await;
        assert_eq!(negotiate["execute"], "qmp_capabilities");
        server.reply(&negotiate, json!({})).await;
        (server, negotiate)
    });
    let client = Client::from_stream(client_end, options).await.unwrap();
    let (server, _) = handshake.await.unwrap();
    (client, server)
}

async fn connect() -> (Client, Server) {
    connect_with(ClientOptions {
        command_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn greeting_is_parsed_and_oob_enabled_only_when_asked() {
    let (client, _server) = connect().await;
    assert_eq!(client.greeting().version.qemu.to_string(), "10.0.2");
    assert_eq!(client.greeting().capabilities, vec!["oob"]);
    assert!(!client.oob_enabled());

    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (read, writer) = tokio::io::split(server_end);
    let mut server = Server {
        lines: BufReader::new(read).lines(),
        writer,
    };
    let fake = tokio::spawn(async move {
        server.send(GREETING).await;
        let negotiate = server.request().await;
        server.reply(&negotiate, json!({})).await;
        let oob = server.request().await;
        server.reply(&oob, json!({"ok": true})).await;
        (negotiate, oob)
    });
    let options = ClientOptions {
        enable_oob: true,
        ..Default::default()
    };
    let client = Client::from_stream(client_end, options).await.unwrap();
    assert!(client.oob_enabled());
    assert_eq!(
        client.execute_oob_raw("x-oob-test", Value::Null).await.unwrap(),
        json!({"ok": true})
    );
    let (negotiate, oob) = fake.await.unwrap();
    assert_eq!(negotiate["arguments"]["enable"], json!(["oob"]));
    assert_eq!(oob["exec-oob"], "x-oob-test");
}

#[tokio::test]
async fn concurrent_calls_get_their_own_replies_even_out_of_order() {
    let (client, mut server) = connect().await;
    let calls: Vec<_> = (0..3)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.execute_raw("echo", json!({ "n": n })).await })
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..3 {
        requests.push(server.request().await);
    }
    // Answer in reverse order, with an event in between.
    for request in requests.iter().rev() {
        server
            .reply(request, json!({ "n": request["arguments"]["n"] }))
            .await;
        server.event("RESUME", json!({})).await;
    }
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), json!({ "n": n }));
    }
}

#[tokio::test]
async fn events_reach_subscribers_interleaved_with_replies() {
    let (client, mut server) = connect().await;
    let mut events = client.subscribe();
    let stop = tokio::spawn({
        let client = client.clone();
        async move { client.execute(&Stop).await }
    });
    let request = server.request().await;
    assert_eq!(request["execute"], "stop");
    assert!(
        request.get("arguments").is_none(),
        "no-argument commands send no arguments"
    );
    server.event("SOME_FUTURE_EVENT", json!({"x": 1})).await;
    server.event("STOP", json!({})).await;
    server.reply(&request, json!({})).await;
    stop.await.unwrap().unwrap();

    let first = events.next().await.unwrap();
    assert_eq!(
        first.event,
        Event::Unknown {
            name: "SOME_FUTURE_EVENT".into(),
            data: json!({"x": 1})
        }
    );
    let stopped = events
        .wait_for(Duration::from_secs(1), |e| matches!(e, Event::Stop))
        .await
        .unwrap();
    assert_eq!(stopped.event.name(), "STOP");
    let none = events
        .wait_for(Duration::from_millis(100), |e| matches!(e, Event::Resume))
        .await;
    assert!(matches!(none, Err(Error::EventTimeout { .. })), "{none:?}");
}

#[tokio::test]
async fn command_errors_carry_class_description_and_command() {
    let (client, mut server) = connect().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute(&QueryStatus).await }
    });
    let request = server.request().await;
    let text = json!({"error": {"class": "DeviceNotFound", "desc": "no such thing"}, "id": request["id"]});
    server.send(&text.to_string()).await;
    let error = call.await.unwrap().unwrap_err();
    assert_eq!(error.qmp_class(), Some("DeviceNotFound"));
    assert_eq!(
        error.to_string(),
        "QMP command `query-status` failed: DeviceNotFound: no such thing"
    );
}

#[tokio::test]
async fn replies_with_new_enum_values_and_extra_fields_decode() {
    let (client, mut server) = connect().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute(&QueryStatus).await }
    });
    let request = server.request().await;
    server
        .reply(
            &request,
            json!({"running": false, "status": "quantum-suspended", "new-field": [1, 2]}),
        )
        .await;
    let status = call.await.unwrap().unwrap();
    assert_eq!(status.status, RunState::Other("quantum-suspended".into()));

    // A reply missing a required field is a decode error naming the command, not a panic.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute(&QueryStatus).await }
    });
    let request = server.request().await;
    server.reply(&request, json!({"status": "running"})).await;
    let error = call.await.unwrap().unwrap_err();
    assert!(
        matches!(&error, Error::DecodeReply { command, .. } if command == "query-status"),
        "{error:?}"
    );
    // The connection survives a reply of the wrong shape.
    assert!(client.closed_reason().is_none());
}

#[tokio::test]
async fn a_timed_out_call_fails_and_its_late_reply_is_dropped() {
    let (client, mut server) = connect().await;
    let slow = client.with_timeout(Some(Duration::from_millis(100)));
    let error = slow.execute_raw("slow", Value::Null).await.unwrap_err();
    assert!(
        matches!(error, Error::Timeout { ref command, .. } if command == "slow"),
        "{error:?}"
    );
    let late = server.request().await;
    server.reply(&late, json!("late")).await;

    // A dropped (cancelled) call behaves the same way.
    let cancelled = tokio::spawn({
        let client = client.clone();
        async move { client.execute_raw("cancelled", Value::Null).await }
    });
    let request = server.request().await;
    cancelled.abort();
    let _ = cancelled.await;
    server.reply(&request, json!("too late")).await;

    // The connection is still healthy and routes the next reply correctly.
    let next = tokio::spawn({
        let client = client.clone();
        async move { client.execute_raw("next", Value::Null).await }
    });
    let request = server.request().await;
    assert_eq!(request["execute"], "next");
    server.reply(&request, json!("fresh")).await;
    assert_eq!(next.await.unwrap().unwrap(), json!("fresh"));
}

#[tokio::test]
async fn slow_replies_within_the_timeout_succeed() {
    let (client, mut server) = connect().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute_raw("slow", Value::Null).await }
    });
    let request = server.request().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.reply(&request, json!(1)).await;
    assert_eq!(call.await.unwrap().unwrap(), json!(1));
}

/// Starts `count` calls and waits until the server has read them all.
async fn pending_calls(
    client: &Client,
    server: &mut Server,
    count: usize,
) -> Vec<tokio::task::JoinHandle<qmp::Result<Value>>> {
    let calls: Vec<_> = (0..count)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.execute_raw(&format!("pending-{n}"), Value::Null).await })
        })
        .collect();
    for _ in 0..count {
        server.request().await;
    }
    calls
}

async fn expect_all_disconnected(calls: Vec<tokio::task::JoinHandle<qmp::Result<Value>>>, needle: &str) {
    for call in calls {
        let error = tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .expect("a pending call hung after the connection failed")
            .unwrap()
            .unwrap_err();
        assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");
        assert!(
            error.to_string().contains(needle),
            "{error} should mention {needle:?}"
        );
    }
}

#[tokio::test]
async fn a_disconnect_fails_every_pending_call_and_every_later_one() {
    let (client, mut server) = connect().await;
    let mut events = client.subscribe();
    let calls = pending_calls(&client, &mut server, 3).await;
    drop(server);
    expect_all_disconnected(calls, "closed the connection").await;
    let later = client.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(later, Error::Disconnected { .. }), "{later:?}");
    assert!(matches!(events.next().await, Err(Error::Disconnected { .. })));
    assert!(client.wait_closed().await.contains("closed the connection"));
}

#[tokio::test]
async fn malformed_json_closes_the_connection_with_a_clear_error() {
    let (client, mut server) = connect().await;
    let calls = pending_calls(&client, &mut server, 2).await;
    server.send(r#"{"return": {}, "id": 1"#).await;
    expect_all_disconnected(calls, "invalid JSON").await;
}

/// Replies addressed to nobody: an earlier connection's (QEMU sends the reply to a command whose
/// client went away to whoever is connected when the command finishes), a foreign tool's, and
/// QEMU's id-less parse errors. Each is tagged with the id it carries.
const STALE_REPLIES: [&str; 6] = [
    r#"{"return": {"stale": "id 0"}, "id": 0}"#,
    r#"{"return": {"stale": "id 1"}, "id": 1}"#,
    r#"{"return": {"stale": "foreign string"}, "id": "0123456789abcdef-1"}"#,
    r#"{"return": {"stale": "object id"}, "id": {"n": 1}}"#,
    r#"{"error": {"class": "GenericError", "desc": "stale error"}, "id": 7}"#,
    r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stale"}}"#,
];

#[tokio::test]
async fn stale_replies_before_the_handshake_reply_and_a_command_reply_are_dropped() {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (read, writer) = tokio::io::split(server_end);
    let mut server = Server {
        lines: BufReader::new(read).lines(),
        writer,
    };
    let handshake = tokio::spawn(async move {
        server.send(GREETING).await;
        let negotiate = server.request().await;
        assert_eq!(negotiate["execute"], "qmp_capabilities");
        for stale in STALE_REPLIES {
            server.send(stale).await;
        }
        server.reply(&negotiate, json!({})).await;
        server
    });
    let options = ClientOptions {
        command_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let client = Client::from_stream(client_end, options).await.unwrap();
    let mut server = handshake.await.unwrap();

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute_raw("fresh", Value::Null).await }
    });
    let request = server.request().await;
    for stale in STALE_REPLIES {
        server.send(stale).await;
    }
    // Our own prefix with a counter we never used is stale too.
    let own = request["id"].as_str().unwrap();
    let (prefix, _) = own.rsplit_once('-').unwrap();
    server
        .send(&json!({"return": "unused counter", "id": format!("{prefix}-999")}).to_string())
        .await;
    server.reply(&request, json!("fresh")).await;
    assert_eq!(call.await.unwrap().unwrap(), json!("fresh"));
    assert!(client.closed_reason().is_none(), "{:?}", client.closed_reason());

    // Malformed input still closes the connection.
    let calls = pending_calls(&client, &mut server, 1).await;
    server.send("{").await;
    expect_all_disconnected(calls, "invalid JSON").await;
}

#[tokio::test]
async fn request_ids_never_repeat_across_connections() {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (client_end, server_end) = tokio::io::duplex(1 << 16);
        let (read, writer) = tokio::io::split(server_end);
        let mut server = Server {
            lines: BufReader::new(read).lines(),
            writer,
        };
        let handshake = tokio::spawn(async move {
            server.send(GREETING).await;
            let negotiate = server.request().await;
            server.reply(&negotiate, json!({})).await;
            (server, negotiate)
        });
        let client = Client::from_stream(client_end, ClientOptions::default())
            .await
            .unwrap();
        let (mut server, negotiate) = handshake.await.unwrap();
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.execute_raw("x", Value::Null).await }
        });
        let request = server.request().await;
        server.reply(&request, json!(null)).await;
        call.await.unwrap().unwrap();
        ids.push(negotiate["id"].clone());
        ids.push(request["id"].clone());
    }
    for id in &ids {
        let id = id.as_str().unwrap_or_else(|| panic!("id {id} is not a string"));
        let (prefix, counter) = id.rsplit_once('-').unwrap();
        assert_eq!(prefix.len(), 16, "{id}");
        assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        counter.parse::<u64>().unwrap();
    }
    let prefix = |n: usize| ids[n].as_str().unwrap().rsplit_once('-').unwrap().0.to_owned();
    assert_eq!(
        prefix(0),
        prefix(1),
        "one prefix per connection, handshake included"
    );
    assert_eq!(prefix(2), prefix(3));
    assert_ne!(prefix(0), prefix(2), "each connection has its own prefix");
}

#[tokio::test]
async fn an_over_long_message_is_refused() {
    let options = ClientOptions {
        max_message_len: 1024,
        ..Default::default()
    };
    let (client, mut server) = connect_with(options).await;
    let calls = pending_calls(&client, &mut server, 1).await;
    let huge = format!(r#"{{"return": "{}", "id": 1}}"#, "x".repeat(4096));
    server.send(&huge).await;
    expect_all_disconnected(calls, "1024-byte limit").await;
}

#[tokio::test]
async fn a_peer_closing_mid_message_is_reported() {
    let (client, mut server) = connect().await;
    let calls = pending_calls(&client, &mut server, 1).await;
    server.writer.write_all(br#"{"return": {}, "#).await.unwrap();
    drop(server);
    expect_all_disconnected(calls, "middle of a message").await;
}

#[tokio::test]
async fn a_bad_greeting_fails_the_handshake() {
    for greeting in [r#"{"return": {}}"#, r#"{"QMP": {"version": "ten"}}"#, "not json"] {
        let (client_end, server_end) = tokio::io::duplex(4096);
        let (_read, mut writer) = tokio::io::split(server_end);
        writer
            .write_all(format!("{greeting}\r\n").as_bytes())
            .await
            .unwrap();
        let error = Client::from_stream(client_end, ClientOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Handshake { .. } | Error::Protocol { .. }),
            "{greeting}: {error:?}"
        );
    }
    // A server that never greets times out instead of hanging.
    let (client_end, _server_end) = tokio::io::duplex(4096);
    let options = ClientOptions {
        handshake_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let error = Client::from_stream(client_end, options).await.unwrap_err();
    assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
}

#[tokio::test]
async fn fds_need_a_unix_socket() {
    let (client, _server) = connect().await;
    let file = tempfile::tempfile().unwrap();
    let error = client.getfd("x", file.as_fd()).await.unwrap_err();
    assert!(matches!(error, Error::FdPassingUnsupported { .. }), "{error:?}");
}

/// Plays QEMU's side of a job: status changes, then `query-jobs` and `job-dismiss`.
async fn serve_job(server: &mut Server, error: Option<&str>) -> Vec<String> {
    let start = server.request().await;
    server.reply(&start, json!({})).await;
    for status in ["created", "running", "aborting", "concluded"] {
        if status == "aborting" && error.is_none() {
            continue;
        }
        server
            .event("JOB_STATUS_CHANGE", json!({"id": "job0", "status": status}))
            .await;
    }
    let mut seen = vec![start["execute"].as_str().unwrap().to_owned()];
    let query = server.request().await;
    seen.push(query["execute"].as_str().unwrap().to_owned());
    let mut job = json!({"id": "job0", "type": "create", "status": "concluded",
                         "current-progress": 1, "total-progress": 1});
    if let Some(error) = error {
        job["error"] = json!(error);
    }
    server.reply(&query, json!([job])).await;
    let dismiss = server.request().await;
    assert_eq!(dismiss["arguments"]["id"], "job0");
    seen.push(dismiss["execute"].as_str().unwrap().to_owned());
    server.reply(&dismiss, json!({})).await;
    seen
}

#[tokio::test]
async fn jobs_run_to_completion_and_report_their_errors() {
    let (client, mut server) = connect().await;
    let client = Arc::new(client);
    for error in [None, Some("Could not create image: No space left")] {
        let job = tokio::spawn({
            let client = client.clone();
            async move {
                let start = qmp::commands::JobComplete { id: "job0".into() };
                client.run_job(&start, "job0", &JobOptions::default()).await
            }
        });
        let seen = serve_job(&mut server, error).await;
        assert_eq!(seen, ["job-complete", "query-jobs", "job-dismiss"]);
        match (error, job.await.unwrap()) {
            (None, Ok(())) => {}
            (Some(expected), Err(Error::JobFailed { job_id, error })) => {
                assert_eq!(job_id, "job0");
                assert_eq!(error, expected);
            }
            (expected, got) => panic!("expected {expected:?}, got {got:?}"),
        }
    }
    // `query-jobs` decodes on its own too.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute(&QueryJobs).await }
    });
    let request = server.request().await;
    server.reply(&request, json!([])).await;
    assert!(call.await.unwrap().unwrap().is_empty());
}
