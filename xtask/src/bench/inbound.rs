//! `cargo xtask bench`, inbound section: the Pod's gateway. A caller in the
//! servers' namespace sends keep-alive HTTPS GETs with a bearer JWT (RS256 or
//! ES256) to the Pod; the gateway ends TLS, checks the token, forwards its
//! `sub` and the caller's address to the app (nginx in the Pod, a 1 KiB
//! answer). Done by ambassador (the sk_lookup program hands the connection to
//! it; its inbound policy), by HAProxy 2.6 (`bind ... ssl crt`,
//! `jwt_verify`) and, TLS only, by nginx (open source nginx has no JWT
//! check), in one run, next to the app reached directly over plain HTTP.
//! Measured and reported as the outbound HTTP section is (`oha.rs`).

mod config;

use std::{fs, path::Path, time::SystemTime};

use ambassador_tests::{
    POD_V4, Placement, Pod, SERVER_V4, cgroup2_mount,
    jwt::{SigningKey, jwks},
    placed,
    upstream::{CertKind, TestCa},
};
use anyhow::{Context as _, ensure};

use self::config::{Files, ambassador_config, app_config, haproxy_config, nginx_config};
use super::{
    http::{
        BODY_BYTES, Versions,
        daemon::{addr, haproxy, nginx, subdir},
    },
    machine::{Priority, cpu_busy},
    oha::{Figures, Run, Target, figures, measure},
    report,
};

/// The app's ports: ambassador's JWT policy, its TLS-only policy (also the
/// port HAProxy and nginx forward to), and the one callers reach directly.
const AMB_JWT_PORT: u16 = 8080;
const AMB_TLS_PORT: u16 = 8081;
/// ambassador's JWT policy with `remember_per_connection: false`: every
/// request's token verified in full, as HAProxy does.
const AMB_JWT_FULL_PORT: u16 = 8082;
const APP_DIRECT_PORT: u16 = 8090;
const HAPROXY_RS256_PORT: u16 = 18443;
const HAPROXY_ES256_PORT: u16 = 18444;
const HAPROXY_TLS_PORT: u16 = 18445;
const NGINX_TLS_PORT: u16 = 18446;
pub(super) const POD_NAME: &str = "pod.bench.test";
const ISSUER: &str = "https://issuer.bench.test";
const AUDIENCE: &str = "orders";
const USER_HEADER: &str = "x-user";
const USER: &str = "alice";
/// The HTTP section's rounds and log filter: the two sections are read
/// side by side.
pub(super) use super::http::{LOG_FILTER, ROUNDS, Via};

/// What the gateway does besides forwarding.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Job {
    /// Nothing (direct: plain HTTP to the app).
    Plain,
    /// Ends TLS.
    Tls,
    /// Ends TLS and checks an RS256 token ...
    Rs256,
    /// ... or an ES256 one.
    Es256,
}

struct Mode {
    via: Via,
    job: Job,
    port: u16,
    label: String,
}

impl Mode {
    /// ambassador verifying every request's token in full.
    fn full(&self) -> bool {
        self.port == AMB_JWT_FULL_PORT
    }
}

/// One mode's figures, with the mode.
pub(super) struct Row {
    pub(super) via: Via,
    pub(super) job: Job,
    /// ambassador without its per-connection token memo.
    pub(super) full: bool,
    pub(super) f: Figures,
}

/// Bearer tokens of each algorithm, valid for the run, and the expired one
/// the check shows every JWT gateway refusing.
struct Tokens {
    rs256: String,
    es256: String,
    expired: String,
}

