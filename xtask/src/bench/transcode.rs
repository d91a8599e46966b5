//! `cargo xtask bench`, transcoding section: one unary gRPC call (the test
//! bookstore's GetBook, served by tonic in the servers' namespace) made
//! three ways in one run: natively (oha over HTTP/2 with the binary
//! request, not intercepted), natively through ambassador (h2c relayed by an
//! `http` service: the proxy without transcoding), and as the REST call
//! ambassador transcodes (HTTP/1.1 `GET /v1/shelves/s1/books/7`, JSON
//! back). The server is a release build of its own (`tests/src/bin/bookstore.rs`).
//! Measured and reported as the HTTP section is (`oha.rs`): the
//! transcoded call next to the native one, round by round.

use std::fs;

use ambassador_tests::{Placement, Pod, SERVER_V4, cgroup2_mount, grpc};

use anyhow::{Context as _, ensure};

use super::{
    client_at,
    http::{LOG_FILTER, ROUNDS, Versions},
    machine::{Priority, cpu_busy},
    oha::{FIXED_SECONDS, Run, Target, figures, measure},
    report,
};

/// The bookstore's port; the app dials it directly or through ambassador.
const GRPC_PORT: u16 = 9090;
/// What the app dials for the REST API (the service's endpoint is the
/// bookstore).
const REST_PORT: u16 = 9091;
const SHELF: &str = "s1";
const BOOK: i64 = 7;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum How {
    /// gRPC from the client, not intercepted.
    Native,
    /// gRPC from the client, through ambassador (h2c relayed).
    Relayed,
    /// REST/JSON from the client, transcoded by ambassador.
    Transcoded,
}

pub(super) struct Row {
    pub(super) how: How,
    pub(super) f: super::oha::Figures,
}

pub fn run() -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["curl", "sqlite3", "protobuf-compiler"])?;
    let oha = crate::toolchain::ensure_oha()?;
    let versions = Versions::find(&oha)?;
    let busy_before = cpu_busy();
    let _priority = Priority::raise();

    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let pb = dir.join("bookstore.pb");
    grpc::descriptor_set(&pb);
    let call = dir.join("get-book.bin");
    fs::write(&call, grpc::get_book_call(SHELF, BOOK)).context("writing the gRPC request")?;
    fs::write(&pod.config, ambassador_config(&pb)).context("writing the ambassador config")?;
    pod.start_proxy_logging(LOG_FILTER);
    let root_cg = cgroup2_mount();
    let server = bookstore(&pod, &root_cg)?;
    let modes = [
        (How::Native, "gRPC direct (HTTP/2, binary)"),
        (How::Relayed, "gRPC through ambassador (h2c)"),
        (How::Transcoded, "REST/JSON -> gRPC by ambassador"),
    ];
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for i in 0..modes.len() {
            let k = (i + round) % modes.len();
            let (how, label) = modes[k];
            let at = client_at(&pod, &root_cg, how != How::Native);
            let t = target(how, label, &call);
            if round == 0 {
                check(&oha, &at, &t)?;
            }
            let pids: Vec<u32> = match how {
                How::Native => Vec::new(),
                _ => pod.proxy_pid().into_iter().collect(),
            };
            let db = dir.join("fixed-rate.db");
            runs[k].push(measure(&oha, &at, &t, &pids, FIXED_SECONDS, &db)?);
        }
        eprintln!("xtask: bench transcode round {}/{ROUNDS} done", round + 1);
    }
    drop(server);
    drop(pod);
    let rows: Vec<Row> = modes
        .iter()
        .zip(runs)
        .map(|((how, label), r)| Row {
            how: *how,
            f: figures(label.to_string(), &r),
        })
        .collect();
    let notes = report::HttpNotes {
        redirected: 0,
        accelerated: 0,
        busy_before,
        busy_after: cpu_busy(),
    };
    Ok(report::transcode_table(&rows, &versions, &notes))
}

