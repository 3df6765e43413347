//! Warden's own HTTP/1.1 server for the agent port.
//!
//! Why not hyper here: hyper keeps an 8 KiB read buffer and an 8 KiB write
//! buffer for every connection for as long as it lives, and a call held for
//! approval keeps its connection open for minutes; ten thousand held calls
//! were half a gigabyte of idle buffers. The proxy needs a request's whole
//! body before it decides anything, so this server reads the request whole,
//! hands the handler an exactly sized body, and keeps no buffer while the
//! handler runs or the connection idles: a held call costs its own state and
//! the socket. Responses are written as their frames come (head and a whole
//! body in one write; streams chunk by chunk, coalescing what is ready).
//!
//! HTTP/2 with prior knowledge (h2c) is recognised by its preface and handed
//! to hyper.

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::RequestBody;
use crate::providers::{self, Endpoint, ErrorKind};

pub struct Options {
    /// Bodies above this are not read: the handler gets `RequestBody::TooLarge`.
    pub max_body_bytes: u64,
    /// From a request's first byte to the end of its head.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a request body may go without a byte arriving.
    pub body_progress_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            max_body_bytes: 32 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            body_progress_timeout: Duration::from_secs(30),
        }
    }
}

/// nginx answers 400/431 past 4 × 8 KiB of request line and headers; allow twice that.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The most one read takes through the per-thread scratch buffer.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Bytes of a pipelined next request taken in while the current one is served.
const MAX_PIPELINED: usize = 64 * 1024;
/// Response bytes gathered before a write.
const WRITE_BATCH: usize = 64 * 1024;
/// A body frame this large is written from its own buffer rather than copied.
const WRITE_DIRECT: usize = 16 * 1024;
/// How long, and how much, a closing connection reads and drops.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves the agent port until `shutdown` turns true, then lets in-flight
/// requests finish within `grace`.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    options: Options,
) where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
{
    let options = Arc::new(options);
    // Every connection holds a sender; `recv` returns None once all are gone.
    let (alive, mut all_closed) = mpsc::channel::<Infallible>(1);
    loop {
        tokio::select! {
            stream = super::accept(&listener, "proxy") => {
                let connection = Connection {
                    stream,
                    buf: BytesMut::new(),
                    options: options.clone(),
                    shutdown: shutdown.clone(),
                    _alive: alive.clone(),
                };
                tokio::spawn(connection.run(handler.clone()));
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(alive);
    tokio::select! {
        _ = all_closed.recv() => tracing::info!(listener = "proxy", "all connections finished"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = "proxy", grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet consumed; no capacity kept between requests.
    buf: BytesMut,
    options: Arc<Options>,
    shutdown: watch::Receiver<bool>,
    _alive: mpsc::Sender<Infallible>,
}

/// A request head, its header values copied out of the read buffer.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

// One per request and moved straight out: boxing the head would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Head),
    Http2,
    Closed,
}

/// A request Warden cannot read as HTTP: answered, then the connection closes.
#[derive(Debug, PartialEq, Eq)]
struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    fn bad(message: impl Into<String>) -> HttpError {
        HttpError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl Head {
    fn into_request(self, body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

// One per request, moved straight out, like `Next`.
#[allow(clippy::large_enum_variant)]
enum Read {
    Request(Request<RequestBody>, Answering),
    /// The agent hung up, the connection idled out or Warden is stopping.
    Closed,
    Exit(Exit),
}

/// What writing the answer needs to know of the request.
#[derive(Clone, Copy)]
struct Answering {
    version: Version,
    is_head: bool,
    /// The agent lets the connection carry another request.
    keep_alive: bool,
}

/// How a connection's HTTP/1.1 loop ends when it is not simply closed.
enum Exit {
    Http2,
    /// The head boxed: the matched-apart exit stays in the connection's
    /// frame while the refusal is written.
    Refuse(Option<Box<Head>>, HttpError),
    /// The answer said the connection closes: linger, then close.
    Close,
}

/// Why reading a body stopped before its end.
enum BodyError {
    /// The agent went away: nobody to answer.
    Gone,
    Http(HttpError),
}

impl Connection {
    /// Serves the connection's requests in turn.
    ///
    /// Laid out for a held call, which waits in `answer` for minutes with
    /// only this frame and the call's own future: every other stage is
    /// boxed, and the frame is an `async` block rather than an `async fn`
    /// so that `self` and the handler are not stored twice (rustc moves an
    /// `async fn`'s arguments into locals next to the captured originals).
    /// Nothing borrowed lives across an await here either: rustc keeps a
    /// borrowed local's storage until its scope ends. 1,680 bytes per
    /// connection before, 216 now (a test keeps it small).
    #[allow(clippy::manual_async_fn)]
    fn run<F, Fut, B>(mut self, handler: F) -> impl Future<Output = ()> + Send
    where
        F: Fn(Request<RequestBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
    {
        async move {
            let exit = loop {
                let read = Box::pin(self.read_request());
                let (request, answering) = match read.await {
                    Read::Request(request, answering) => (request, answering),
                    Read::Closed => return,
                    Read::Exit(exit) => break exit,
                };
                let work = Box::pin(handler(request));
                let Some(response) = self.answer(work).await else {
                    return;
                };
                let keep_alive = answering.keep_alive && !*self.shutdown.borrow();
                let write = Box::pin(self.write_response(
                    response,
                    answering.version,
                    answering.is_head,
                    keep_alive,
                ));
                match write.await {
                    Ok(true) => {}
                    Ok(false) => break Exit::Close,
                    Err(_) => return,
                }
            };
            let last: Pin<Box<dyn Future<Output = ()> + Send>> = match exit {
                // hyper's HTTP/2 connection is large and rare here.
                Exit::Http2 => Box::pin(self.into_http2(handler)),
                Exit::Refuse(head, error) => Box::pin(self.refuse(head, error)),
                Exit::Close => Box::pin(self.close()),
            };
            last.await
        }
    }

    /// Reads the next request, head and body.
    async fn read_request(&mut self) -> Read {
        let head = match self.read_head().await {
            Ok(Next::Request(head)) => head,
            Ok(Next::Closed) => return Read::Closed,
            Ok(Next::Http2) => return Read::Exit(Exit::Http2),
            Err(error) => return Read::Exit(Exit::Refuse(None, error)),
        };
        let body = self.read_body(&head).await;
        let mut answering = Answering {
            version: head.version,
            is_head: head.method == Method::HEAD,
            keep_alive: head.keep_alive,
        };
        match body {
            Ok(RequestBody::TooLarge) => {
                answering.keep_alive = false;
                Read::Request(head.into_request(RequestBody::TooLarge), answering)
            }
            Ok(body) => Read::Request(head.into_request(body), answering),
            Err(BodyError::Gone) => Read::Closed,
            Err(BodyError::Http(error)) => Read::Exit(Exit::Refuse(Some(Box::new(head)), error)),
        }
    }

    /// Waits for the next request head: `Closed` when the agent hangs up, the
    /// connection idles out, or Warden stops between requests.
    async fn read_head(&mut self) -> Result<Next, HttpError> {
        let mut first_byte_at = (!self.buf.is_empty()).then(Instant::now);
        loop {
            if !self.buf.is_empty() {
                let seen = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..seen] == H2_PREFACE[..seen] {
                    if seen == H2_PREFACE.len() {
                        return Ok(Next::Http2);
                    }
                } else {
                    let parsed = parse_head(&self.buf)?;
                    let head_len = parsed.as_ref().map_or(self.buf.len(), |(_, len)| *len);
                    if head_len > MAX_HEAD_BYTES {
                        return Err(HttpError {
                            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            message: format!(
                                "the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
                            ),
                        });
                    }
                    if let Some((head, len)) = parsed {
                        self.buf.advance(len);
                        return Ok(Next::Request(head));
                    }
                }
            }
            let deadline = match first_byte_at {
                Some(at) => at + self.options.header_read_timeout,
                None => Instant::now() + self.options.idle_timeout,
            };
            let idle = self.buf.is_empty();
            let read = tokio::select! {
                read = read_more(&mut self.stream, &mut self.buf) => read,
                () = tokio::time::sleep_until(deadline) => {
                    return if idle {
                        Ok(Next::Closed)
                    } else {
                        Err(HttpError {
                            status: StatusCode::REQUEST_TIMEOUT,
                            message: format!(
                                "the request head did not arrive within {} s",
                                self.options.header_read_timeout.as_secs()
                            ),
                        })
                    };
                }
                () = stopping(&mut self.shutdown), if idle => return Ok(Next::Closed),
            };
            match read {
                Ok(0) | Err(_) => return Ok(Next::Closed),
                Ok(_) => {
                    first_byte_at.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Reads the whole body into one exactly sized buffer.
    async fn read_body(&mut self, head: &Head) -> Result<RequestBody, BodyError> {
        let limit = self.options.max_body_bytes;
        match head.framing {
            Framing::Empty => Ok(RequestBody::Whole(Bytes::new())),
            Framing::Length(len) if len > limit => Ok(RequestBody::TooLarge),
            Framing::Length(len) => {
                let len = len as usize;
                if head.expect_continue && self.buf.len() < len {
                    self.continue_100().await?;
                }
                let mut body = vec![0; len];
                let buffered = self.buf.len().min(len);
                body[..buffered].copy_from_slice(&self.buf[..buffered]);
                self.buf.advance(buffered);
                let mut filled = buffered;
                while filled < len {
                    let read = tokio::time::timeout(
                        self.options.body_progress_timeout,
                        self.stream.read(&mut body[filled..]),
                    )
                    .await;
                    filled += match read {
                        Err(_) => return Err(self.stalled()),
                        Ok(Ok(0)) | Ok(Err(_)) => return Err(BodyError::Gone),
                        Ok(Ok(n)) => n,
                    };
                }
                Ok(RequestBody::Whole(Bytes::from(body)))
            }
            Framing::Chunked => {
                if head.expect_continue {
                    self.continue_100().await?;
                }
                let (mut state, mut body) = (ChunkState::Size, BytesMut::new());
                loop {
                    match decode_chunk(&mut state, &mut self.buf, &mut body, limit) {
                        Ok(Chunk::Done) => return Ok(RequestBody::Whole(body.freeze())),
                        Ok(Chunk::TooLarge) => return Ok(RequestBody::TooLarge),
                        Ok(Chunk::More) => {}
                        Err(error) => return Err(BodyError::Http(error)),
                    }
                    let read = tokio::time::timeout(
                        self.options.body_progress_timeout,
                        read_more(&mut self.stream, &mut self.buf),
                    )
                    .await;
                    match read {
                        Err(_) => return Err(self.stalled()),
                        Ok(Ok(0)) | Ok(Err(_)) => return Err(BodyError::Gone),
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    }

    /// A body that stopped arriving: answered 408 rather than holding the
    /// connection for ever.
    fn stalled(&self) -> BodyError {
        BodyError::Http(HttpError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body stopped arriving: no bytes for {} s",
                self.options.body_progress_timeout.as_secs_f64()
            ),
        })
    }

    async fn continue_100(&mut self) -> Result<(), BodyError> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| BodyError::Gone)
    }

    /// Runs the handler while watching the socket: an agent that hangs up
    /// drops the handler, which cancels its call (a held approval stays
    /// pending; an upstream request is abandoned).
    async fn answer<Fut, B>(&mut self, mut handler: Pin<Box<Fut>>) -> Option<Response<B>>
    where
        Fut: Future<Output = Response<B>>,
    {
        if self.buf.is_empty() {
            // Give the read buffer back while the call is in the handler.
            self.buf = BytesMut::new();
        }
        loop {
            tokio::select! {
                biased;
                response = &mut handler => return Some(response),
                gone = watch_hangup(&mut self.stream, &mut self.buf) => if gone {
                    return None;
                },
            }
        }
    }

    /// Writes the response; `Ok(true)` when the connection can carry another request.
    async fn write_response<B>(
        &mut self,
        response: Response<B>,
        version: Version,
        is_head: bool,
        keep_alive: bool,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let framing = match body.size_hint().exact().or(declared) {
            Some(len) => ResponseFraming::Length(len),
            None if version == Version::HTTP_11 => ResponseFraming::Chunked,
            None => ResponseFraming::UntilClose,
        };
        let keep_alive = keep_alive && framing != ResponseFraming::UntilClose;
        let mut out = Vec::with_capacity(
            512 + match framing {
                ResponseFraming::Length(len) if !bodiless && len as usize <= WRITE_DIRECT => {
                    len as usize
                }
                _ => 0,
            },
        );
        encode_head(
            &mut out,
            status,
            &parts.headers,
            framing,
            bodiless,
            keep_alive,
            version,
        );
        // A stream may go on for minutes: its head's map (and the upstream
        // answer's buffers its values may share) is not kept meanwhile.
        drop(parts);
        if bodiless {
            self.stream.write_all(&out).await?;
            return Ok(keep_alive);
        }
        let chunked = framing == ResponseFraming::Chunked;
        loop {
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => {
                    // Nothing more is ready: send what is gathered, then wait
                    // for the next frame while watching for a hang-up.
                    if !out.is_empty() {
                        self.stream.write_all(&out).await?;
                        out.clear();
                    }
                    tokio::select! {
                        biased;
                        frame = body.frame() => frame,
                        gone = watch_hangup(&mut self.stream, &mut self.buf) => {
                            if gone {
                                return Ok(false);
                            }
                            continue;
                        }
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            if chunked {
                let _ = write!(out, "{:x}\r\n", data.len());
            }
            if data.len() >= WRITE_DIRECT {
                self.stream.write_all(&out).await?;
                out.clear();
                self.stream.write_all(&data).await?;
            } else {
                out.extend_from_slice(&data);
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= WRITE_BATCH {
                self.stream.write_all(&out).await?;
                out.clear();
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            self.stream.write_all(&out).await?;
        }
        Ok(keep_alive)
    }

    /// Answers a request that is not readable HTTP in the format its path
    /// suggests, then closes.
    async fn refuse(mut self, head: Option<Box<Head>>, error: HttpError) {
        let path = head.as_ref().map_or("", |h| h.uri.path());
        let protocol = Endpoint::guess_protocol(
            path,
            head.as_ref().map_or(&HeaderMap::new(), |h| &h.headers),
        );
        tracing::debug!(status = %error.status, reason = %error.message, "unreadable HTTP request");
        let body = providers::error_body(
            protocol,
            ErrorKind::InvalidRequest,
            "bad_http_request",
            &error.message,
        );
        let mut response = Response::new(http_body_util::Full::new(body));
        *response.status_mut() = error.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self
            .write_response(response, Version::HTTP_11, false, false)
            .await
            .is_ok()
        {
            self.close().await;
        }
    }

    /// Ends the connection after a final answer. The agent may still be
    /// sending (a body Warden refused to read): closing with unread bytes
    /// would reset the connection and could destroy the answer in flight, so
    /// what arrives is read and dropped for a moment first, as nginx's
    /// lingering close does.
    async fn close(mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let linger = async {
            // On the heap: an array here would make every connection's task that large.
            let mut scratch = vec![0u8; 4096];
            let mut drained = 0usize;
            while drained < LINGER_BYTES {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }

    async fn into_http2<F, Fut, B>(self, handler: F)
    where
        F: Fn(Request<RequestBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
    {
        let Connection {
            stream,
            buf,
            mut shutdown,
            options,
            ..
        } = self;
        let limit = options.max_body_bytes;
        let io = TokioIo::new(Rewind {
            read: buf.freeze(),
            stream,
        });
        let handler = Arc::new(handler);
        let service = service_fn(move |request: Request<Incoming>| {
            // An announced body over the limit is refused without being read.
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let response = handler(request.map(|body| match declared {
                Some(len) if len > limit => RequestBody::TooLarge,
                _ => RequestBody::Streaming(body),
            }));
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = stopping(&mut shutdown) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
        }
    }
}

/// Reads whatever the agent sends while its request is being served: a
/// pipelined next request is kept (up to `MAX_PIPELINED`), a hang-up is
/// reported. Never resolves once enough is buffered.
async fn watch_hangup(stream: &mut TcpStream, buf: &mut BytesMut) -> bool {
    if buf.len() >= MAX_PIPELINED {
        return std::future::pending().await;
    }
    matches!(read_more(stream, buf).await, Ok(0) | Err(_))
}

/// Reads what the socket has into `buf`; an idle kept-alive connection
/// holds no buffer (see `poll_read_appending`).
pub async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_appending(stream, cx, buf, 0)).await
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[std::mem::MaybeUninit<u8>]>> =
        std::cell::RefCell::new(Box::new_uninit_slice(SCRATCH_BYTES));
}

/// Reads what `stream` has and appends it to `buf`, which grows by just the
/// bytes read. A call's head and small body arrive in one read of a few
/// hundred bytes: reading them into a per-thread scratch buffer and keeping
/// only those bytes spares a read-sized allocation per call on each side of
/// the proxy (an 8 KiB block is eight to a mimalloc page: pages emptied and
/// refilled at every turn of the load, given back and faulted in again).
/// `expect` is how many bytes are known to be on their way; more than the
/// scratch holds are read straight into `buf`.
///
/// Through `AsyncRead`, not `try_read`: a short read there also clears the
/// socket's readiness, so the next wait is for the next event instead of
/// first making a `recv` that can only say "nothing yet".
pub fn poll_read_appending(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    expect: usize,
) -> Poll<io::Result<usize>> {
    if expect > SCRATCH_BYTES || buf.capacity() - buf.len() >= SCRATCH_BYTES {
        buf.reserve(expect);
        return tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf);
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut read = ReadBuf::uninit(scratch);
        ready!(Pin::new(stream).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
}

/// Resolves once Warden is stopping.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    // Left uninitialised: filling 128 empty headers was most of the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message: format!("the request has more than {MAX_HEADERS} headers"),
            });
        }
        Err(e) => {
            return Err(HttpError::bad(format!(
                "the request is not valid HTTP/1.1: {e}"
            )));
        }
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| HttpError::bad("the request method is not valid"))?;
    let head = HeadCopy::new(buf, len);
    let uri = Uri::from_maybe_shared(head.share(parsed.path.unwrap_or_default().as_bytes()))
        .map_err(|e| HttpError::bad(format!("the request target is not a valid URI: {e}")))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let fields =
        read_fields(version, parsed.headers, &head).map_err(|e| HttpError::bad(e.to_string()))?;
    let framing = match (fields.chunked, fields.content_length) {
        (Some(false), _) => {
            return Err(HttpError::bad(
                "transfer-encoding must end with chunked; send the body chunked or with a content-length",
            ));
        }
        (Some(true), Some(_)) => {
            return Err(HttpError::bad(
                "the request has both transfer-encoding and content-length; send one",
            ));
        }
        (Some(true), None) => Framing::Chunked,
        (None, None | Some(0)) => Framing::Empty,
        (None, Some(len)) => Framing::Length(len),
    };
    let head = Head {
        method,
        uri,
        version,
        headers: fields.headers,
        framing,
        keep_alive: fields.keep_alive,
        expect_continue: fields.expect_continue,
    };
    Ok(Some((head, len)))
}

/// What a message's header fields say about its framing and connection.
pub(crate) struct MessageFields {
    pub headers: HeaderMap,
    pub content_length: Option<u64>,
    /// With a transfer-encoding: whether its last coding is chunked (only
    /// the last one tells the framing).
    pub chunked: Option<bool>,
    /// `close` wins; otherwise `keep-alive`, or HTTP/1.1's default.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FieldError {
    #[error("`{0}` is not a valid header name")]
    Name(String),
    #[error("content-length is not a number")]
    LengthNotANumber,
    #[error("conflicting content-length values")]
    LengthsConflict,
}

/// A message head copied once out of the connection's read buffer, so that
/// the header values can share it (one allocation for all of them) without
/// keeping the read buffer alive as long as a held call keeps its headers.
pub(crate) struct HeadCopy<'a> {
    buf: &'a [u8],
    head: Bytes,
}

impl<'a> HeadCopy<'a> {
    /// `buf` starts with the head, which is `len` bytes long.
    pub(crate) fn new(buf: &'a [u8], len: usize) -> HeadCopy<'a> {
        HeadCopy {
            buf,
            head: Bytes::copy_from_slice(&buf[..len]),
        }
    }

    /// The copy of `part`, a slice httparse returned from the head in `buf`.
    pub(crate) fn share(&self, part: &[u8]) -> Bytes {
        let start = (part.as_ptr() as usize)
            .checked_sub(self.buf.as_ptr() as usize)
            .filter(|start| start + part.len() <= self.head.len());
        match start {
            Some(start) => self.head.slice(start..start + part.len()),
            // Not from the head: httparse only hands out slices of it.
            None => Bytes::copy_from_slice(part),
        }
    }
}

/// Reads parsed header fields, for requests and answers alike. Shared with
/// the upstream client.
pub(crate) fn read_fields(
    version: Version,
    fields: &[httparse::Header<'_>],
    head: &HeadCopy<'_>,
) -> Result<MessageFields, FieldError> {
    let mut out = MessageFields {
        headers: HeaderMap::with_capacity(fields.len()),
        content_length: None,
        chunked: None,
        keep_alive: version == Version::HTTP_11,
        expect_continue: false,
    };
    let (mut close, mut keep_alive) = (false, false);
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| FieldError::Name(field.name.to_owned()))?;
        let value = header_value(head.share(field.value));
        if name == header::CONTENT_LENGTH {
            out.content_length = Some(merge_content_length(out.content_length, field.value)?);
        } else if name == header::TRANSFER_ENCODING {
            out.chunked = Some(
                tokens(&value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case("chunked")),
            );
        } else if name == header::CONNECTION {
            for token in tokens(&value) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name == header::EXPECT {
            out.expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        out.headers.append(name, value);
    }
    out.keep_alive = !close && (keep_alive || out.keep_alive);
    Ok(out)
}

/// A field value httparse has read: it accepts in a value exactly the bytes
/// a `HeaderValue` may hold (tab, 0x20-0x7e, 0x80-0xff; checked for every
/// byte by `httparse_and_http_agree_on_field_value_bytes`), so checking
/// them again, byte by byte, would only cost time.
fn header_value(value: Bytes) -> HeaderValue {
    // SAFETY: httparse refused the head unless every byte of the value is
    // one `HeaderValue` allows (see above; `http` checks again in debug
    // builds).
    unsafe { HeaderValue::from_maybe_shared_unchecked(value) }
}

/// The length a `content-length` field gives, together with one seen
/// before: digits only, a comma list of equal values accepted (RFC 9110
/// §8.6), different values refused.
fn merge_content_length(known: Option<u64>, value: &[u8]) -> Result<u64, FieldError> {
    let mut length = known;
    for part in value.split(|b| *b == b',') {
        let len = std::str::from_utf8(part)
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(FieldError::LengthNotANumber)?;
        if length.is_some_and(|seen| seen != len) {
            return Err(FieldError::LengthsConflict);
        }
        length = Some(len);
    }
    length.ok_or(FieldError::LengthNotANumber)
}

/// The comma-separated tokens of a header value (`Connection`,
/// `Transfer-Encoding`); shared with the upstream client.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// The body ended (and its trailers were skipped).
    Done,
    /// Needs more bytes from the socket.
    More,
    TooLarge,
}

/// Moves what has arrived of a chunked body from `buf` into `body`.
fn decode_chunk(
    state: &mut ChunkState,
    buf: &mut BytesMut,
    body: &mut BytesMut,
    limit: u64,
) -> Result<Chunk, HttpError> {
    loop {
        match state.decode(buf).map_err(HttpError::bad)? {
            BodyPiece::Data(data) => {
                if (body.len() + data.len()) as u64 > limit {
                    return Ok(Chunk::TooLarge);
                }
                body.extend_from_slice(&data);
            }
            BodyPiece::End => return Ok(Chunk::Done),
            BodyPiece::NeedMore => {
                if let ChunkState::Data(left) = *state {
                    // Refused on its size line, not once it has arrived.
                    if body.len() as u64 + left > limit {
                        return Ok(Chunk::TooLarge);
                    }
                    buf.reserve(left as usize + 2);
                }
                return Ok(Chunk::More);
            }
        }
    }
}

/// Where the decoding of a chunked body stands. Shared with the upstream
/// client, which passes each piece on as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, expecting its CRLF.
    DataEnd,
    /// After the last chunk: trailers up to an empty line.
    Trailers,
    Done,
}

/// What a body's framing makes of the buffered bytes.
pub(crate) enum BodyPiece {
    Data(Bytes),
    NeedMore,
    End,
}

impl ChunkState {
    /// Takes the next piece of body out of `buf`: as much of the current
    /// chunk as has arrived. Trailers are skipped; nothing past the body is
    /// consumed.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<BodyPiece, &'static str> {
        loop {
            match *self {
                ChunkState::Done => return Ok(BodyPiece::End),
                ChunkState::Size => {
                    let Some(line_end) = memchr::memmem::find(buf, b"\r\n") else {
                        if buf.len() > 1024 {
                            return Err("a chunk size line is longer than 1024 bytes");
                        }
                        return Ok(BodyPiece::NeedMore);
                    };
                    let size = chunk_size(&buf[..line_end])
                        .ok_or("a chunk size is not a hexadecimal number")?;
                    buf.advance(line_end + 2);
                    *self = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(BodyPiece::NeedMore);
                    }
                    let take = left.min(buf.len() as u64);
                    *self = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                    return Ok(BodyPiece::Data(buf.split_to(take as usize).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(BodyPiece::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk does not end with CRLF");
                    }
                    buf.advance(2);
                    *self = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let end = if buf.starts_with(b"\r\n") {
                        Some(0)
                    } else {
                        memchr::memmem::find(buf, b"\r\n\r\n").map(|end| end + 2)
                    };
                    match end {
                        Some(end) => {
                            buf.advance(end + 2);
                            *self = ChunkState::Done;
                        }
                        None if buf.len() > MAX_HEAD_BYTES => {
                            return Err("the chunked body's trailers are too large");
                        }
                        None => return Ok(BodyPiece::NeedMore),
                    }
                }
            }
        }
    }
}

/// The size on a chunk-size line (extensions after `;` ignored); `None`
/// unless it is 1 to 15 hexadecimal digits.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = line.split(|b| *b == b';').next().unwrap_or_default();
    let text = std::str::from_utf8(text).unwrap_or("").trim();
    if text.is_empty() || text.len() > 15 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// Writes `headers` as HTTP/1.1 field lines, leaving out the framing and
/// connection fields (and `host`): the writer of the message sets those.
/// Shared with the upstream client.
pub(crate) fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || name == header::HOST
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    Length(u64),
    Chunked,
    UntilClose,
}

fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: ResponseFraming,
    bodiless: bool,
    keep_alive: bool,
    version: Version,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_fields(out, headers);
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        DATE.with(|date| out.extend_from_slice(&date.now()));
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        ResponseFraming::Length(len) if !bodiless || len > 0 => {
            let _ = write!(out, "content-length: {len}\r\n");
        }
        ResponseFraming::Chunked if !bodiless => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        _ => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `date` header text, formatted once a second per thread.
struct CachedDate {
    second: std::cell::Cell<u64>,
    text: std::cell::Cell<[u8; 29]>,
}

impl CachedDate {
    fn now(&self) -> [u8; 29] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second.get() {
            let mut text = [b' '; 29];
            let formatted = httpdate::fmt_http_date(now);
            let len = formatted.len().min(29);
            text[..len].copy_from_slice(&formatted.as_bytes()[..len]);
            self.text.set(text);
            self.second.set(second);
        }
        self.text.get()
    }
}

thread_local! {
    static DATE: CachedDate = const {
        CachedDate {
            second: std::cell::Cell::new(0),
            text: std::cell::Cell::new([b' '; 29]),
        }
    };
}

/// The socket with the bytes already read from it put back in front, for
/// handing an HTTP/2 connection to hyper after its preface was sniffed.
struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(out.remaining());
            out.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, out)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn httparse_and_http_agree_on_field_value_bytes() {
        // `header_value` skips `HeaderValue`'s check because httparse makes
        // the same one: every byte httparse lets into a value is one
        // `HeaderValue` accepts, for requests and answers alike.
        // The byte sits inside a long value too, where httparse scans
        // 16 or 32 bytes at a time.
        let mut accepted = 0;
        for (byte, at) in (0..=255u8).flat_map(|byte| [(byte, 1), (byte, 20), (byte, 45)]) {
            let mut value = [b'a'; 64];
            value[at] = byte;
            let mut request = b"GET / HTTP/1.1\r\nx-test: ".to_vec();
            request.extend_from_slice(&value);
            request.extend_from_slice(b"\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let parsed = httparse::Request::new(&mut headers).parse(&request);
            let mut response = b"HTTP/1.1 200 OK\r\nx-test: ".to_vec();
            response.extend_from_slice(&value);
            response.extend_from_slice(b"\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let answered = httparse::Response::new(&mut headers).parse(&response);
            let valid = HeaderValue::from_bytes(&value).is_ok();
            for outcome in [
                parsed.map(|s| s.is_complete()),
                answered.map(|s| s.is_complete()),
            ] {
                if outcome == Ok(true) {
                    assert!(
                        valid,
                        "httparse accepts byte {byte:#04x} in a value, HeaderValue does not"
                    );
                    accepted += 1;
                }
            }
        }
        // Tab, 0x20-0x7e and 0x80-0xff, at three places, in both heads.
        assert_eq!(accepted, 3 * 2 * (1 + 95 + 128));
    }

    fn head(text: &str) -> Result<Option<(Head, usize)>, HttpError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn header_values_share_one_copy_of_the_head_and_not_the_read_buffer() {
        let mut read =
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: w\r\nx-a: first\r\nx-b: second\r\n\r\n{}"
                .to_vec();
        let (parsed, len) = parse_head(&read).unwrap().unwrap();
        let range = read.as_ptr_range();
        let (a, b) = (&parsed.headers["x-a"], &parsed.headers["x-b"]);
        for value in [a.as_bytes(), b.as_bytes(), parsed.uri.path().as_bytes()] {
            assert!(
                !range.contains(&value.as_ptr()),
                "a value points into the read buffer"
            );
        }
        // Both values sit in one allocation the size of the head.
        let distance = (b.as_bytes().as_ptr() as usize).abs_diff(a.as_bytes().as_ptr() as usize);
        assert!(
            distance < len,
            "{distance} bytes apart in a {len}-byte head"
        );
        read.fill(b'?');
        assert_eq!(
            (a.as_bytes(), b.as_bytes()),
            (&b"first"[..], &b"second"[..])
        );
        assert_eq!(parsed.uri.path(), "/v1/chat/completions");
    }

    #[test]
    fn a_head_is_parsed_with_its_framing_and_connection_semantics() {
        let text = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-Api-Key: k\r\n\r\n{\"model\":1}";
        let (head, len) = head(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 11);
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/v1/chat/completions");
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive);
        assert_eq!(head.headers["x-api-key"], "k");

        let (old, _) = self::head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(
            !old.keep_alive,
            "HTTP/1.0 closes unless asked to keep alive"
        );
        let (kept, _) = self::head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(kept.keep_alive);
        let (closing, _) = self::head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!closing.keep_alive);
        let (chunked, _) = self::head(
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(chunked.expect_continue);
        assert!(
            self::head("POST / HTTP/1.1\r\nContent-Le")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "NOT HTTP AT ALL\r\n\r\n",
        ] {
            let error = head(text).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{text:?}");
        }
        let (same, _) = head("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.framing, Framing::Length(3));
    }

    #[test]
    fn chunked_bodies_decode_across_reads_and_stop_at_the_limit() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        // Fed a byte at a time, as a slow socket would.
        let (mut buf, mut body) = (BytesMut::new(), BytesMut::new());
        let (mut outcome, mut state) = (Chunk::More, ChunkState::Size);
        for byte in wire {
            buf.extend_from_slice(&[*byte]);
            outcome = decode_chunk(&mut state, &mut buf, &mut body, 1024).unwrap();
            if outcome == Chunk::Done {
                break;
            }
        }
        assert_eq!(outcome, Chunk::Done);
        assert_eq!(&body[..], b"hello world");
        assert!(buf.is_empty(), "nothing past the trailers is consumed");

        let (mut buf, mut body) = (BytesMut::from(&wire[..]), BytesMut::new());
        assert_eq!(
            decode_chunk(&mut ChunkState::Size, &mut buf, &mut body, 1024).unwrap(),
            Chunk::Done
        );
        assert_eq!(&buf[..], b"NEXT");

        let (mut buf, mut body) = (BytesMut::from(&wire[..]), BytesMut::new());
        assert_eq!(
            decode_chunk(&mut ChunkState::Size, &mut buf, &mut body, 8).unwrap(),
            Chunk::TooLarge
        );

        let (mut buf, mut body) = (BytesMut::from(&b"zz\r\n"[..]), BytesMut::new());
        assert!(decode_chunk(&mut ChunkState::Size, &mut buf, &mut body, 8).is_err());
        let (mut buf, mut body) = (BytesMut::from(&b"2\r\nabXY"[..]), BytesMut::new());
        assert!(
            decode_chunk(&mut ChunkState::Size, &mut buf, &mut body, 8).is_err(),
            "a chunk must end with CRLF"
        );
    }

    #[tokio::test]
    async fn a_small_read_takes_a_buffer_of_its_own_size_and_a_large_one_is_appended_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (mut accepted, mut client) = (accepted.unwrap().0, client.unwrap());

        client.write_all(&[b'a'; 300]).await.unwrap();
        let mut buf = BytesMut::new();
        let read = std::future::poll_fn(|cx| poll_read_appending(&mut accepted, cx, &mut buf, 0))
            .await
            .unwrap();
        assert_eq!((read, &buf[..]), (300, &[b'a'; 300][..]));
        assert!(
            buf.capacity() < 1024,
            "300 bytes read took a {}-byte buffer",
            buf.capacity()
        );

        // Appended behind what is there, whichever way it is read.
        let large = vec![b'b'; 3 * SCRATCH_BYTES];
        client.write_all(&large).await.unwrap();
        while buf.len() < 300 + large.len() {
            let expect = 300 + large.len() - buf.len();
            std::future::poll_fn(|cx| poll_read_appending(&mut accepted, cx, &mut buf, expect))
                .await
                .unwrap();
        }
        assert_eq!(&buf[..300], &[b'a'; 300][..]);
        assert!(buf[300..] == large[..]);

        drop(client);
        let end = std::future::poll_fn(|cx| poll_read_appending(&mut accepted, cx, &mut buf, 0));
        assert_eq!(end.await.unwrap(), 0, "a hang-up reads as 0 bytes");
    }

    #[tokio::test]
    async fn a_connection_task_stays_small_whatever_its_request_needs() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, _client) = tokio::join!(listener.accept(), client);
        let (alive, _all_closed) = mpsc::channel::<Infallible>(1);
        let connection = Connection {
            stream: accepted.unwrap().0,
            buf: BytesMut::new(),
            options: Arc::new(Options::default()),
            shutdown: watch::channel(false).1,
            _alive: alive,
        };
        // A handler whose future is large, as the proxy's is: none of it
        // may land in the connection's own frame, which every open
        // connection and every held call keeps.
        let handler = |_request: Request<RequestBody>| async {
            let scratch = [0u8; 4096];
            tokio::task::yield_now().await;
            Response::new(http_body_util::Full::new(Bytes::copy_from_slice(
                &scratch[..2],
            )))
        };
        let task = connection.run(handler);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 256,
            "a connection's frame is {size} bytes; a stage awaited in place, or a value borrowed across an await, put its size in every connection"
        );
    }

    #[tokio::test]
    async fn a_stalled_head_or_body_is_answered_408_and_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let options = Options {
            header_read_timeout: Duration::from_millis(200),
            body_progress_timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let handler = |_request: Request<RequestBody>| async {
            Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))
        };
        tokio::spawn(serve(
            listener,
            handler,
            shutdown,
            Duration::from_secs(1),
            options,
        ));
        for (partial, why) in [
            ("POST / HTTP/1.1\r\ncontent-le", "request head"),
            (
                "POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc",
                "body stopped",
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                "body stopped",
            ),
        ] {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(partial.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
                .await
                .expect("Warden gives up on a stalled request and closes")
                .unwrap();
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 408 "), "{partial:?}: {text}");
            assert!(text.contains(why), "{text}");
        }
        // A complete request on the same server is answered.
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn the_response_head_carries_framing_date_and_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let mut out = Vec::new();
        encode_head(
            &mut out,
            StatusCode::OK,
            &headers,
            ResponseFraming::Chunked,
            false,
            true,
            Version::HTTP_11,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert!(
            !text.contains("999"),
            "a stale content-length is not passed on"
        );
        assert!(
            text.contains("date: ") && text.contains(" GMT\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"));

        let mut out = Vec::new();
        encode_head(
            &mut out,
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            ResponseFraming::Length(7),
            false,
            false,
            Version::HTTP_10,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(text.contains("content-length: 7\r\n"));
        assert!(text.contains("connection: close\r\n"));
    }
}
