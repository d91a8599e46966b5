//! The gRPC request message made of the app's REST request: its JSON body
//! (the whole message, or the binding's body field), then its query
//! parameters (fields not bound elsewhere), then the path's variables, each
//! read with the canonical proto3 JSON mapping (prost-reflect's), so a
//! string in a path or a query is read as JSON would read it (numbers,
//! enums by name, timestamps, wrappers...). Unknown fields are refused.

use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::Value as Json;

use super::{BodyTo, Matched};

/// Why a request makes no message: the caller's fault (400).
pub type BadRequest = String;

pub fn message(
    m: &Matched<'_>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, BadRequest> {
    let b = m.binding;
    let input = b.method.input();
    let mut msg = match &b.body {
        BodyTo::All if !body.is_empty() => from_json(&input, body)?,
        BodyTo::Field(f) if !body.is_empty() => {
            let value: Json =
                serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
            let mut wrapped = serde_json::Map::new();
            wrapped.insert(f.json_name().to_string(), value);
            from_value(&input, Json::Object(wrapped))?
        }
        BodyTo::None if !body.is_empty() => {
            return Err(format!(
                "{} takes no request body (its fields go in the path and the query)",
                b.method.full_name()
            ));
        }
        _ => DynamicMessage::new(input.clone()),
    };
    for (name, value) in query.into_iter().flat_map(pairs) {
        if matches!(b.body, BodyTo::All) {
            return Err(format!(
                "query parameter `{name}`: the body is the whole request message"
            ));
        }
        let path: Vec<&str> = name.split('.').collect();
        merge(
            &mut msg,
            &set(&input, &path, &value).map_err(|e| format!("query parameter `{name}`: {e}"))?,
        )?;
    }
    for (var, value) in &m.vars {
        let path: Vec<&str> = var.field.iter().map(String::as_str).collect();
        let part = set(&input, &path, value)
            .map_err(|e| format!("path `{}`: {e}", var.field.join(".")))?;
        merge(&mut msg, &part)?;
    }
    Ok(msg)
}

fn from_json(desc: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, BadRequest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let msg =
        DynamicMessage::deserialize_with_options(desc.clone(), &mut de, &DeserializeOptions::new())
            .map_err(|e| format!("the body is not a {} in JSON: {e}", desc.full_name()))?;
    de.end()
        .map_err(|e| format!("the body is not one JSON value: {e}"))?;
    Ok(msg)
}

fn from_value(desc: &MessageDescriptor, v: Json) -> Result<DynamicMessage, BadRequest> {
    DynamicMessage::deserialize_with_options(desc.clone(), v, &DeserializeOptions::new())
        .map_err(|e| format!("not a {} in JSON: {e}", desc.full_name()))
}

/// Protobuf merge: set scalars replace, repeated fields append.
fn merge(into: &mut DynamicMessage, part: &DynamicMessage) -> Result<(), BadRequest> {
    into.merge(part.encode_to_vec().as_slice())
        .map_err(|e| format!("combining the request's fields: {e}"))
}

/// A message with only the field at `path` set from `text`, read as its
/// JSON form would be.
fn set(input: &MessageDescriptor, path: &[&str], text: &str) -> Result<DynamicMessage, BadRequest> {
    let mut desc = input.clone();
    let mut names = Vec::with_capacity(path.len());
    let mut leaf: Option<FieldDescriptor> = None;
    for (i, name) in path.iter().enumerate() {
        let f = desc
            .get_field_by_name(name)
            .or_else(|| desc.get_field_by_json_name(name))
            .ok_or_else(|| format!("no field `{name}` in {}", desc.full_name()))?;
        names.push(f.json_name().to_string());
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => desc = m,
                _ => return Err(format!("`{name}` is no message")),
            }
        }
        leaf = Some(f);
    }
    let leaf = leaf.ok_or("an empty field name")?;
    let mut value = json_of(&leaf, text)?;
    if leaf.is_list() {
        value = Json::Array(vec![value]);
    }
    for name in names.iter().rev() {
        let mut o = serde_json::Map::new();
        o.insert(name.clone(), value);
        value = Json::Object(o);
    }
    from_value(input, value)
}

/// A path or query string as the field's JSON would be: numbers and bools
/// bare, everything else (64-bit integers, enums, bytes, timestamps,
/// durations, wrappers of strings) a JSON string.
fn json_of(f: &FieldDescriptor, text: &str) -> Result<Json, BadRequest> {
    let number = || {
        text.parse::<serde_json::Number>()
            .map(Json::Number)
            .map_err(|_| format!("`{text}` is not a number"))
    };
    Ok(match f.kind() {
        Kind::Bool => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(format!("`{text}` is not true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => number()?,
        Kind::Float | Kind::Double => match text {
            "NaN" | "Infinity" | "-Infinity" => Json::String(text.into()),
            _ => number()?,
        },
        Kind::Message(m) if is_wrapper_of_number(m.full_name()) => number()?,
        Kind::Message(m) if m.full_name() == "google.protobuf.BoolValue" => {
            Json::Bool(text == "true")
        }
        _ => Json::String(text.into()),
    })
}

fn is_wrapper_of_number(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
    )
}

/// `a=1&b=x%20y` as (name, value) pairs, %-decoded (`+` is a space).
fn pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|kv| !kv.is_empty()).map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let d = |s: &str| super::template::decode(&s.replace('+', " "));
        (d(k), d(v))
    })
}