/// Runs the inbound section; returns its report.
pub fn run() -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["haproxy", "nginx", "curl", "sqlite3", "openssl"])?;
    let oha = crate::toolchain::ensure_oha()?;
    let versions = Versions::find(&oha)?;
    let busy_before = cpu_busy();
    let _priority = Priority::raise();

    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let ca = TestCa::new("ambassador inbound bench CA");
    let ca_file = ca.write_ca_file(&dir);
    let (tokens, files) = write_files(&dir, &ca)?;
    let f = files.view();

    let root_cg = cgroup2_mount();
    let pod_at = Placement {
        netns: &pod.netns,
        cgroup: &root_cg,
        uid: None,
    };
    let app_dir = subdir(&dir, "app")?;
    let mut app = nginx("app nginx", &pod_at, &app_dir, &app_config(&app_dir))?;
    app.wait_listening(
        &pod.netns,
        &[
            AMB_JWT_PORT,
            AMB_JWT_FULL_PORT,
            AMB_TLS_PORT,
            APP_DIRECT_PORT,
        ]
        .map(|p| addr("127.0.0.1", p)),
    )?;
    let haproxy_dir = subdir(&dir, "haproxy")?;
    let mut haproxy = haproxy(&pod_at, &haproxy_dir, &haproxy_config(&f))?;
    haproxy.wait_listening(
        &pod.netns,
        &[HAPROXY_RS256_PORT, HAPROXY_ES256_PORT, HAPROXY_TLS_PORT].map(|p| addr(POD_V4, p)),
    )?;
    let nginx_dir = subdir(&dir, "nginx")?;
    let mut gateway = nginx(
        "nginx (gateway)",
        &pod_at,
        &nginx_dir,
        &nginx_config(&nginx_dir, &f),
    )?;
    gateway.wait_listening(&pod.netns, &[addr(POD_V4, NGINX_TLS_PORT)])?;

    fs::write(&pod.config, ambassador_config(&f)).context("writing the ambassador config")?;
    let uid = pod.name();
    pod.start_proxy_with_kernel_maps_logging(&uid, &[], LOG_FILTER);

    let caller = Placement {
        netns: &pod.servers,
        cgroup: &root_cg,
        uid: None,
    };
    let modes = modes(&versions);
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for i in 0..modes.len() {
            let k = (i + round) % modes.len();
            let m = &modes[k];
            if round == 0 {
                check(&caller, m, &tokens, &ca_file)?;
            }
            let pids = match m.via {
                Via::Direct => Vec::new(),
                Via::Ambassador => pod.proxy_pid().into_iter().collect(),
                Via::Haproxy => haproxy.pids(),
                Via::Nginx => gateway.pids(),
            };
            let db = dir.join("fixed-rate.db");
            let t = target(m, &tokens, &ca_file);
            runs[k].push(measure(
                &oha,
                &caller,
                &t,
                &pids,
                super::oha::FIXED_SECONDS,
                &db,
            )?);
        }
        eprintln!("xtask: bench inbound round {}/{ROUNDS} done", round + 1);
    }
    let redirected = pod.counters().inbound_redirected;
    drop((gateway, haproxy, app));
    drop(pod);

    let rows: Vec<Row> = modes
        .into_iter()
        .zip(runs)
        .map(|(m, r)| Row {
            via: m.via,
            job: m.job,
            full: m.full(),
            f: figures(m.label, &r),
        })
        .collect();
    let notes = report::HttpNotes {
        redirected,
        accelerated: 0,
        busy_before,
        busy_after: cpu_busy(),
    };
    Ok(report::inbound_table(&rows, &versions, &notes))
}

/// The files the gateways read, kept for the run (in the Pod's directory,
/// removed with it).
struct Written {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    cert_and_key: std::path::PathBuf,
    jwks: std::path::PathBuf,
    rsa_public: std::path::PathBuf,
    ec_public: std::path::PathBuf,
}

impl Written {
    fn view(&self) -> Files<'_> {
        Files {
            cert: &self.cert,
            key: &self.key,
            cert_and_key: &self.cert_and_key,
            jwks: &self.jwks,
            rsa_public: &self.rsa_public,
            ec_public: &self.ec_public,
        }
    }
}

/// The Pod's certificate (for its name and address), the signing keys' public
/// halves as a JWKS (ambassador) and as PEM (HAProxy), and the tokens.
fn write_files(dir: &Path, ca: &TestCa) -> anyhow::Result<(Tokens, Written)> {
    let ip = POD_V4.parse().ok();
    let (cert, key) = ca.issue(CertKind::Valid, POD_NAME, ip);
    let rsa = SigningKey::rsa(dir, "bench-rsa");
    let ec = SigningKey::ec("bench-ec");
    let w = Written {
        cert: dir.join("pod-cert.pem"),
        key: dir.join("pod-key.pem"),
        cert_and_key: dir.join("pod.pem"),
        jwks: dir.join("jwks.json"),
        rsa_public: dir.join("rsa-public.pem"),
        ec_public: dir.join("ec-public.pem"),
    };
    for (path, text) in [
        (&w.cert, cert.as_bytes()),
        (&w.key, key.as_bytes()),
        (&w.cert_and_key, format!("{cert}{key}").as_bytes()),
        (&w.jwks, jwks(&[&rsa, &ec]).as_bytes()),
        (&w.rsa_public, &rsa.public_pem),
        (&w.ec_public, &ec.public_pem),
    ] {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let claims = |exp: u64| serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "sub": USER, "exp": exp, "iat": now});
    let tokens = Tokens {
        rs256: rsa.token(&claims(now + 3600)),
        es256: ec.token(&claims(now + 3600)),
        expired: ec.token(&claims(now - 600)),
    };
    Ok((tokens, w))
}

