//! The body of a request that may be sent again: a small one (64 KiB at
//! most, any method: an HTTP/2 stream refused unprocessed may go again
//! whatever it is) is kept while retries are on; bigger or unknown-length
//! ones stream through once.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body as _, Incoming};

use super::{dest::Dest, finish::Exchange, response::Refused};
use crate::{
    retry::MAX_REPLAY_BODY,
    upstream::{AppBody, ReqBody},
};

pub(super) enum Outgoing {
    /// Kept: each attempt sends a copy.
    Replay(Bytes),
    /// Streamed once (`None` once sent).
    Stream(Option<Incoming>),
}

impl Outgoing {
    pub fn replayable(&self) -> bool {
        matches!(self, Outgoing::Replay(_))
    }

    /// The body for the next attempt.
    pub fn next(&mut self, to: Dest<'_>) -> ReqBody {
        match self {
            Outgoing::Replay(b) => Either::Right(Full::new(b.clone())),
            Outgoing::Stream(b) => {
                let b = b.take().expect("a streamed body is only sent once");
                Either::Left(AppBody::new(b, to.metrics().from_app.clone()))
            }
        }
    }
}

pub(super) async fn keep(
    body: Incoming,
    retries_on: bool,
    to: Dest<'_>,
    exchange: &mut Exchange,
) -> Result<Outgoing, Refused> {
    if !retries_on {
        return Ok(Outgoing::Stream(Some(body)));
    }
    if body.is_end_stream() {
        return Ok(Outgoing::Replay(Bytes::new()));
    }
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|u| u as usize <= MAX_REPLAY_BODY);
    if !small {
        return Ok(Outgoing::Stream(Some(body)));
    }
    match Limited::new(body, MAX_REPLAY_BODY).collect().await {
        Ok(c) => {
            let b = c.to_bytes();
            to.metrics().from_app.inc_by(b.len() as u64);
            exchange.bytes_in = Some(b.len() as u64);
            Ok(Outgoing::Replay(b))
        }
        Err(e) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
    }
}
