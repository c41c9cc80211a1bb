//! A client for the QEMU guest agent (`qemu-ga`), which runs inside the guest and answers on a
//! virtio-serial channel that QEMU exposes as a Unix socket on the host.
//!
//! The agent speaks QMP's JSON but has no greeting and no capability negotiation, and it does not
//! know when a host client comes or goes: a reply to a request of an earlier connection may still
//! be in the channel. [`GuestAgent::connect`] therefore synchronises first with
//! `guest-sync-delimited`: it sends a fresh random id, the agent answers with a `0xFF` byte (which
//! never occurs in JSON) followed by that id, and everything before it is stale and dropped.
//!
//! Every request is bounded by the client's timeout: an agent that is not running in the guest
//! (or a guest that is paused) never answers, and the caller gets [`Error::AgentTimeout`].
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp::GuestAgent;
//!
//! # async fn demo() -> qmp::Result<()> {
//! let mut agent = GuestAgent::connect("/run/demo/qga.sock".as_ref(), Duration::from_secs(10)).await?;
//! let frozen = agent.fsfreeze_freeze().await?;
//! // ... snapshot the disks ...
//! agent.fsfreeze_thaw().await?;
//! println!("{frozen} filesystems were frozen");
//! # Ok(())
//! # }
//! ```

use std::{path::Path, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use crate::{
    client::random_tag,
    error::{Error, Result},
    wire::{parse_server_message, MessageReader, ServerMessage},
};

/// The longest agent reply accepted (replies to the commands used here are tiny).
const MAX_REPLY: usize = 1 << 20;
/// The byte the agent sends before its answer to `guest-sync-delimited`.
const DELIMITER: u8 = 0xFF;

/// The state `guest-fsfreeze-status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsfreezeStatus {
    /// Filesystems are frozen.
    Frozen,
    /// Filesystems are not frozen.
    Thawed,
}

/// A synchronised connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    reader: MessageReader<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects to the agent's socket and synchronises; every request, this one included, may
    /// take at most `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::AgentConnect {
                path: socket.to_owned(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut agent = GuestAgent {
            reader: MessageReader::new(BufReader::new(read), MAX_REPLY),
            writer,
            timeout,
        };
        agent.sync().await?;
        Ok(agent)
    }

    /// The same connection with another timeout per request (freezing waits for the guest's
    /// filesystems to flush, which may take long).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        self.send(command, &request, false).await?;
        bounded(self.timeout, command, Self::reply(&mut self.reader, command)).await
    }

    /// `guest-fsfreeze-freeze`: flushes and freezes every freezable filesystem; returns how
    /// many it froze.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let value = self.execute("guest-fsfreeze-freeze", None).await?;
        count(&value, "guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-thaw`: thaws every frozen filesystem; returns how many it thawed (0 when
    /// none were frozen, which is not an error).
    pub async fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let value = self.execute("guest-fsfreeze-thaw", None).await?;
        count(&value, "guest-fsfreeze-thaw")
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FsfreezeStatus> {
        let command = "guest-fsfreeze-status";
        match self.execute(command, None).await?.as_str() {
            Some("frozen") => Ok(FsfreezeStatus::Frozen),
            Some("thawed") => Ok(FsfreezeStatus::Thawed),
            other => Err(unexpected(command, format!("status {other:?}"))),
        }
    }

    /// Sends `guest-sync-delimited` with a fresh id and drops everything up to its answer.
    async fn sync(&mut self) -> Result<()> {
        const COMMAND: &str = "guest-sync-delimited";
        // The agent takes the id as a JSON integer: keep it within 2^53.
        let id = random_tag() >> 11;
        let request = json!({ "execute": COMMAND, "arguments": { "id": id } });
        self.send(COMMAND, &request, true).await?;
        let reader = &mut self.reader;
        bounded(self.timeout, COMMAND, async move {
            loop {
                let line = next_line(reader, COMMAND).await?;
                let Some(at) = line.iter().rposition(|&b| b == DELIMITER) else {
                    continue; // a stale reply to an earlier connection's request
                };
                let answer = &line[at + 1..];
                if answer.is_empty() {
                    continue;
                }
                match parse_server_message(answer)? {
                    ServerMessage::Return { value, .. } if value.as_u64() == Some(id) => return Ok(()),
                    _ => continue,
                }
            }
        })
        .await
    }

    /// Writes one request; a sync request is preceded by the delimiter, which makes the agent
    /// drop any partial request an earlier client left in the channel.
    async fn send(&mut self, command: &str, request: &Value, delimit: bool) -> Result<()> {
        let mut bytes = Vec::new();
        if delimit {
            bytes.push(DELIMITER);
        }
        bytes.extend_from_slice(request.to_string().as_bytes());
        bytes.push(b'\n');
        let write = async {
            self.writer.write_all(&bytes).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(result) => result.map_err(|source| Error::Send {
                command: command.to_owned(),
                source,
            }),
            Err(_) => Err(Error::AgentTimeout {
                command: command.to_owned(),
                after: self.timeout,
            }),
        }
    }

    /// The reply to the request just sent.
    async fn reply(reader: &mut MessageReader<BufReader<OwnedReadHalf>>, command: &str) -> Result<Value> {
        let line = next_line(reader, command).await?;
        match parse_server_message(&line)? {
            ServerMessage::Return { value, .. } => Ok(value),
            ServerMessage::Error { class, desc, .. } => Err(Error::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            other => Err(unexpected(command, format!("{other:?}"))),
        }
    }
}

/// `work`, or [`Error::AgentTimeout`] once `timeout` has passed.
async fn bounded<T>(
    timeout: Duration,
    command: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
        Err(Error::AgentTimeout {
            command: command.to_owned(),
            after: timeout,
        })
    })
}

