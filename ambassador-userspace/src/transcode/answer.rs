//! The REST answer made of a gRPC one: each response message in canonical
//! proto3 JSON (or the binding's `response_body` field of it), and a
//! gRPC error as `{"code", "message", "details"}` (google.rpc.Status in
//! JSON, as grpc-gateway and Envoy give it) with the mapped HTTP status.

use bytes::Bytes;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, SerializeOptions};
use serde_json::Value as Json;

use crate::config::transcode::StreamFormat;

/// A response message that cannot be read as its type: the upstream's fault.
pub type BadAnswer = String;

/// One message as JSON.
pub fn json(
    desc: &MessageDescriptor,
    message: &[u8],
    field: Option<&FieldDescriptor>,
) -> Result<Vec<u8>, BadAnswer> {
    let msg = DynamicMessage::decode(desc.clone(), message)
        .map_err(|e| format!("the upstream's answer is not a {}: {e}", desc.full_name()))?;
    let opts = SerializeOptions::new();
    let mut out = Vec::with_capacity(message.len() * 2 + 16);
    match field {
        None => {
            let mut ser = serde_json::Serializer::new(&mut out);
            msg.serialize_with_options(&mut ser, &opts)
                .map_err(|e| format!("the answer as JSON: {e}"))?;
        }
        Some(f) => {
            // The field's JSON as the whole message's JSON has it (a field at
            // its default is left out there: its JSON default here).
            let whole = msg
                .serialize_with_options(serde_json::value::Serializer, &opts)
                .map_err(|e| format!("the answer as JSON: {e}"))?;
            let v = whole
                .get(f.json_name())
                .cloned()
                .unwrap_or_else(|| default_json(f));
            serde_json::to_writer(&mut out, &v).map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

fn default_json(f: &FieldDescriptor) -> Json {
    if f.is_list() {
        return Json::Array(Vec::new());
    }
    if f.is_map() {
        return Json::Object(Default::default());
    }
    match f.kind() {
        prost_reflect::Kind::Message(_) => Json::Null,
        prost_reflect::Kind::String | prost_reflect::Kind::Bytes => Json::String(String::new()),
        prost_reflect::Kind::Bool => Json::Bool(false),
        _ => Json::from(0),
    }
}

/// The JSON error body for a gRPC status.
pub fn error(code: u16, message: &str) -> Bytes {
    let v = serde_json::json!({ "code": code, "message": message, "details": [] });
    Bytes::from(v.to_string())
}

/// The content type of an answer.
pub fn content_type(streaming: bool, format: StreamFormat) -> &'static str {
    match (streaming, format) {
        (true, StreamFormat::Ndjson) => "application/x-ndjson",
        _ => "application/json",
    }
}