/// Direct first (the others' added latency is over it), then each job done
/// by ambassador next to the others doing it.
fn modes(v: &Versions) -> Vec<Mode> {
    let mode = |via, job, port, label: String| Mode {
        via,
        job,
        port,
        label,
    };
    let haproxy = |what: &str| format!("HAProxy {}, {what}", v.haproxy);
    vec![
        mode(
            Via::Direct,
            Job::Plain,
            APP_DIRECT_PORT,
            "direct (plain HTTP to the app)".into(),
        ),
        mode(
            Via::Ambassador,
            Job::Rs256,
            AMB_JWT_PORT,
            "ambassador, TLS + JWT RS256".into(),
        ),
        mode(
            Via::Haproxy,
            Job::Rs256,
            HAPROXY_RS256_PORT,
            haproxy("TLS + JWT RS256"),
        ),
        mode(
            Via::Ambassador,
            Job::Es256,
            AMB_JWT_PORT,
            "ambassador, TLS + JWT ES256".into(),
        ),
        mode(
            Via::Haproxy,
            Job::Es256,
            HAPROXY_ES256_PORT,
            haproxy("TLS + JWT ES256"),
        ),
        mode(
            Via::Ambassador,
            Job::Rs256,
            AMB_JWT_FULL_PORT,
            "ambassador, RS256, no token memo".into(),
        ),
        mode(
            Via::Ambassador,
            Job::Es256,
            AMB_JWT_FULL_PORT,
            "ambassador, ES256, no token memo".into(),
        ),
        mode(
            Via::Ambassador,
            Job::Tls,
            AMB_TLS_PORT,
            "ambassador, TLS only".into(),
        ),
        mode(
            Via::Haproxy,
            Job::Tls,
            HAPROXY_TLS_PORT,
            haproxy("TLS only"),
        ),
        mode(
            Via::Nginx,
            Job::Tls,
            NGINX_TLS_PORT,
            format!("nginx {}, TLS only", v.nginx),
        ),
    ]
}

fn url(m: &Mode, path: &str) -> String {
    match m.job {
        Job::Plain => format!("http://{POD_V4}:{}/{path}", m.port),
        _ => format!("https://{POD_V4}:{}/{path}", m.port),
    }
}

fn token<'a>(m: &Mode, tokens: &'a Tokens) -> Option<&'a str> {
    match m.job {
        Job::Rs256 => Some(&tokens.rs256),
        Job::Es256 => Some(&tokens.es256),
        Job::Plain | Job::Tls => None,
    }
}

/// What oha sends in this mode: GET /, with the token, trusting the bench's
/// CA.
fn target(m: &Mode, tokens: &Tokens, ca_file: &Path) -> Target {
    let mut args = Vec::new();
    if m.job != Job::Plain {
        args.extend(["--cacert".to_string(), ca_file.display().to_string()]);
    }
    if let Some(t) = token(m, tokens) {
        args.extend(["-H".to_string(), format!("authorization: Bearer {t}")]);
    }
    Target {
        label: m.label.clone(),
        url: url(m, ""),
        args,
        response_bytes: BODY_BYTES,
        h2: false,
    }
}

/// Every gateway does the same job: the app learns the verified user (never
/// the caller's own `x-user`) and the caller's address; a JWT gateway
/// refuses no token and an expired one with 401; the whole body comes back.
fn check(caller: &Placement<'_>, m: &Mode, tokens: &Tokens, ca_file: &Path) -> anyhow::Result<()> {
    let curl = |path: &str, extra: &[&str]| -> anyhow::Result<String> {
        let out = placed("curl", caller)
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(ca_file)
            .args(extra)
            .arg(url(m, path))
            .output()
            .context("cannot start curl")?;
        ensure!(
            out.status.success(),
            "{}: curl {path} failed: {}",
            m.label,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let bearer = |t: &str| format!("authorization: Bearer {t}");
    let mut auth = Vec::new();
    if let Some(t) = token(m, tokens) {
        auth = vec!["-H".to_string(), bearer(t)];
    }
    let mut forged = auth.clone();
    forged.extend(["-H".into(), format!("{USER_HEADER}: mallory")]);
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    let whoami = curl("whoami", &forged)?;
    let want = match m.job {
        Job::Plain => "mallory||".to_string(),
        Job::Tls => format!("mallory|{SERVER_V4}|https"),
        Job::Rs256 | Job::Es256 => format!("{USER}|{SERVER_V4}|https"),
    };
    ensure!(
        whoami == want,
        "{}: the app was told {whoami:?}, expected {want:?}",
        m.label
    );
    let status = ["-o", "/dev/null", "-w", "%{http_code}"];
    if matches!(m.job, Job::Rs256 | Job::Es256) {
        let expired = bearer(&tokens.expired);
        for (what, extra) in [
            ("no token", vec![]),
            ("an expired token", vec!["-H", &expired]),
        ] {
            let got = curl("", &[&status[..], &extra].concat())?;
            ensure!(
                got == "401",
                "{}: {what} was answered {got}, expected 401",
                m.label
            );
        }
    }
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let got = curl(
        "",
        &[
            &auth[..],
            &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
        ]
        .concat(),
    )?;
    ensure!(
        got == format!("200 {BODY_BYTES}"),
        "{}: GET / answered {got:?}, expected \"200 {BODY_BYTES}\"",
        m.label
    );
    Ok(())
}