async fn next_line(reader: &mut MessageReader<BufReader<OwnedReadHalf>>, command: &str) -> Result<Vec<u8>> {
    reader.next_message().await?.ok_or_else(|| Error::Disconnected {
        reason: format!("the guest agent's channel closed while waiting for `{command}`").into(),
    })
}

fn count(value: &Value, command: &str) -> Result<u64> {
    value
        .as_u64()
        .ok_or_else(|| unexpected(command, format!("{value} is not a count")))
}

fn unexpected(command: &str, what: String) -> Error {
    Error::Protocol {
        reason: format!("unexpected guest agent reply to `{command}`: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    use super::*;

    /// A fake agent: answers sync with the delimiter after a stale reply, then answers each
    /// request with `answers` in order.
    async fn fake_agent(answers: Vec<&'static str>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).split(b'\n');
            // A reply left over from an earlier client comes first.
            write.write_all(b"{\"return\": 7}\n").await.unwrap();
            let sync = lines.next_segment().await.unwrap().unwrap();
            assert_eq!(sync[0], DELIMITER, "a sync starts with the delimiter");
            let request: Value = serde_json::from_slice(&sync[1..]).unwrap();
            let id = &request["arguments"]["id"];
            write.write_all(b"\0").await.unwrap();
            write.write_all(&[DELIMITER]).await.unwrap();
            write
                .write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            for answer in answers {
                if lines.next_segment().await.unwrap().is_none() {
                    return;
                }
                write.write_all(answer.as_bytes()).await.unwrap();
                write.write_all(b"\n").await.unwrap();
            }
            // Then stay silent (a hung agent).
            std::future::pending::<()>().await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn syncs_past_stale_replies_then_freezes_and_thaws() {
        let (_dir, socket) = fake_agent(vec![
            r#"{"return": 2}"#,
            r#"{"return": "frozen"}"#,
            r#"{"return": 2}"#,
            r#"{"error": {"class": "GenericError", "desc": "nope"}}"#,
        ])
        .await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(agent.fsfreeze_freeze().await.unwrap(), 2);
        assert_eq!(agent.fsfreeze_status().await.unwrap(), FsfreezeStatus::Frozen);
        assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 2);
        let err = agent.execute("guest-ping", None).await.unwrap_err().to_string();
        assert!(err.contains("guest-ping") && err.contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_agent_times_out_and_a_missing_socket_is_named() {
        let (_dir, socket) = fake_agent(vec![]).await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_millis(200))
            .await
            .unwrap();
        let err = agent.fsfreeze_freeze().await.unwrap_err();
        assert!(matches!(err, Error::AgentTimeout { .. }), "{err}");

        let missing = _dir.path().join("none.sock");
        let err = GuestAgent::connect(&missing, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("guest agent"), "{err}");
    }

    #[tokio::test]
    async fn a_reply_that_is_not_a_count_is_a_protocol_error() {
        let (_dir, socket) = fake_agent(vec![r#"{"return": "many"}"#]).await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        let err = agent.fsfreeze_freeze().await.unwrap_err().to_string();
        assert!(err.contains("not a count"), "{err}");
    }
}
