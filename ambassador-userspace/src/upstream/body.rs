//! Request bodies on their way to an upstream: the app's, streamed and
//! counted, whose failures are the app's own; or a copy kept for a replay.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use hyper::body::Incoming;

/// A request body toward an upstream: the app's, streamed, or a copy kept
/// for a replay.
pub type ReqBody = http_body_util::Either<AppBody, http_body_util::Full<bytes::Bytes>>;

/// The app's request body broke (bad chunked framing, a reset, a stream
/// error) or passed its limit: the sender's fault, never the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum AppBodyError {
    #[error("reading the request body from the app: {0}")]
    Broken(#[source] hyper::Error),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
}

impl AppBodyError {
    /// Whether this error (or one of its causes) is the app's body failing.
    pub fn in_chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a AppBodyError> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(b) = c.downcast_ref::<AppBodyError>() {
                return Some(b);
            }
            cause = c.source();
        }
        None
    }
}

/// The app's request body, streamed upstream and counted on the way (and
/// cut with `TooLarge` past a limit, for callers of the Pod).
pub struct AppBody {
    inner: Incoming,
    counter: prometheus_client::metrics::counter::Counter,
    limit: u64,
    seen: u64,
}

impl AppBody {
    pub fn new(inner: Incoming, counter: prometheus_client::metrics::counter::Counter) -> AppBody {
        AppBody {
            inner,
            counter,
            limit: u64::MAX,
            seen: 0,
        }
    }

    /// At most `limit` bytes pass.
    pub fn limited(mut self, limit: u64) -> AppBody {
        self.limit = limit;
        self
    }
}

impl hyper::body::Body for AppBody {
    type Data = bytes::Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, AppBodyError>>> {
        let r = Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(AppBodyError::Broken);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            let n = d.len() as u64;
            self.seen = self.seen.saturating_add(n);
            if self.seen > self.limit {
                return Poll::Ready(Some(Err(AppBodyError::TooLarge(self.limit))));
            }
            self.counter.inc_by(n);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
