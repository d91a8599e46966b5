//! HTTP/JSON to gRPC: the app's unmodified curl in a simulated Pod sends
//! REST calls, a route transcodes them by a descriptor set protoc made, and
//! a real gRPC server (tonic) answers: path and query bindings, a body
//! field, the whole body, the `/package.Service/Method` fallback, server
//! streaming as a JSON array or NDJSON delivered message by message (and
//! its error as the last element), unknown fields refused before any call, gRPC
//! statuses mapped to HTTP ones with their message, the route timeout sent
//! as `grpc-timeout` and enforced, the service's credentials as metadata.

use ambassador_tests::{grpc::GrpcUpstream, *};

fn config(pb: &std::path::Path) -> String {
    format!(
        r#"
telemetry: {{ access_log: true }}
services:
  - name: books
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
    request: {{ set_headers: {{ authorization: {{ value: "Bearer grpc-token" }} }} }}
    routes:
      - name: rest
        match: {{ path_prefix: /v1 }}
        timeout: 1s
        transcode:
          descriptor_set: {}
          services: [bookstore.Bookstore]
      - name: rpc
        match: {{ path_prefix: /bookstore.Bookstore }}
        transcode:
          descriptor_set: {}
          services: [bookstore.Bookstore]
          stream: ndjson
"#,
        pb.display(),
        pb.display()
    )
}

/// Status and body of a call with curl in the app.
fn call(pod: &Pod, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut args = vec!["-X", method, "-w", "\n%{http_code}"];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data-raw", b]);
    }
    let out = stdout(&pod.curl(&format!("http://{SERVER_V4}:8080{path}"), &args));
    let (text, code) = out.rsplit_once('\n').expect("curl's status line");
    let json = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    (code.parse().expect("a status"), json)
}