/// The bookstore, built optimised and run as its own process in the
/// servers' namespace (this binary is a debug build: a server inside it
/// would be what the bench measures).
fn bookstore(pod: &Pod, root_cg: &std::path::Path) -> anyhow::Result<super::Guard> {
    let mut build = std::process::Command::new(crate::cargo());
    build.current_dir(crate::root()).args([
        "build",
        "--release",
        "--package",
        "ambassador-tests",
        "--bin",
        "bookstore",
    ]);
    crate::run_cmd(&mut build).context("building the bookstore gRPC server")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"));
    let at = Placement {
        netns: &pod.servers,
        cgroup: root_cg,
        uid: None,
    };
    let child = ambassador_tests::placed(target.join("release/bookstore"), &at)
        .arg(format!("{SERVER_V4}:{GRPC_PORT}"))
        .spawn()
        .context("starting the bookstore")?;
    let guard = super::Guard(child);
    let addr: std::net::SocketAddr = format!("{SERVER_V4}:{GRPC_PORT}").parse()?;
    for _ in 0..100 {
        let up = pod.servers.enter(move || {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(100))
        });
        if up.is_ok() {
            return Ok(guard);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("the bookstore did not listen on {addr} within 5 s")
}

fn ambassador_config(pb: &std::path::Path) -> String {
    format!(
        r#"
proxy: {{ workers: 1 }}
telemetry: {{ access_log: false }}
services:
  - name: grpc
    match: {{ cidr: {SERVER_V4}/32, port: {GRPC_PORT} }}
    protocol: http
  - name: rest
    match: {{ cidr: {SERVER_V4}/32, port: {REST_PORT} }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:{GRPC_PORT}" }}] }}
    routes:
      - match: {{ path_prefix: /v1 }}
        transcode: {{ descriptor_set: "{}", services: [bookstore.Bookstore] }}
"#,
        pb.display()
    )
}

/// What oha sends: the framed binary request over HTTP/2, or the REST GET.
fn target(how: How, label: &str, call: &std::path::Path) -> Target {
    match how {
        How::Native | How::Relayed => Target {
            label: label.into(),
            url: format!("http://{SERVER_V4}:{GRPC_PORT}/bookstore.Bookstore/GetBook"),
            args: [
                "--http2",
                "-m",
                "POST",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-D",
            ]
            .into_iter()
            .map(String::from)
            .chain([call.display().to_string()])
            .collect(),
            response_bytes: grpc::book_answer_len(SHELF, BOOK),
            h2: true,
        },
        How::Transcoded => Target {
            label: label.into(),
            url: format!("http://{SERVER_V4}:{REST_PORT}/v1/shelves/{SHELF}/books/{BOOK}"),
            args: Vec::new(),
            response_bytes: json_answer().len(),
            h2: false,
        },
    }
}

/// The REST call's answer, as canonical proto3 JSON has it.
fn json_answer() -> String {
    format!(r#"{{"id":"{BOOK}","title":"book {BOOK} on {SHELF}"}}"#)
}

/// One request each way answers right before anything is measured.
fn check(oha: &std::path::Path, at: &Placement<'_>, t: &Target) -> anyhow::Result<()> {
    let out = ambassador_tests::placed(oha, at)
        .args(&t.args)
        .args(["-n", "1", "--no-tui", "--output-format", "json"])
        .arg(&t.url)
        .output()
        .context("cannot start oha")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON")?;
    let size = v["summary"]["sizePerRequest"].as_u64();
    ensure!(
        v["statusCodeDistribution"]["200"].as_u64() == Some(1)
            && size == Some(t.response_bytes as u64),
        "{}: expected one 200 of {} bytes, oha saw {}",
        t.label,
        t.response_bytes,
        v
    );
    if !t.h2 {
        let body = ambassador_tests::placed("curl", at)
            .args(["-sS", "--max-time", "5", &t.url])
            .output()
            .context("cannot start curl")?;
        let got = String::from_utf8_lossy(&body.stdout);
        ensure!(got == json_answer(), "{}: answered {got:?}", t.label);
    }
    Ok(())
}
