//! Response bodies sent to agents: whole bodies Warden built or buffered, and
//! upstream streams passed through chunk by chunk while the meter reads them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};

use super::call::{Call, Settlement};
use crate::metering::{ChunkFilter, StreamMeter};
use crate::providers::{self, ErrorKind, ProviderKind};
use crate::store::record::Outcome;

pub enum ProxyBody {
    Full(Option<Bytes>),
    Metered(Box<MeteredStream>),
    /// Chunks produced by a task as they come (the admin event stream).
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes))
    }

    /// A whole JSON answer with its status.
    pub fn json(status: http::StatusCode, body: Bytes) -> http::Response<ProxyBody> {
        let mut response = http::Response::new(ProxyBody::full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ProxyBody::Metered(stream) => stream.poll_next(cx),
            ProxyBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.as_ref().is_none_or(|b| b.is_empty()),
            ProxyBody::Metered(stream) => stream.finished && stream.tail.is_none(),
            ProxyBody::Channel(rx) => rx.is_closed() && rx.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Metered(_) | ProxyBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// An upstream SSE stream on its way to the agent.
///
/// Upstream failures never surface as body errors (which would reset the
/// agent's connection with no explanation): the agent gets its provider's own
/// error event and a clean end of stream instead.
pub struct MeteredStream {
    /// `None` once a halt has dropped it.
    upstream: Option<crate::http_client::ResponseBody>,
    meter: StreamMeter,
    filter: ChunkFilter,
    call: Option<Call>,
    status: StatusCode,
    protocol: ProviderKind,
    upstream_name: Arc<str>,
    tail: Option<Bytes>,
    finished: bool,
}

impl MeteredStream {
    pub fn new(
        upstream: crate::http_client::ResponseBody,
        meter: StreamMeter,
        call: Call,
        status: StatusCode,
    ) -> MeteredStream {
        let protocol = call.protocol;
        let upstream_name = call.upstream_name();
        MeteredStream {
            upstream: Some(upstream),
            meter,
            filter: ChunkFilter::default(),
            call: Some(call),
            status,
            protocol,
            upstream_name,
            tail: None,
            finished: false,
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        loop {
            if let Some(tail) = self.tail.take() {
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            if let Some(call) = self.call.as_mut()
                && let Poll::Ready(halt) = call.poll_halted(cx)
            {
                self.end_with_halt(&halt);
                continue;
            }
            let Some(upstream) = self.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(upstream).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if let Some(call) = self.call.as_mut() {
                        call.mark_first_byte();
                    }
                    let out = if self.meter.strips_usage_chunk() {
                        self.filter.pass(&mut self.meter, data)
                    } else {
                        self.meter.feed(&data);
                        data
                    };
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(e)) => {
                    let message = format!(
                        "the upstream `{}` broke off the stream: {e}",
                        self.upstream_name
                    );
                    let call_id = self.call.as_ref().map_or("", |c| c.id.as_str());
                    tracing::warn!(call_id, error = %e, upstream = %self.upstream_name, "upstream stream failed");
                    self.end_with_error(message);
                }
                None => {
                    let report = self.meter.report();
                    if !report.completed && !report.output_known && report.error.is_none() {
                        let message = format!(
                            "the upstream `{}` closed the stream before it finished",
                            self.upstream_name
                        );
                        self.end_with_error(message);
                    } else {
                        self.finished = true;
                        let rest = self.filter.finish();
                        self.tail = (!rest.is_empty()).then_some(rest);
                        let outcome = if report.error.is_some() {
                            Outcome::Error
                        } else {
                            Outcome::Ok
                        };
                        self.settle(outcome, None);
                    }
                }
            }
        }
    }

    fn end_with_error(&mut self, message: String) {
        self.end_with_event(ErrorKind::UpstreamFailed, "upstream_error", &message);
        self.settle(Outcome::Error, Some(message));
    }

    /// A halt cut the call: the upstream request is dropped now (which
    /// cancels the generation), the agent gets its provider's error event
    /// and the end of the stream, and the output so far is estimated.
    fn end_with_halt(&mut self, halt: &crate::halts::Halt) {
        self.upstream = None;
        let message = halt.message();
        if let Some(call) = self.call.as_ref() {
            tracing::info!(call_id = %call.id, scope = %halt.scope, "stream cut by a halt");
        }
        self.end_with_event(ErrorKind::Forbidden, "halted", &message);
        self.settle(Outcome::Halted, Some(message));
    }

    fn end_with_event(&mut self, kind: ErrorKind, code: &str, message: &str) {
        self.finished = true;
        let mut tail = self.filter.finish().to_vec();
        if !tail.is_empty() && !tail.ends_with(b"\n\n") {
            tail.extend_from_slice(b"\n\n");
        }
        tail.extend_from_slice(&providers::stream_error_event(
            self.protocol,
            kind,
            code,
            message,
        ));
        self.tail = Some(Bytes::from(tail));
    }

    fn settle(&mut self, outcome: Outcome, error: Option<String>) {
        if let Some(call) = self.call.take() {
            let report = self.meter.take_report();
            call.settle(Settlement::from_report(self.status, outcome, report, error));
        }
    }
}

impl Drop for MeteredStream {
    /// Dropped before the end: the agent went away. Dropping `upstream`
    /// closes the upstream connection, which cancels the generation.
    fn drop(&mut self) {
        if self.call.is_some() {
            self.settle(
                Outcome::Cancelled,
                Some("the agent disconnected mid-stream".into()),
            );
        }
    }
}
