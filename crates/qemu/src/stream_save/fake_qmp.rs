//! A scripted QMP peer for the unit tests of the stream snapshot: it greets like QEMU 10 and
//! hands each command to a closure, which answers it or hangs up as a QEMU that died.

use qmp::Client;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    task::JoinHandle,
};

/// A client connected to the scripted peer.
pub(super) struct FakeQmp {
    pub(super) client: Client,
    /// Ends once the client hangs up or the peer did; yields every command it received.
    pub(super) commands: JoinHandle<Vec<Value>>,
    _dir: tempfile::TempDir,
}

/// Starts a peer that negotiates capabilities and passes each later command to `answer`:
/// `Some(value)` is sent back as the command's `return`, `None` closes the connection.
pub(super) async fn fake_qmp(mut answer: impl FnMut(&Value) -> Option<Value> + Send + 'static) -> FakeQmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let commands = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let greeting = r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}, "capabilities": []}}"#;
        write.write_all(format!("{greeting}\n").as_bytes()).await.unwrap();
        let mut lines = BufReader::new(read).lines();
        let mut commands = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).unwrap();
            let value = if request["execute"] == "qmp_capabilities" {
                Value::Object(Default::default())
            } else if let Some(value) = answer(&request) {
                value
            } else {
                break;
            };
            let reply = serde_json::json!({"return": value, "id": request["id"]});
            write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            commands.push(request);
        }
        commands
    });
    let client = Client::connect_unix(&path, qmp::ClientOptions::default())
        .await
        .unwrap();
    FakeQmp {
        client,
        commands,
        _dir: dir,
    }
}
