//! A route's `transcode:`: the app's REST/JSON calls made into gRPC calls
//! to the route's upstream, by a protobuf descriptor set.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscodeConfig {
    /// A FileDescriptorSet with its imports (`protoc --include_imports
    /// --descriptor_set_out=FILE`), read at start and at each reload.
    pub descriptor_set: PathBuf,
    /// The gRPC services exposed, by full name (`bookstore.Bookstore`).
    pub services: Vec<String>,
    /// Server-streaming answers: a JSON array (default), or one JSON object
    /// per line (`ndjson`).
    #[serde(default)]
    pub stream: StreamFormat,
    /// The largest JSON request body taken (default 4 MiB); larger: 413.
    #[serde(default = "max_body")]
    pub max_request_bytes: u64,
    /// The largest gRPC answer (a unary one, or one streamed message) made
    /// into JSON (default 4 MiB); larger: 502, or an error element ending a
    /// stream.
    #[serde(default = "max_body")]
    pub max_response_bytes: u64,
}

fn max_body() -> u64 {
    4 << 20
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    #[default]
    Array,
    Ndjson,
}

impl TranscodeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.services.is_empty() {
            return Err("transcode.services: name at least one gRPC service".into());
        }
        for (name, v) in [
            ("max_request_bytes", self.max_request_bytes),
            ("max_response_bytes", self.max_response_bytes),
        ] {
            if !(1..=(256 << 20)).contains(&v) {
                return Err(format!("transcode.{name}: between 1 and 268435456"));
            }
        }
        Ok(())
    }
}
