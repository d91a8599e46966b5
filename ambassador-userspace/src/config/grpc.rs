//! gRPC status codes as the config names them (`retries.grpc_on`), and as
//! metrics and access logs show them.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The canonical names, by code (0 is OK, 16 UNAUTHENTICATED).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of `code`; codes past the table are UNKNOWN, as gRPC says.
pub fn grpc_name(code: u16) -> &'static str {
    GRPC_CODES
        .get(usize::from(code))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// A set of gRPC status codes, written as a list of names in any case
/// (`[unavailable, resource_exhausted]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrpcCodes(u32);

impl GrpcCodes {
    pub fn contains(self, code: u16) -> bool {
        code < 17 && self.0 & (1 << code) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

impl<'de> Deserialize<'de> for GrpcCodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut bits = 0u32;
        for n in &names {
            let Some(code) = GRPC_CODES.iter().position(|c| c.eq_ignore_ascii_case(n)) else {
                return Err(de::Error::custom(format!(
                    "`{}` is not a gRPC status (unavailable, resource_exhausted, ...)",
                    super::values::clip(n)
                )));
            };
            if code == 0 {
                return Err(de::Error::custom("`ok` is success, not a status to retry"));
            }
            bits |= 1 << code;
        }
        Ok(GrpcCodes(bits))
    }
}

impl Serialize for GrpcCodes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<String> = (0..17u16)
            .filter(|c| self.contains(*c))
            .map(|c| grpc_name(c).to_ascii_lowercase())
            .collect();
        names.serialize(s)
    }
}

impl schemars::JsonSchema for GrpcCodes {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GrpcCodes".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "gRPC status names, any case (unavailable, resource_exhausted, ...)",
            "type": "array",
            "items": {"type": "string"}
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_any_case_and_mistakes_named() {
        let c: GrpcCodes = serde_yaml_ng::from_str("[unavailable, RESOURCE_EXHAUSTED]").unwrap();
        assert!(c.contains(14) && c.contains(8) && !c.contains(13) && !c.contains(99));
        assert_eq!(
            serde_yaml_ng::to_string(&c).unwrap().trim(),
            "- resource_exhausted\n- unavailable"
        );
        let e = serde_yaml_ng::from_str::<GrpcCodes>("[unavailble]").unwrap_err();
        assert!(
            e.to_string().contains("`unavailble` is not a gRPC status"),
            "{e}"
        );
        assert!(serde_yaml_ng::from_str::<GrpcCodes>("[ok]").is_err());
        assert_eq!(grpc_name(14), "UNAVAILABLE");
        assert_eq!(grpc_name(40), "UNKNOWN");
    }
}
