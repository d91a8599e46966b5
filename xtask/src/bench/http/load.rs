//! The HTTP section's client side: the check that a mode answers as it
//! should before it is measured (curl), and what oha sends in each mode.

use ambassador_tests::{Placement, SERVER_V4, placed};
use anyhow::{Context as _, ensure};

use super::{
    super::oha::Target, AMBASSADOR_CACHED_PORT, AMBASSADOR_H2_PORT, AMBASSADOR_TLS_PORT,
    AUTHORIZATION, BODY_BYTES, CACHED_PATH, HAPROXY_PORT, HAPROXY_TLS_PORT, Mode,
    NGINX_CACHED_PORT, NGINX_PORT, NGINX_TLS_PORT, ORIGIN_H2C_PORT, ORIGIN_PORT, TRAIN_PATH,
    TRAIN_REQUEST_BYTES, TRAIN_RESPONSE_BYTES, Via,
};

/// The same job every way: the origin must see the header the proxy set (and
/// none direct), and the whole body must come back.
pub(super) fn check(at: &Placement<'_>, mode: &Mode) -> anyhow::Result<()> {
    let base = url(mode);
    let want_auth = if mode.via == Via::Direct {
        ""
    } else {
        AUTHORIZATION
    };
    let auth = curl(at, &format!("{base}auth"), &[])
        .with_context(|| format!("checking {}", mode.label))?;
    ensure!(
        auth == want_auth,
        "{}: the origin saw Authorization {auth:?}, expected {want_auth:?}",
        mode.label
    );
    let got = curl(
        at,
        &base,
        &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
    )
    .with_context(|| format!("checking {}", mode.label))?;
    ensure!(
        got == format!("200 {BODY_BYTES}"),
        "{}: GET / answered {got:?}, expected \"200 {BODY_BYTES}\"",
        mode.label
    );
    if mode.cached {
        // Stored by the GET above: this one is a hit (an Age from
        // ambassador, nginx's own status header).
        let head = curl(at, &base, &["-s", "-o", "/dev/null", "-D", "-"])?.to_ascii_lowercase();
        ensure!(
            head.contains("\r\nage: ") || head.contains("x-cache-status: hit"),
            "{}: the second GET was not a cache hit:\n{head}",
            mode.label
        );
    }
    Ok(())
}

/// Where the client sends its requests in each mode.
fn url(m: &Mode) -> String {
    if m.cached {
        let (host, port) = match m.via {
            Via::Nginx => ("127.0.0.1", NGINX_CACHED_PORT),
            _ => (SERVER_V4, AMBASSADOR_CACHED_PORT),
        };
        return format!("http://{host}:{port}/{CACHED_PATH}");
    }
    let (host, port) = match (m.via, m.tls) {
        (Via::Ambassador, true) if m.h2 => (SERVER_V4, AMBASSADOR_H2_PORT),
        (Via::Ambassador, false) if m.h2 => (SERVER_V4, ORIGIN_H2C_PORT),
        (Via::Direct, _) => (SERVER_V4, ORIGIN_PORT),
        (Via::Ambassador, false) => (SERVER_V4, ORIGIN_PORT),
        (Via::Ambassador, true) => (SERVER_V4, AMBASSADOR_TLS_PORT),
        (Via::Haproxy, false) => ("127.0.0.1", HAPROXY_PORT),
        (Via::Haproxy, true) => ("127.0.0.1", HAPROXY_TLS_PORT),
        (Via::Nginx, false) => ("127.0.0.1", NGINX_PORT),
        (Via::Nginx, true) => ("127.0.0.1", NGINX_TLS_PORT),
    };
    format!("http://{host}:{port}/")
}

fn curl(at: &Placement<'_>, url: &str, extra: &[&str]) -> anyhow::Result<String> {
    let out = placed("curl", at)
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()
        .context("cannot start curl")?;
    ensure!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What oha sends in this mode: the bench's GETs, or the training's POSTs
/// (h2c with prior knowledge where the mode says so).
pub(super) fn target(mode: &Mode) -> Target {
    let mut url = url(mode);
    let mut args: Vec<String> = Vec::new();
    if mode.h2 && !mode.tls {
        args.push("--http2".into());
    }
    let response_bytes = if mode.training {
        url.push_str(TRAIN_PATH);
        let body = "t".repeat(TRAIN_REQUEST_BYTES);
        for a in [
            "-m",
            "POST",
            "-d",
            &body,
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json",
            "-H",
            "x-request-id: pgo-training",
        ] {
            args.push(a.into());
        }
        TRAIN_RESPONSE_BYTES
    } else {
        BODY_BYTES
    };
    Target {
        label: mode.label.clone(),
        url,
        args,
        response_bytes,
        h2: mode.h2,
    }
}
