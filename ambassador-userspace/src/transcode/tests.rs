//! Bindings, request messages and JSON answers from a real descriptor set:
//! tests/protos/bookstore.proto made into one by protoc, as a user does.

use std::path::PathBuf;

use http::Method;
use prost::Message as _;
use prost_reflect::DynamicMessage;

use super::*;
use crate::config::transcode::TranscodeConfig;

/// `protoc --include_imports -o` of the bookstore (protoc is installed by
/// `cargo xtask test`).
fn descriptor_set() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(make_descriptor_set).clone()
}

fn make_descriptor_set() -> PathBuf {
    let protos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/protos");
    let out = std::env::temp_dir().join(format!("bookstore-{}.pb", std::process::id()));
    let st = std::process::Command::new("protoc")
        .arg("--include_imports")
        .arg("-I")
        .arg(&protos)
        .arg("-o")
        .arg(&out)
        .arg(protos.join("bookstore.proto"))
        .status()
        .expect("protoc (protobuf-compiler) must be installed: cargo xtask test installs it");
    assert!(st.success(), "protoc failed");
    out
}

fn transcoder() -> Transcoder {
    let cfg = TranscodeConfig {
        descriptor_set: descriptor_set(),
        services: vec!["bookstore.Bookstore".into()],
        stream: Default::default(),
        max_request_bytes: 1 << 20,
        max_response_bytes: 1 << 20,
    };
    Transcoder::load(&cfg).unwrap()
}

fn made(
    t: &Transcoder,
    method: Method,
    target: &str,
    body: &str,
) -> Result<(String, serde_json::Value), String> {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    let m = t.find(&method, path).ok_or("no binding")?;
    let msg = request::message(&m, query, body.as_bytes())?;
    let json = serde_json::to_value(&msg).unwrap();
    Ok((m.binding.path.to_string(), json))
}

#[test]
fn bindings_from_annotations_and_the_fallback() {
    let t = transcoder();
    let d = t.describe();
    for want in [
        "GET /v1/shelves/{shelf}/books/{book.id} -> bookstore.Bookstore.GetBook",
        "GET /v1/books/{book.id} -> bookstore.Bookstore.GetBook",
        "PATCH /v1/books/{id} -> bookstore.Bookstore.UpdateBook",
        "POST /bookstore.Bookstore/Echo -> bookstore.Bookstore.Echo",
    ] {
        assert!(d.iter().any(|l| l == want), "{want} not in {d:#?}");
    }
    // The more literal path wins over the variable one.
    assert!(t.find(&Method::GET, "/v1/shelves/s1/books").is_some());
    assert_eq!(
        t.find(&Method::GET, "/v1/shelves/s1/books")
            .unwrap()
            .binding
            .path,
        "/bookstore.Bookstore/ListBooks"
    );
    assert!(t.find(&Method::DELETE, "/v1/books/1").is_none());
    let bad = TranscodeConfig {
        services: vec!["bookstore.Nope".into()],
        ..TranscodeConfig {
            descriptor_set: descriptor_set(),
            services: vec![],
            stream: Default::default(),
            max_request_bytes: 1,
            max_response_bytes: 1,
        }
    };
    let e = Transcoder::load(&bad).err().unwrap();
    assert!(e.contains("`bookstore.Nope` is not a service"), "{e}");
    let missing = TranscodeConfig {
        descriptor_set: "/nonexistent.pb".into(),
        ..bad
    };
    assert!(
        Transcoder::load(&missing)
            .err()
            .unwrap()
            .contains("/nonexistent.pb")
    );
}

