//! The wire format: message framing and classification of server messages.
//!
//! QEMU sends one JSON object per line (terminated by `\r\n`). Framing is bounded so a hostile
//! or broken peer cannot make the client buffer without limit, and every malformed input maps
//! to an [`Error`] rather than a panic. [`parse_server_message`] is the fuzz target's entry point.

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::{
    error::{Error, Result},
    events::{Event, EventMessage, Timestamp},
    types::Greeting,
};

/// A request's number within its connection. On the wire the client sends the id as the JSON
/// string `"<tag>-<n>"` (`tag`: 16 random hex digits per connection), and QEMU echoes it in the
/// reply, so a reply meant for an earlier connection never matches a request of this one.
pub type RequestId = u64;

/// One message from the server, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The greeting QEMU sends when a client connects.
    Greeting(Greeting),
    /// A successful reply.
    Return {
        /// The echoed id, if the request carried one.
        id: Option<Value>,
        /// The command's return value.
        value: Value,
    },
    /// A failed reply.
    Error {
        /// The echoed id; absent when QEMU could not even parse the request.
        id: Option<Value>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event(EventMessage),
}

/// Classifies one message (a complete JSON text, without the line terminator).
pub fn parse_server_message(bytes: &[u8]) -> Result<ServerMessage> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| protocol(format!("invalid JSON ({e}) in {}", excerpt(bytes))))?;
    let Value::Object(mut object) = value else {
        return Err(protocol(format!(
            "message is not a JSON object: {}",
            excerpt(bytes)
        )));
    };
    if let Some(greeting) = object.remove("QMP") {
        let greeting = Greeting::deserialize(greeting)
            .map_err(|e| protocol(format!("malformed greeting ({e}): {}", excerpt(bytes))))?;
        return Ok(ServerMessage::Greeting(greeting));
    }
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(ServerMessage::Return { id, value });
    }
    if let Some(error) = object.remove("error") {
        let error = ErrorBody::deserialize(error)
            .map_err(|e| protocol(format!("malformed error reply ({e}): {}", excerpt(bytes))))?;
        return Ok(ServerMessage::Error {
            id,
            class: error.class,
            desc: error.desc,
        });
    }
    if let Some(name) = object.remove("event") {
        let Value::String(name) = name else {
            return Err(protocol(format!(
                "event name is not a string: {}",
                excerpt(bytes)
            )));
        };
        let timestamp = match object.remove("timestamp") {
            Some(t) => Timestamp::deserialize(t)
                .map_err(|e| protocol(format!("malformed event timestamp ({e}): {}", excerpt(bytes))))?,
            None => return Err(protocol(format!("event without timestamp: {}", excerpt(bytes)))),
        };
        let data = object.remove("data").unwrap_or_else(|| Value::Object(Map::new()));
        return Ok(ServerMessage::Event(EventMessage {
            event: Event::decode(name, data),
            timestamp,
        }));
    }
    Err(protocol(format!(
        "message has none of `QMP`, `return`, `error`, `event`: {}",
        excerpt(bytes)
    )))
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

fn protocol(reason: String) -> Error {
    Error::Protocol { reason }
}

/// A short, printable prefix of a message for error texts.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 160;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    if bytes.len() > MAX {
        format!("{text:?}... ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

/// Splits a byte stream into messages, one per line, refusing lines longer than a bound.
#[derive(Debug)]
pub struct MessageReader<R> {
    inner: R,
    max_len: usize,
    line: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> MessageReader<R> {
    /// Wraps a buffered reader; messages longer than `max_len` bytes are an error.
    pub fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            max_len,
            line: Vec::new(),
        }
    }

    /// The next non-empty line, without its terminator. `Ok(None)` on a clean end of stream;
    /// an end of stream in the middle of a line is an error.
    pub async fn next_message(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let available = self.inner.fill_buf().await.map_err(|e| Error::Disconnected {
                reason: format!("read error: {e}").into(),
            })?;
            if available.is_empty() {
                if self.line.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                return Err(Error::Disconnected {
                    reason: format!(
                        "peer closed the connection in the middle of a message ({} bytes unterminated)",
                        self.line.len()
                    )
                    .into(),
                });
            }
            let (chunk, found_end) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (&available[..end], true),
                None => (available, false),
            };
            if self.line.len() + chunk.len() > self.max_len {
                return Err(Error::MessageTooLong { limit: self.max_len });
            }
            self.line.extend_from_slice(chunk);
            let consumed = chunk.len() + usize::from(found_end);
            self.inner.consume(consumed);
            if found_end {
                let message = std::mem::take(&mut self.line);
                let trimmed = message.trim_ascii();
                if !trimmed.is_empty() {
                    return Ok(Some(trimmed.to_vec()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerMessage> {
        parse_server_message(text.as_bytes())
    }

    #[test]
    fn classifies_every_kind_of_message() {
        let greeting = parse(
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        let ServerMessage::Greeting(g) = greeting else {
            panic!("not a greeting: {greeting:?}")
        };
        assert_eq!(
            (g.version.qemu.major, g.version.qemu.minor, g.version.qemu.micro),
            (10, 0, 2)
        );
        assert_eq!(g.capabilities, vec!["oob".to_string()]);

        assert_eq!(
            parse(r#"{"return": {}, "id": 7}"#).unwrap(),
            ServerMessage::Return {
                id: Some(7.into()),
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            parse(r#"{"id": 3, "error": {"class": "GenericError", "desc": "nope"}}"#).unwrap(),
            ServerMessage::Error {
                id: Some(3.into()),
                class: "GenericError".into(),
                desc: "nope".into()
            }
        );
        let event = parse(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap();
        let ServerMessage::Event(e) = event else {
            panic!("not an event")
        };
        assert_eq!(e.event, Event::Stop);
        assert_eq!(
            e.timestamp,
            Timestamp {
                seconds: 1,
                microseconds: 2
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[]",
            "42",
            r#"{"foo": 1}"#,
            r#"{"error": "x"}"#,
            r#"{"error": {"class": "GenericError"}}"#,
            r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            r#"{"event": "STOP"}"#,
            r#"{"QMP": {"version": 3}}"#,
            "\u{0}\u{1}garbage",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(matches!(err, Error::Protocol { .. }), "{bad:?} gave {err:?}");
        }
    }

    #[test]
    fn excerpt_bounds_long_messages() {
        let long = vec![b'x'; 10_000];
        let err = parse_server_message(&long).unwrap_err().to_string();
        assert!(err.len() < 400, "error text not bounded: {} bytes", err.len());
        assert!(err.contains("10000 bytes"));
    }

    #[tokio::test]
    async fn framing_splits_lines_and_bounds_them() {
        let input: &[u8] = b"{\"a\":1}\r\n\r\n{\"b\":2}\n";
        let mut reader = MessageReader::new(input, 64);
        assert_eq!(reader.next_message().await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(reader.next_message().await.unwrap().unwrap(), b"{\"b\":2}");
        assert!(reader.next_message().await.unwrap().is_none());

        let mut reader = MessageReader::new(&b"{\"unterminated\""[..], 64);
        assert!(matches!(
            reader.next_message().await,
            Err(Error::Disconnected { .. })
        ));

        let long = [b'x'; 100];
        let mut reader = MessageReader::new(&long[..], 64);
        assert!(matches!(
            reader.next_message().await,
            Err(Error::MessageTooLong { limit: 64 })
        ));
    }
}
