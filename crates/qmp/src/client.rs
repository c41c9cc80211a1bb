//! The client: handshake, request/reply routing by id, the reader and writer tasks.
//!
//! ```text
//!  callers ──execute()──► outbox (mpsc) ──► writer task ──► socket (with SCM_RIGHTS fds)
//!     ▲                                                          │
//!     └── oneshot per request id ◄── reader task ◄───────────────┘
//!                                       └──► broadcast ──► EventStream subscribers
//! ```
//!
//! Writes happen only in the writer task, so a caller that is cancelled (dropped or timed out)
//! can never leave half a message on the wire. Replies are routed by id; the reply to a call
//! that was abandoned is recognised and dropped.
//!
//! Ids are JSON strings `"<tag>-<n>"`: `tag` is 16 hex digits of OS randomness drawn per
//! connection, `n` counts from 0 (the handshake's `qmp_capabilities`). QEMU has one QMP
//! connection per socket and sends the reply to a command whose client went away to whoever is
//! connected when the command finishes, so a new connection can receive replies meant for an
//! earlier one. With a fresh tag they cannot be mistaken for ours: a reply whose id matches no
//! pending call (another tag, a number, no id at all) is logged and dropped, and the connection
//! stays open.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{broadcast, mpsc, oneshot, watch},
};

use crate::{
    commands::Command,
    error::{Error, Result},
    events::{EventMessage, EventStream},
    types::Greeting,
    wire::{parse_server_message, MessageReader, RequestId, ServerMessage},
};

/// Tunables of a connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Default timeout of every call; `None` waits forever. Override per call with
    /// [`Client::with_timeout`].
    pub command_timeout: Option<Duration>,
    /// Longest message accepted from the server. A longer one closes the connection.
    pub max_message_len: usize,
    /// Events buffered per subscriber before the oldest are dropped.
    pub event_capacity: usize,
    /// Negotiate out-of-band execution if the server offers it.
    pub enable_oob: bool,
    /// Timeout of the greeting and capability negotiation.
    pub handshake_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            command_timeout: Some(Duration::from_secs(30)),
            // query-named-block-nodes with long backing chains and many snapshots can be large.
            max_message_len: 16 << 20,
            event_capacity: 1024,
            enable_oob: false,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A connected QMP client. Cheap to clone; clones share one connection and may be used from
/// many tasks at once. The connection closes when the last clone is dropped or [`Client::close`]
/// is called.
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<Handle>,
    timeout: Option<Duration>,
}

/// Owns the connection's lifetime: dropping the last one shuts the tasks down.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shut_down("client dropped".into());
    }
}

#[derive(Debug)]
struct Shared {
    greeting: Greeting,
    oob_enabled: bool,
    fd_passing: bool,
    ids: RequestIds,
    routes: Mutex<Routes>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    events: broadcast::Sender<Arc<EventMessage>>,
    closed: watch::Sender<Option<Arc<str>>>,
}

type ReplySender = oneshot::Sender<Result<Value>>;

#[derive(Debug, Default)]
struct Routes {
    pending: HashMap<RequestId, (String, ReplySender)>,
    /// Calls that timed out or were cancelled; their late replies are dropped silently.
    abandoned: HashSet<RequestId>,
    closed: Option<Arc<str>>,
}

#[derive(Debug)]
struct Outgoing {
    id: RequestId,
    command: String,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        // A panic while holding this lock cannot leave the maps inconsistent (every critical
        // section is a single insert/remove), so poisoning is safe to ignore.
        self.routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ends the connection: fails every pending call with `reason` and stops both tasks.
    fn shut_down(&self, reason: Arc<str>) {
        let pending = {
            let mut routes = self.routes();
            if routes.closed.is_some() {
                return;
            }
            routes.closed = Some(reason.clone());
            std::mem::take(&mut routes.pending)
        };
        tracing::debug!(%reason, pending = pending.len(), "QMP connection closing");
        for (_, (_, reply)) in pending {
            // The caller may be gone already; nothing to tell then.
            let _ = reply.send(Err(Error::Disconnected {
                reason: reason.clone(),
            }));
        }
        self.closed.send_replace(Some(reason));
    }

