//! A server-streaming call's answer made into JSON as it arrives: each
//! gRPC message, once whole, becomes a JSON element of an array or one line
//! of NDJSON, so a long stream reaches the app message by message and only
//! one message is held at a time. The status at the end: `]` (or nothing
//! more) when OK, else a last element `{"error": {code, message}}`.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use prost_reflect::{FieldDescriptor, MessageDescriptor};

use super::{answer, grpc};
use crate::config::transcode::StreamFormat;

pub struct JsonStream {
    desc: MessageDescriptor,
    field: Option<FieldDescriptor>,
    format: StreamFormat,
    /// Bytes of a message not yet whole.
    pending: BytesMut,
    max_message: u64,
    /// Elements written so far.
    written: usize,
    /// The closing part has been written.
    closed: bool,
    /// Made before the body streamed (from its first frame), sent first.
    ready: Option<Bytes>,
}

impl JsonStream {
    pub fn new(
        desc: MessageDescriptor,
        field: Option<FieldDescriptor>,
        format: StreamFormat,
        max_message: u64,
    ) -> JsonStream {
        JsonStream {
            desc,
            field,
            format,
            pending: BytesMut::new(),
            max_message,
            written: 0,
            closed: false,
            ready: None,
        }
    }

    /// Takes the body's first frame, read before the answer's head went
    /// out; its JSON goes first.
    pub fn prime(&mut self, d: &[u8]) {
        let out = self.data(d);
        self.ready = (!out.is_empty()).then_some(out);
    }

    /// What was made ahead of the body's frames, once.
    pub fn take_ready(&mut self) -> Option<Bytes> {
        self.ready.take()
    }

    /// The stream's JSON has ended.
    pub fn closed(&self) -> bool {
        self.closed && self.ready.is_none()
    }

    /// The JSON for what a data frame completes (often nothing, or several
    /// messages); an error ends the stream with an error element.
    pub fn data(&mut self, d: &[u8]) -> Bytes {
        if self.closed {
            return Bytes::new();
        }
        self.pending.extend_from_slice(d);
        let mut out = Vec::new();
        if self.written == 0 && self.format == StreamFormat::Array {
            out.push(b'[');
        }
        let start = out.len();
        loop {
            match grpc::next_message(&mut self.pending) {
                Ok(Some(m)) => match answer::json(&self.desc, &m, self.field.as_ref()) {
                    Ok(j) => self.element(&mut out, &j),
                    Err(why) => return self.fail(out, 13, &why),
                },
                Ok(None) => break,
                Err(e) => return self.fail(out, 13, &e.to_string()),
            }
        }
        let declared = self
            .pending
            .get(1..5)
            .map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
        if u64::from(declared) > self.max_message {
            let why = format!(
                "a streamed gRPC message larger than {} bytes",
                self.max_message
            );
            return self.fail(out, 8, &why);
        }
        if out.len() == start {
            // Nothing whole yet: the opening bracket waits for an element.
            return Bytes::new();
        }
        Bytes::from(out)
    }

    /// The end of the stream, by its trailers (`None`: it ended without).
    pub fn end(&mut self, trailers: Option<&HeaderMap>) -> Bytes {
        if self.closed {
            return Bytes::new();
        }
        let mut out = Vec::new();
        if self.written == 0 && self.format == StreamFormat::Array {
            out.push(b'[');
        }
        let status = trailers.and_then(grpc::status);
        match (status, self.pending.is_empty()) {
            (Some(0), true) => {
                self.closed = true;
                if self.format == StreamFormat::Array {
                    out.push(b']');
                }
                Bytes::from(out)
            }
            (Some(0), false) => self.fail(out, 13, "the stream ended inside a message"),
            (Some(code), _) => {
                let message = trailers
                    .and_then(|t| t.get("grpc-message"))
                    .map(|v| grpc::message_text(v.as_bytes()))
                    .unwrap_or_default();
                self.fail(out, code, &message)
            }
            (None, _) => self.fail(out, 13, "the stream ended without a grpc-status"),
        }
    }

    fn element(&mut self, out: &mut Vec<u8>, json: &[u8]) {
        if self.format == StreamFormat::Array && self.written > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json);
        if self.format == StreamFormat::Ndjson {
            out.push(b'\n');
        }
        self.written += 1;
    }

    /// A last element naming the error, and the end.
    fn fail(&mut self, mut out: Vec<u8>, code: u16, why: &str) -> Bytes {
        let e = serde_json::json!({ "error": { "code": code, "message": why } });
        self.element(&mut out, e.to_string().as_bytes());
        if self.format == StreamFormat::Array {
            out.push(b']');
        }
        self.closed = true;
        self.pending.clear();
        Bytes::from(out)
    }
}