#[test]
fn requests_from_paths_queries_and_bodies() {
    let t = transcoder();
    let (path, json) = made(
        &t,
        Method::GET,
        "/v1/shelves/s%201/books/42?withReviews=true",
        "",
    )
    .unwrap();
    assert_eq!(path, "/bookstore.Bookstore/GetBook");
    assert_eq!(
        json,
        serde_json::json!({"shelf": "s 1", "book": {"id": "42"}, "withReviews": true})
    );
    // Proto names work in queries too, nested and repeated.
    let (_, json) = made(
        &t,
        Method::GET,
        "/v1/books/7?book.title=T&book.tags=a&book.tags=b&with_reviews=false",
        "",
    )
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"book": {"id": "7", "title": "T", "tags": ["a", "b"]}})
    );
    let (_, json) = made(
        &t,
        Method::POST,
        "/v1/shelves/s1/books",
        r#"{"title":"Dune","genre":"FICTION","published":"1965-08-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"shelf": "s1", "book": {"title": "Dune", "genre": "FICTION", "published": "1965-08-01T00:00:00Z"}})
    );
    // The path's value wins over the body's.
    let (_, json) = made(
        &t,
        Method::PATCH,
        "/v1/books/5",
        r#"{"id":"6","title":"x"}"#,
    )
    .unwrap();
    assert_eq!(json, serde_json::json!({"id": "5", "title": "x"}));
    let (path, _) = made(
        &t,
        Method::POST,
        "/bookstore.Bookstore/Echo",
        r#"{"title":"e"}"#,
    )
    .unwrap();
    assert_eq!(path, "/bookstore.Bookstore/Echo");
    for (method, target, body, why) in [
        (
            Method::POST,
            "/v1/shelves/s1/books",
            r#"{"title":"x","pages":3}"#,
            "pages",
        ),
        (
            Method::POST,
            "/v1/shelves/s1/books",
            "{not json",
            "not JSON",
        ),
        (Method::GET, "/v1/books/x", "", "book.id"),
        (
            Method::GET,
            "/v1/books/1?nope=1",
            "",
            "query parameter `nope`",
        ),
        (Method::GET, "/v1/books/1", "{}", "takes no request body"),
        (
            Method::PATCH,
            "/v1/books/1?title=x",
            "{}",
            "whole request message",
        ),
        (
            Method::POST,
            "/v1/shelves/s1/books",
            r#"{"genre":"POETRY"}"#,
            "POETRY",
        ),
    ] {
        let e = made(&t, method.clone(), target, body).unwrap_err();
        assert!(e.contains(why), "{method} {target} {body}: {e}");
    }
}

#[test]
fn answers_as_canonical_json() {
    let t = transcoder();
    let m = t.find(&Method::GET, "/v1/books/1").unwrap();
    let out = m.binding.method.output();
    let mut book = DynamicMessage::new(out.clone());
    book.set_field_by_name("id", prost_reflect::Value::I64(1 << 40));
    book.set_field_by_name("title", prost_reflect::Value::String("Dune".into()));
    let bytes = book.encode_to_vec();
    let json = answer::json(&out, &bytes, None).unwrap();
    assert_eq!(
        String::from_utf8(json).unwrap(),
        r#"{"id":"1099511627776","title":"Dune"}"#
    );
    let title = out.get_field_by_name("title");
    assert_eq!(
        answer::json(&out, &bytes, title.as_ref()).unwrap(),
        br#""Dune""#
    );
    let author = out.get_field_by_name("author");
    assert_eq!(
        answer::json(&out, &bytes, author.as_ref()).unwrap(),
        br#""""#
    );
    assert!(
        answer::json(&out, b"\xff\xff", None)
            .unwrap_err()
            .contains("bookstore.Book")
    );
    let e: serde_json::Value = serde_json::from_slice(&answer::error(5, "no book")).unwrap();
    assert_eq!(
        e,
        serde_json::json!({"code": 5, "message": "no book", "details": []})
    );
}

#[test]
fn streamed_answers_message_by_message() {
    use crate::config::transcode::StreamFormat;
    use stream::JsonStream;
    let t = transcoder();
    let out = t
        .find(&Method::GET, "/v1/books/1")
        .unwrap()
        .binding
        .method
        .output();
    let book = |id: i64| {
        let mut b = DynamicMessage::new(out.clone());
        b.set_field_by_name("id", prost_reflect::Value::I64(id));
        grpc::frame(&b.encode_to_vec())
    };
    let trailers = |code: &str, msg: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", code.parse().unwrap());
        h.insert("grpc-message", msg.parse().unwrap());
        h
    };
    // Frames split anywhere: each message comes out once it is whole.
    let mut s = JsonStream::new(out.clone(), None, StreamFormat::Array, 1 << 20);
    let two = [book(1), book(2)].concat();
    assert_eq!(&s.data(&two[..3])[..], b"");
    assert_eq!(&s.data(&two[3..9])[..], br#"[{"id":"1"}"#);
    assert_eq!(&s.data(&two[9..])[..], br#",{"id":"2"}"#);
    assert_eq!(&s.end(Some(&trailers("0", "")))[..], b"]");
    assert!(s.closed());
    // An error at the end is the last element.
    let mut s = JsonStream::new(out.clone(), None, StreamFormat::Ndjson, 1 << 20);
    assert_eq!(&s.data(&book(3))[..], b"{\"id\":\"3\"}\n");
    let tail = s.end(Some(&trailers("14", "going%20away")));
    assert_eq!(
        &tail[..],
        b"{\"error\":{\"code\":14,\"message\":\"going away\"}}\n"
    );
    // No status, a message too large: errors too.
    let mut s = JsonStream::new(out.clone(), None, StreamFormat::Array, 1 << 20);
    assert!(String::from_utf8_lossy(&s.end(None)).contains("without a grpc-status"));
    let mut s = JsonStream::new(out, None, StreamFormat::Array, 4);
    let big = s.data(&[0, 0, 0, 1, 0]);
    assert!(
        String::from_utf8_lossy(&big).contains("larger than 4 bytes"),
        "{big:?}"
    );
    assert!(s.closed());
}
