//! The client that carries calls to upstreams.
//!
//! `https://` upstreams (the hosted providers) go through hyper with rustls,
//! HTTP/2 or HTTP/1.1 as ALPN decides. `http://` upstreams (local model
//! servers, sidecars, compatibles on the same host) speak HTTP/1.1 over a
//! pool of Warden's own: the call's task writes the request and reads the
//! answer itself, with no connection task, channel or second wake-up in
//! between, which is most of what hyper's client costs per call when the
//! upstream is a few microseconds away.
//!
//! Each proxy worker owns one client, so a pooled connection is only ever
//! used by the thread whose reactor it is registered with.

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http_server::h1::{
    BodyPiece, ChunkState, HeadCopy, poll_read_appending, read_fields, read_more, write_fields,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Idle pooled connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and worker; more are closed.
const MAX_IDLE_PER_HOST: usize = 256;
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// A request body up to this size is copied behind its head and sent in one
/// write; a larger one is written after it.
const COALESCE_BODY: usize = 16 * 1024;
/// A connection idle this long may have been closed by the upstream (its
/// keep-alive timer) just as Warden sent on it: a failure before any answer
/// is then taken for that and retried once on a new connection. Sooner
/// after an answer the upstream may have started the call, which is not
/// sent twice.
const STALE_AFTER: Duration = Duration::from_secs(1);

pub type TlsClient = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {authority} took longer than {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout { authority: String },
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before it answered")]
    ClosedBeforeAnswer,
    #[error("the upstream closed the connection in the middle of its answer")]
    ClosedMidAnswer,
    #[error("the upstream's answer is not valid HTTP/1.1: {0}")]
    Malformed(String),
    #[error("the upstream URL `{0}` has no host")]
    NoHost(String),
    #[error(transparent)]
    Tls(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    TlsBody(#[from] hyper::Error),
    #[error("cannot set up TLS for upstream calls: {0}")]
    TlsSetup(String),
}

/// Pooled upstream client: hyper for TLS, Warden's own HTTP/1.1 for plain
/// HTTP.
pub struct UpstreamClient {
    tls: TlsClient,
    plain: Arc<Pool>,
}

impl UpstreamClient {
    pub fn new() -> Result<UpstreamClient, ClientError> {
        Ok(UpstreamClient {
            tls: tls_client()?,
            plain: Arc::new(Pool::default()),
        })
    }

    /// Sends `request` and returns the answer's head; its body is read as
    /// the caller polls it.
    pub async fn request(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<ResponseBody>, ClientError> {
        if request.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
            return self.plain.clone().request(request).await;
        }
        let response = self.tls.request(request.map(Full::new)).await?;
        Ok(response.map(ResponseBody::Tls))
    }
}

/// A hyper client with rustls and the Mozilla roots, for webhooks and TLS
/// upstreams.
pub fn tls_client() -> Result<TlsClient, ClientError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(TCP_KEEPALIVE));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| ClientError::TlsSetup(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(HyperClient::builder(TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(usize::MAX)
        .build(https))
}

struct Idle {
    authority: Arc<str>,
    stream: TcpStream,
    since: Instant,
}

/// Idle keep-alive connections, most recently used last.
#[derive(Default)]
struct Pool {
    idle: Mutex<Vec<Idle>>,
}

struct Conn {
    stream: TcpStream,
    /// The pool's key, kept with the connection so a reused one costs no
    /// allocation.
    authority: Arc<str>,
    /// When it was last put back idle; `None` for a new connection.
    idle_since: Option<Instant>,
}

impl Pool {
    async fn request(
        self: Arc<Pool>,
        request: Request<Bytes>,
    ) -> Result<Response<ResponseBody>, ClientError> {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .ok_or_else(|| ClientError::NoHost(request.uri().to_string()))?;
        let message = encode_request(&request, authority);
        let mut conn = match self.checkout(authority) {
            Some(conn) => conn,
            // Boxed, as is the retry's: a new connection is the rare case,
            // and its future (a name lookup, a timeout) would otherwise add
            // a sixth to every call's future (1,584 bytes, 1,856 unboxed).
            None => Box::pin(connect(request.uri(), authority.into())).await?,
        };
        loop {
            match exchange(&mut conn.stream, &message).await {
                Ok(head) => return Ok(self.answer(head, conn)),
                Err(failure) => {
                    let retry = failure.before_answer
                        && conn.idle_since.is_some_and(|since| {
                            failure.at_write || since.elapsed() >= STALE_AFTER
                        });
                    if !retry {
                        return Err(failure.error);
                    }
                    tracing::debug!(%authority, error = %failure.error, "pooled upstream connection was stale; retrying on a new one");
                    conn = Box::pin(connect(request.uri(), conn.authority)).await?;
                }
            }
        }
    }

    /// The most recently used live connection to `authority`, if any.
    fn checkout(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(position) = idle.iter().rposition(|c| &*c.authority == authority) {
            // `remove`, not `swap_remove`: the others keep their order of use.
            let candidate = idle.remove(position);
            if candidate.since.elapsed() < IDLE_TIMEOUT && still_open(&candidate.stream) {
                return Some(Conn {
                    stream: candidate.stream,
                    authority: candidate.authority,
                    idle_since: Some(candidate.since),
                });
            }
        }
        None
    }

    fn checkin(&self, authority: Arc<str>, stream: TcpStream) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < IDLE_TIMEOUT);
        if idle.iter().filter(|c| c.authority == authority).count() >= MAX_IDLE_PER_HOST {
            return;
        }
        idle.push(Idle {
            authority,
            stream,
            since: now,
        });
    }

    fn answer(self: Arc<Pool>, head: ResponseHead, conn: Conn) -> Response<ResponseBody> {
        let ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
            rest,
        } = head;
        let mut body = PlainBody {
            stream: Some(conn.stream),
            buf: rest,
            framing,
            keep_alive,
            pool: self,
            authority: conn.authority,
        };
        body.finish_if_done();
        let mut response = Response::new(ResponseBody::Plain(body));
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        response
    }
}