#[test]
fn rest_calls_become_grpc_calls_and_back() {
    let mut pod = Pod::new("");
    let pb = pod.shared_dir().join("bookstore.pb");
    grpc::descriptor_set(&pb);
    std::fs::write(&pod.config, config(&pb)).expect("write the config");
    pod.start_proxy();
    let up = GrpcUpstream::start(pod.server_listener(SERVER_V4, 8080));
    use serde_json::json;

    // GET: path variables (one nested) and a query parameter.
    let got = call(
        &pod,
        "GET",
        "/v1/shelves/fiction/books/7?withReviews=true",
        None,
    );
    assert_eq!(
        got,
        (
            200,
            json!({"id": "7", "title": "book 7 on fiction", "author": "reviewed"})
        )
    );
    let c = &up.calls()[0];
    assert_eq!(c.method, "GetBook");
    assert_eq!(c.header("authorization"), Some("Bearer grpc-token"));
    assert_eq!(c.header("content-type"), Some("application/grpc"));
    let timeout = c
        .header("grpc-timeout")
        .expect("the route's timeout as grpc-timeout");
    assert!(timeout.ends_with('m') && timeout.len() >= 4, "{timeout}");

    // POST with one field as the body; enums by name, 64-bit ids as strings.
    let got = call(
        &pod,
        "POST",
        "/v1/shelves/s1/books",
        Some(r#"{"title":"Dune","genre":"FICTION"}"#),
    );
    assert_eq!(
        got,
        (
            200,
            json!({"id": "99", "title": "Dune", "genre": "FICTION", "tags": ["shelf:s1"]})
        )
    );
    // The whole body, the path's id on top.
    let got = call(
        &pod,
        "PATCH",
        "/v1/books/5",
        Some(r#"{"id":"6","title":"x","published":"2024-01-02T03:04:05Z"}"#),
    );
    assert_eq!(
        got,
        (
            200,
            json!({"id": "5", "title": "x", "published": "2024-01-02T03:04:05Z"})
        )
    );
    // A method without an annotation, by its gRPC path.
    let got = call(
        &pod,
        "POST",
        "/bookstore.Bookstore/Echo",
        Some(r#"{"title":"echo"}"#),
    );
    assert_eq!(got, (200, json!({"title": "echo"})));
    // response_body: the answer is one field.
    let got = call(&pod, "POST", "/v1/slow", Some(r#"{"millis": 5}"#));
    assert_eq!(got, (200, json!("slept 5 ms")));

    // Server streaming: a JSON array of every message.
    let got = call(&pod, "GET", "/v1/shelves/s2/books?limit=3", None);
    assert_eq!(got.0, 200);
    assert_eq!(got.1.as_array().map(Vec::len), Some(3), "{}", got.1);
    assert_eq!(got.1[2], json!({"id": "3", "title": "book 3 on s2"}));

    // Or one JSON object per line, as the `rpc` route says.
    let out = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/bookstore.Bookstore/ListBooks"),
        &[
            "-i",
            "-X",
            "POST",
            "--data-raw",
            r#"{"shelf":"s3","limit":2}"#,
        ],
    ));
    assert!(out.contains("content-type: application/x-ndjson"), "{out}");
    assert!(
        out.ends_with(
            "{\"id\":\"1\",\"title\":\"book 1 on s3\"}\n{\"id\":\"2\",\"title\":\"book 2 on s3\"}\n"
        ),
        "{out}"
    );

    // Message by message as they come: the first book long before the last.
    let timing = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/v1/shelves/s4/books?limit=3&delayMs=400"),
        &[
            "-N",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total}",
        ],
    ));
    let (first, total) = timing.split_once(' ').expect("two times");
    let (first, total): (f64, f64) = (first.parse().unwrap(), total.parse().unwrap());
    // The stream takes 0.8 s (two 400 ms pauses): its first book reaches
    // the app well before its end (generous bounds for a loaded machine).
    assert!(
        first < 0.5 && total - first > 0.6,
        "first byte at {first} s, end at {total} s"
    );
    // A stream that fails on the way ends with the error as its last line.
    let out = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/bookstore.Bookstore/ListBooks"),
        &[
            "-X",
            "POST",
            "--data-raw",
            r#"{"shelf":"s5","limit":3,"failAfter":1}"#,
        ],
    ));
    assert_eq!(
        out,
        "{\"id\":\"1\",\"title\":\"book 1 on s5\"}\n{\"error\":{\"code\":14,\"message\":\"the shelf is gone\"}}\n"
    );

    // Refused before any call: unknown field, bad JSON, no binding.
    let before = up.calls().len();
    let (code, err) = call(
        &pod,
        "POST",
        "/v1/shelves/s1/books",
        Some(r#"{"title":"x","pages":3}"#),
    );
    assert_eq!((code, &err["code"]), (400, &json!(3)), "{err}");
    assert!(err["message"].as_str().unwrap().contains("pages"), "{err}");
    assert_eq!(
        call(&pod, "POST", "/v1/shelves/s1/books", Some("{oops")).0,
        400
    );
    assert_eq!(call(&pod, "DELETE", "/v1/books/1", None).0, 404);
    assert_eq!(up.calls().len(), before);

    // gRPC statuses as HTTP ones, the message in the JSON error.
    let got = call(&pod, "GET", "/v1/books/404", None);
    assert_eq!(
        got,
        (
            404,
            json!({"code": 5, "message": "no book 404 on ", "details": []})
        )
    );
    for (code, http) in [
        (3, 400),
        (7, 403),
        (8, 429),
        (14, 503),
        (16, 401),
        (13, 500),
    ] {
        let (status, err) = call(
            &pod,
            "GET",
            &format!("/v1/fail/{code}?message=why%20{code}"),
            None,
        );
        assert_eq!(status, http, "gRPC {code}: {err}");
        assert_eq!(err["message"], json!(format!("why {code}")));
    }

    // The route's timeout is the call's deadline.
    let (status, err) = call(&pod, "POST", "/v1/slow", Some(r#"{"millis": 3000}"#));
    assert_eq!((status, &err["code"]), (504, &json!(4)), "{err}");

    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_grpc_responses_total{service="books",direction="outbound",grpc_code="NOT_FOUND"} 1"#),
        "{m}"
    );
    let line = pod
        .wait_access_log(r#""grpc_status":5"#)
        .expect("the NOT_FOUND call logged");
    assert!(line.contains(r#""path":"/v1/books/404""#), "{line}");
}