    /// Hands a reply to its caller. A reply nobody waits for is dropped: the late reply to an
    /// abandoned call quietly, any other with a warning.
    fn deliver(&self, id: RequestId, reply: Result<Value>) {
        let mut routes = self.routes();
        if let Some((_, sender)) = routes.pending.remove(&id) {
            drop(routes);
            let _ = sender.send(reply);
        } else if routes.abandoned.remove(&id) {
            tracing::debug!(id, "dropping the late reply to an abandoned call");
        } else {
            drop(routes);
            let id = Value::String(self.ids.encode(id));
            match reply {
                Err(Error::Command { class, desc, .. }) => drop_stale_reply(Some(&id), Some((&class, &desc))),
                _ => drop_stale_reply(Some(&id), None),
            }
        }
    }
}

/// Removes a call's route if the call ends (timeout, cancellation) before its reply arrives.
struct PendingCall<'a> {
    shared: &'a Shared,
    id: RequestId,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        let mut routes = self.shared.routes();
        if routes.pending.remove(&self.id).is_some() && routes.closed.is_none() {
            routes.abandoned.insert(self.id);
        }
    }
}

impl Client {
    /// Connects to a QMP Unix socket and negotiates capabilities. Over a Unix socket, file
    /// descriptors can be passed ([`Client::execute_with_fds`]).
    pub async fn connect_unix(path: impl AsRef<Path>, options: ClientOptions) -> Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).await.map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::from_unix_stream(stream, options).await
    }

    /// Runs QMP over an already connected Unix stream (for example one end of a socketpair
    /// handed to QEMU with `-chardev socket,fd=N`).
    pub async fn from_unix_stream(stream: UnixStream, options: ClientOptions) -> Result<Self> {
        let (read, write) = stream.into_split();
        Self::start(read, UnixSocketSink { half: write }, true, options).await
    }

    /// Runs QMP over any byte stream (TCP, a pipe pair, an in-memory duplex for tests).
    /// Such a transport cannot pass file descriptors.
    pub async fn from_stream<S>(stream: S, options: ClientOptions) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        Self::start(read, PlainSink { writer: write }, false, options).await
    }

    async fn start<R, W>(read: R, mut sink: W, fd_passing: bool, options: ClientOptions) -> Result<Self>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: MessageSink,
    {
        let mut reader = MessageReader::new(BufReader::new(read), options.max_message_len);
        let ids = RequestIds::new();
        let (greeting, oob_enabled) = tokio::time::timeout(
            options.handshake_timeout,
            handshake(&mut reader, &mut sink, &ids, &options),
        )
        .await
        .map_err(|_| Error::Handshake {
            reason: format!("no answer within {:?}", options.handshake_timeout),
        })??;

        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            greeting,
            oob_enabled,
            fd_passing,
            ids,
            routes: Mutex::new(Routes::default()),
            outbox,
            events,
            closed,
        });
        tokio::spawn(read_loop(reader, shared.clone()));
        tokio::spawn(write_loop(sink, outbox_rx, shared.clone()));
        Ok(Self {
            handle: Arc::new(Handle { shared }),
            timeout: options.command_timeout,
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The server's greeting (QEMU version and offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.shared().greeting
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.shared().oob_enabled
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<Arc<str>> {
        self.shared().routes().closed.clone()
    }

    /// Waits until the connection closes (QEMU quit or crashed, or [`Client::close`]) and
    /// returns why.
    pub async fn wait_closed(&self) -> Arc<str> {
        let mut closed = self.shared().closed.subscribe();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        reason.unwrap_or_else(|| Arc::from("client shut down"))
    }

    /// Closes the connection; pending calls fail with [`Error::Disconnected`].
    pub fn close(&self) {
        self.shared().shut_down("closed by the client".into());
    }

    /// A handle to the same connection whose calls use `timeout` instead of the default.
    pub fn with_timeout(&self, timeout: Option<Duration>) -> Self {
        Self {
            handle: self.handle.clone(),
            timeout,
        }
    }

    /// Subscribes to events: the stream sees every event that arrives from now on.
    pub fn subscribe(&self) -> EventStream {
        EventStream::new(self.shared().events.subscribe(), self.shared().closed.subscribe())
    }

    /// Runs a typed command.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Response> {
        self.execute_with_fds(command, &[]).await
    }

    /// Runs a typed command, passing file descriptors with it (SCM_RIGHTS). QEMU keeps the
    /// descriptors it receives with the command (for `getfd`, `add-fd`); the caller keeps its own.
    pub async fn execute_with_fds<C: Command>(
        &self,
        command: &C,
        fds: &[BorrowedFd<'_>],
    ) -> Result<C::Response> {
        let arguments = serde_json::to_value(command).map_err(|source| Error::EncodeArguments {
            command: C::NAME.into(),
            source,
        })?;
        let value = self.call("execute", C::NAME, arguments, fds).await?;
        C::Response::deserialize(value).map_err(|source| Error::DecodeReply {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs any command by name: the escape hatch for commands without a typed binding.
    /// `arguments` is `null` or an object.
    pub async fn execute_raw(&self, command: &str, arguments: Value) -> Result<Value> {
        self.call("execute", command, arguments, &[]).await
    }

    /// Runs a command out of band (`exec-oob`): QEMU answers it even while an in-band command
    /// is stuck. Needs [`ClientOptions::enable_oob`] and a command that allows it.
    pub async fn execute_oob_raw(&self, command: &str, arguments: Value) -> Result<Value> {
        if !self.oob_enabled() {
            return Err(Error::OobNotEnabled {
                command: command.into(),
            });
        }
        self.call("exec-oob", command, arguments, &[]).await
    }

    async fn call(
        &self,
        verb: &str,
        command: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value> {
        let shared = self.shared();
        if !fds.is_empty() && !shared.fd_passing {
            return Err(Error::FdPassingUnsupported {
                command: command.into(),
            });
        }
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| Error::Send {
                command: command.into(),
                source,
            })?;
        let id = shared.ids.next();
        let mut message = json!({ verb: command, "id": shared.ids.encode(id) });
        match arguments {
            Value::Null => {}
            Value::Object(ref map) if map.is_empty() => {}
            Value::Object(_) => message["arguments"] = arguments,
            other => {
                return Err(Error::EncodeArguments {
                    command: command.into(),
                    source: serde::de::Error::custom(format!("arguments must be a JSON object, not {other}")),
                })
            }
        }
        let mut bytes = serde_json::to_vec(&message).map_err(|source| Error::EncodeArguments {
            command: command.into(),
            source,
        })?;
        bytes.push(b'\n');

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut routes = shared.routes();
            if let Some(reason) = &routes.closed {
                return Err(Error::Disconnected {
                    reason: reason.clone(),
                });
            }
            routes.pending.insert(id, (command.to_owned(), reply_tx));
        }
        let _route = PendingCall { shared, id };
        tracing::trace!(id, command, "QMP call");
        shared
            .outbox
            .send(Outgoing {
                id,
                command: command.to_owned(),
                bytes,
                fds,
            })
            .map_err(|_| Error::Disconnected {
                reason: "writer task ended".into(),
            })?;

        let reply = match self.timeout {
            Some(after) => tokio::time::timeout(after, reply_rx)
                .await
                .map_err(|_| Error::Timeout {
                    command: command.into(),
                    after,
                })?,
            None => reply_rx.await,
        };
        reply.unwrap_or_else(|_| {
            Err(Error::Disconnected {
                reason: "reply route dropped".into(),
            })
        })
    }
}

async fn handshake<R, W>(
    reader: &mut MessageReader<BufReader<R>>,
    sink: &mut W,
    ids: &RequestIds,
    options: &ClientOptions,
) -> Result<(Greeting, bool)>
where
    R: AsyncRead + Unpin,
    W: MessageSink,
{
    let handshake_error = |reason: String| Error::Handshake { reason };
    let first = reader
        .next_message()
        .await?
        .ok_or_else(|| handshake_error("the server closed the connection before greeting".into()))?;
    let greeting = match parse_server_message(&first)? {
        ServerMessage::Greeting(greeting) => greeting,
        other => return Err(handshake_error(format!("expected a greeting, got {other:?}"))),
    };
    let oob_enabled = options.enable_oob && greeting.capabilities.iter().any(|c| c == "oob");
    let enable: Vec<&str> = if oob_enabled { vec!["oob"] } else { vec![] };
    let id = ids.next();
    let mut request = serde_json::to_vec(&json!({
        "execute": "qmp_capabilities",
        "arguments": { "enable": enable },
        "id": ids.encode(id),
    }))
    .map_err(|e| handshake_error(e.to_string()))?;
    request.push(b'\n');
    sink.send(&request, &[])
        .await
        .map_err(|e| handshake_error(format!("cannot send qmp_capabilities: {e}")))?;
    loop {
        let message = reader
            .next_message()
            .await?
            .ok_or_else(|| handshake_error("the server closed the connection during negotiation".into()))?;
        match parse_server_message(&message)? {
            ServerMessage::Return { id: reply, .. } => {
                if ids.decode(reply.as_ref()) == Some(id) {
                    return Ok((greeting, oob_enabled));
                }
                drop_stale_reply(reply.as_ref(), None);
            }
            ServerMessage::Error {
                id: reply,
                class,
                desc,
            } => {
                if ids.decode(reply.as_ref()) == Some(id) {
                    return Err(handshake_error(format!(
                        "qmp_capabilities refused: {class}: {desc}"
                    )));
                }
                drop_stale_reply(reply.as_ref(), Some((&class, &desc)));
            }
            // Events cannot arrive before negotiation ends, but tolerate them.
            ServerMessage::Event(_) => continue,
            ServerMessage::Greeting(_) => return Err(handshake_error("a second greeting".into())),
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: MessageReader<BufReader<R>>, shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    let reason: Arc<str> = loop {
        let message = tokio::select! {
            message = reader.next_message() => message,
            _ = closed.wait_for(Option::is_some) => return,
        };
        let message = match message {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break "the server closed the connection".into(),
            Err(error) => break error.to_string().into(),
        };
        let outcome = match parse_server_message(&message) {
            Ok(ServerMessage::Return { id, value }) => {
                match shared.ids.decode(id.as_ref()) {
                    Some(id) => {
                        tracing::trace!(id, "QMP reply");
                        shared.deliver(id, Ok(value));
                    }
                    None => drop_stale_reply(id.as_ref(), None),
                }
                Ok(())
            }
            Ok(ServerMessage::Error { id, class, desc }) => {
                match shared.ids.decode(id.as_ref()) {
                    Some(id) => {
                        let command = shared
                            .routes()
                            .pending
                            .get(&id)
                            .map(|(command, _)| command.clone())
                            .unwrap_or_default();
                        shared.deliver(id, Err(Error::Command { command, class, desc }));
                    }
                    None => drop_stale_reply(id.as_ref(), Some((&class, &desc))),
                }
                Ok(())
            }
            Ok(ServerMessage::Event(event)) => {
                // No subscribers is fine: nobody asked for events.
                let _ = shared.events.send(Arc::new(event));
                Ok(())
            }
            Ok(ServerMessage::Greeting(_)) => Err("unexpected second greeting".into()),
            Err(error) => Err(error.to_string().into()),
        };
        if let Err(reason) = outcome {
            break reason;
        }
    };
    shared.shut_down(reason);
}

/// Logs and drops a reply nobody waits for (`error` is its class and description): most likely
/// the answer to a command of an earlier connection, which QEMU sends to whoever is connected
/// when the command finishes. A reply without id is one too: QEMU answers without an id only a
/// request it could not parse or that carried no id, and this client sends neither.
fn drop_stale_reply(id: Option<&Value>, error: Option<(&str, &str)>) {
    let id = id.map_or_else(|| "none".to_owned(), Value::to_string);
    match error {
        None => tracing::warn!(%id, "dropping a QMP reply that matches no request of this connection"),
        Some((class, desc)) => tracing::warn!(
            %id,
            class,
            desc,
            "dropping a QMP error reply that matches no request of this connection"
        ),
    }
}

/// The ids of one connection: `"<tag>-<n>"`, with a random tag per connection so that replies
/// meant for an earlier connection (even of another process) never match.
#[derive(Debug)]
struct RequestIds {
    /// `"<16 hex digits>-"`.
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        Self {
            prefix: format!("{:016x}-", random_tag()),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> RequestId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn encode(&self, id: RequestId) -> String {
        format!("{}{id}", self.prefix)
    }

    /// The counter of one of our ids; `None` for anything else.
    fn decode(&self, id: Option<&Value>) -> Option<RequestId> {
        let Some(Value::String(id)) = id else {
            return None;
        };
        let counter = id.strip_prefix(&self.prefix)?;
        // `parse` accepts a leading `+`; an id we sent never has one.
        if !counter.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        counter.parse().ok()
    }
}

/// 64 random bits for a connection's id tag: from the OS (`/dev/urandom`), or if that cannot be
/// read, from std's randomly keyed hasher over the time, the pid and a process-wide counter.
pub(crate) fn random_tag() -> u64 {
    use std::{
        hash::{BuildHasher, Hasher},
        io::Read,
    };
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_ne_bytes(bytes);
    }
    static FALLBACK: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(FALLBACK.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}

async fn write_loop<W: MessageSink>(
    mut sink: W,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed.subscribe();
    loop {
        let outgoing = tokio::select! {
            outgoing = outbox.recv() => outgoing,
            _ = closed.wait_for(Option::is_some) => None,
        };
        let Some(Outgoing {
            id,
            command,
            bytes,
            fds,
        }) = outgoing
        else {
            sink.shutdown().await;
            return;
        };
        if let Err(source) = sink.send(&bytes, &fds).await {
            let reason: Arc<str> = format!("write of `{command}` failed: {source}").into();
            shared.deliver(id, Err(Error::Send { command, source }));
            shared.shut_down(reason);
            return;
        }
    }
}

/// The write side of a transport: whole messages, optionally with file descriptors.
trait MessageSink: Send + 'static {
    fn send(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> impl Future<Output = io::Result<()>> + Send;
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

struct PlainSink<W> {
    writer: W,
}

impl<W: AsyncWrite + Unpin + Send + 'static> MessageSink for PlainSink<W> {
    async fn send(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        debug_assert!(
            fds.is_empty(),
            "fd passing is refused before reaching a plain sink"
        );
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    async fn shutdown(&mut self) {
        let _ = self.writer.shutdown().await;
    }
}

struct UnixSocketSink {
    half: OwnedWriteHalf,
}

impl MessageSink for UnixSocketSink {
    async fn send(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        let mut written = 0;
        if !fds.is_empty() {
            // The descriptors ride along with the first bytes of the message; QEMU queues them
            // on the connection and hands them to the command when it parses it.
            written = send_with_fds(self.half.as_ref(), bytes, fds).await?;
        }
        self.half.write_all(&bytes[written..]).await?;
        self.half.flush().await
    }

    async fn shutdown(&mut self) {
        let _ = self.half.shutdown().await;
    }
}

async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let raw: Vec<_> = fds.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[io::IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_a_per_connection_tag_and_decode_only_our_own() {
        let (ours, theirs) = (RequestIds::new(), RequestIds::new());
        assert_ne!(ours.prefix, theirs.prefix);
        assert_eq!(ours.next(), 0);
        let id = ours.next();
        let wire = json!(ours.encode(id));
        assert_eq!(ours.decode(Some(&wire)), Some(id));
        assert_eq!(theirs.decode(Some(&wire)), None);
        let plus = json!(format!("{}+1", ours.prefix));
        for foreign in [
            json!(1),
            json!("1"),
            plus,
            json!(format!("{}x", ours.prefix)),
            Value::Null,
        ] {
            assert_eq!(ours.decode(Some(&foreign)), None, "{foreign}");
        }
        assert_eq!(ours.decode(None), None);
    }
}