/// Whether an idle connection can carry another request: nothing arrived on
/// it since its last answer (no close, no stray bytes). Costs no system call
/// unless the socket became readable.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

async fn connect(uri: &Uri, authority: Arc<str>) -> Result<Conn, ClientError> {
    let host = uri
        .host()
        .ok_or_else(|| ClientError::NoHost(uri.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| ClientError::ConnectTimeout {
            authority: authority.to_string(),
        })?
        .map_err(|source| ClientError::Connect {
            authority: authority.to_string(),
            source,
        })?;
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    Ok(Conn {
        stream,
        authority,
        idle_since: None,
    })
}

/// The request line, `host`, the given headers (framing headers dropped)
/// and a content-length, followed by the body when it is small.
fn encode_request(request: &Request<Bytes>, authority: &str) -> OutgoingMessage {
    let body = request.body();
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(
        256 + if body.len() <= COALESCE_BODY {
            body.len()
        } else {
            0
        },
    );
    head.extend_from_slice(request.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    write_fields(&mut head, request.headers());
    // Written into the head: no String for the number.
    let _ = write!(head, "content-length: {}\r\n\r\n", body.len());
    if body.len() <= COALESCE_BODY {
        head.extend_from_slice(body);
        OutgoingMessage {
            head,
            body: Bytes::new(),
        }
    } else {
        OutgoingMessage {
            head,
            body: body.clone(),
        }
    }
}

struct OutgoingMessage {
    head: Vec<u8>,
    body: Bytes,
}

struct Failure {
    error: ClientError,
    /// Nothing of an answer had arrived.
    before_answer: bool,
    /// The request could not be written.
    at_write: bool,
}

struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    /// Bytes read past the head: the start of the body.
    rest: BytesMut,
}

/// Writes the request and reads the answer's head (skipping interim 1xx).
async fn exchange(
    stream: &mut TcpStream,
    message: &OutgoingMessage,
) -> Result<ResponseHead, Failure> {
    let write_failed = |error: io::Error| Failure {
        error: ClientError::Io(error),
        before_answer: true,
        at_write: true,
    };
    stream
        .write_all(&message.head)
        .await
        .map_err(write_failed)?;
    if !message.body.is_empty() {
        stream
            .write_all(&message.body)
            .await
            .map_err(write_failed)?;
    }
    let mut buf = BytesMut::new();
    // Not `buf.is_empty()`: a skipped 1xx answer leaves it empty, yet the
    // upstream has the call.
    let mut answered = false;
    loop {
        let read = read_more(stream, &mut buf).await;
        answered |= matches!(read, Ok(n) if n > 0);
        let before_answer = !answered;
        let failed = |error| Failure {
            error,
            before_answer,
            at_write: false,
        };
        match read {
            Ok(0) if before_answer => return Err(failed(ClientError::ClosedBeforeAnswer)),
            Ok(0) => return Err(failed(ClientError::ClosedMidAnswer)),
            Ok(_) => {}
            Err(e) => return Err(failed(ClientError::Io(e))),
        }
        loop {
            match parse_head(&buf).map_err(&failed)? {
                None if buf.len() > MAX_HEAD_BYTES => {
                    return Err(failed(ClientError::Malformed(format!(
                        "its head is longer than {MAX_HEAD_BYTES} bytes"
                    ))));
                }
                None => break,
                Some((len, Parsed::Interim)) => {
                    buf.advance(len);
                }
                Some((len, Parsed::Final(mut head))) => {
                    buf.advance(len);
                    head.rest = buf;
                    return Ok(head);
                }
            }
        }
    }
}

enum Parsed {
    /// 100 Continue, 103 Early Hints: skipped.
    Interim,
    Final(ResponseHead),
}

fn parse_head(buf: &[u8]) -> Result<Option<(usize, Parsed)>, ClientError> {
    // Left uninitialised: filling 128 empty headers was most of the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())
        .map_err(|_| ClientError::Malformed("its status code is not valid".into()))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some((len, Parsed::Interim)));
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let fields = read_fields(version, parsed.headers, &HeadCopy::new(buf, len))
        .map_err(|e| ClientError::Malformed(e.to_string()))?;
    let mut keep_alive = fields.keep_alive;
    let no_body = status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The connection speaks something else now.
        keep_alive = false;
    }
    let framing = match (no_body, fields.chunked, fields.content_length) {
        (true, _, _) => Framing::Done,
        // A transfer coding wins over a length (RFC 9112 §6.3); one that
        // does not end in chunked runs to the close.
        (_, Some(true), _) => Framing::Chunked(ChunkState::Size),
        (_, Some(false), _) | (_, None, None) => {
            keep_alive = false;
            Framing::UntilClose
        }
        (_, None, Some(0)) => Framing::Done,
        (_, None, Some(len)) => Framing::Length(len),
    };
    Ok(Some((
        len,
        Parsed::Final(ResponseHead {
            status,
            version,
            headers: fields.headers,
            framing,
            keep_alive,
            rest: BytesMut::new(),
        }),
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
    Done,
}

/// Takes the next piece of body out of `buf`: as much of the current chunk
/// (or length) as has arrived, so a streamed event goes on as soon as it
/// is read.
fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<BodyPiece, ClientError> {
    match framing {
        Framing::Done => Ok(BodyPiece::End),
        _ if buf.is_empty() && !matches!(framing, Framing::Chunked(_)) => Ok(BodyPiece::NeedMore),
        Framing::Length(left) => {
            let take = (*left).min(buf.len() as u64) as usize;
            *left -= take as u64;
            let data = buf.split_to(take).freeze();
            if *left == 0 {
                *framing = Framing::Done;
            }
            Ok(BodyPiece::Data(data))
        }
        Framing::UntilClose => Ok(BodyPiece::Data(buf.split().freeze())),
        Framing::Chunked(state) => {
            let piece = state
                .decode(buf)
                .map_err(|e| ClientError::Malformed(e.into()))?;
            if matches!(piece, BodyPiece::End) {
                *framing = Framing::Done;
            }
            Ok(piece)
        }
    }
}

/// An upstream answer's body, read as it is polled.
pub enum ResponseBody {
    Plain(PlainBody),
    Tls(Incoming),
}

impl ResponseBody {
    /// The whole body. An answer that arrives in one piece (most do, the
    /// head having brought its start) is handed on as it is: no list of
    /// pieces, no copy.
    pub async fn bytes(self) -> Result<Bytes, ClientError> {
        let mut body = std::pin::pin!(self);
        let mut first = Bytes::new();
        let mut joined: Option<BytesMut> = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            match &mut joined {
                Some(all) => all.extend_from_slice(&data),
                None if first.is_empty() => first = data,
                None => {
                    let mut all = BytesMut::from(&first[..]);
                    all.extend_from_slice(&data);
                    joined = Some(all);
                }
            }
        }
        Ok(joined.map_or(first, BytesMut::freeze))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        match self.get_mut() {
            ResponseBody::Plain(body) => body
                .poll_data(cx)
                .map(|data| data.map(|d| d.map(Frame::data))),
            ResponseBody::Tls(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(ClientError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Plain(body) => body.framing == Framing::Done,
            ResponseBody::Tls(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Plain(body) => match body.framing {
                Framing::Length(left) => SizeHint::with_exact(left),
                Framing::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
            ResponseBody::Tls(body) => body.size_hint(),
        }
    }
}

/// A plain HTTP/1.1 answer's body. Read to its end, its connection goes
/// back to the pool; dropped before (the agent left, a halt cut the call),
/// the connection is closed, which tells the upstream to stop generating.
pub struct PlainBody {
    stream: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    authority: Arc<str>,
}

impl PlainBody {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ClientError>>> {
        loop {
            match decode(&mut self.framing, &mut self.buf) {
                Err(e) => return self.abandon(Some(e)),
                Ok(BodyPiece::Data(data)) => {
                    self.finish_if_done();
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(BodyPiece::End) => {
                    self.finish_if_done();
                    return Poll::Ready(None);
                }
                Ok(BodyPiece::NeedMore) => {}
            }
            let Some(stream) = self.stream.as_mut() else {
                return Poll::Ready(None);
            };
            if self.buf.is_empty() {
                // A stream spends most of its life waiting for the next
                // event: it waits without a buffer, and the one its last
                // event was cut from goes once that event is written.
                self.buf = BytesMut::new();
            }
            let expect = match self.framing {
                Framing::Length(left) => (left as usize).min(64 * 1024),
                _ => 0,
            };
            let read = ready!(poll_read_appending(stream, cx, &mut self.buf, expect));
            match read {
                Ok(0) if self.framing == Framing::UntilClose => return self.abandon(None),
                Ok(0) => return self.abandon(Some(ClientError::ClosedMidAnswer)),
                Ok(_) => {}
                Err(e) => return self.abandon(Some(ClientError::Io(e))),
            }
        }
    }

    /// Ends the body without giving the connection back: at a close-delimited
    /// body's end, or with `error`.
    fn abandon(&mut self, error: Option<ClientError>) -> Poll<Option<Result<Bytes, ClientError>>> {
        self.stream = None;
        self.framing = Framing::Done;
        Poll::Ready(error.map(Err))
    }

    /// At the end of the body, the connection goes back to the pool if the
    /// upstream keeps it open and sent nothing past the answer.
    fn finish_if_done(&mut self) {
        if self.framing != Framing::Done {
            return;
        }
        if let Some(stream) = self.stream.take()
            && self.keep_alive
            && self.buf.is_empty()
        {
            self.pool.checkin(self.authority.clone(), stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn decode_all(
        framing: &mut Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decode(framing, &mut buf)? {
                    BodyPiece::Data(data) => body.extend_from_slice(&data),
                    BodyPiece::NeedMore => break,
                    BodyPiece::End => return Ok((body, buf.is_empty())),
                }
            }
        }
        Ok((body, false))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_split() {
        let wire = b"7\r\ndata: a\r\n2;ext=1\r\n\n\n\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..wire.len() {
            let mut framing = Framing::Chunked(ChunkState::Size);
            let (body, clean) = decode_all(&mut framing, wire, step).unwrap();
            assert_eq!(body, b"data: a\n\n", "step {step}");
            assert!(clean, "step {step}: bytes left after the body");
        }
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        for wire in [&b"zz\r\nabc\r\n"[..], b"3\r\nabcXY0\r\n\r\n"] {
            let mut framing = Framing::Chunked(ChunkState::Size);
            assert!(matches!(
                decode_all(&mut framing, wire, wire.len()),
                Err(ClientError::Malformed(_))
            ));
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut framing = Framing::Length(5);
        let mut buf = BytesMut::from(&b"hello"[..]);
        assert!(
            matches!(decode(&mut framing, &mut buf), Ok(BodyPiece::Data(d)) if &d[..] == b"hello")
        );
        assert_eq!(framing, Framing::Done);
        assert!(matches!(decode(&mut framing, &mut buf), Ok(BodyPiece::End)));
    }

    #[test]
    fn heads_tell_framing_and_reuse() {
        let parse = |wire: &[u8]| match parse_head(wire).unwrap().unwrap().1 {
            Parsed::Final(head) => head,
            Parsed::Interim => panic!("interim"),
        };
        let head = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n");
        assert_eq!((head.framing, head.keep_alive), (Framing::Length(12), true));
        let head =
            parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(head.framing, Framing::Chunked(ChunkState::Size));
        let head = parse(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
        assert_eq!(
            (head.framing, head.keep_alive),
            (Framing::UntilClose, false)
        );
        let head = parse(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n");
        assert!(!head.keep_alive);
        let head = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert!(!head.keep_alive);
        let head = parse(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(head.framing, Framing::Done);
        let head = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((head.framing, head.keep_alive), (Framing::Done, true));
        let head = parse(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
        assert_eq!((head.framing, head.keep_alive), (Framing::Done, false));
        let head = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n");
        assert_eq!(head.framing, Framing::Length(7));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: +7\r\n\r\n").is_err());
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap(),
            Some((_, Parsed::Interim))
        ));
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .is_err()
        );
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn requests_carry_host_and_length_and_no_framing_of_their_own() {
        let mut request = Request::new(Bytes::from_static(b"{}"));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = "http://127.0.0.1:9/v1/chat/completions".parse().unwrap();
        request
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("99"));
        request
            .headers_mut()
            .insert("x-stainless-lang", HeaderValue::from_static("python"));
        let message = encode_request(&request, "127.0.0.1:9");
        assert_eq!(
            String::from_utf8(message.head).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-stainless-lang: python\r\ncontent-length: 2\r\n\r\n{}"
        );
        assert!(message.body.is_empty());
    }
}
