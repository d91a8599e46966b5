//! Callers of the Pod proving who they are: JWTs (RS256 and ES256, checked
//! against a JWKS file or URL) and API keys from a rotating file, with
//! unmodified curl as the caller and the app a plain server in the Pod.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ambassador_tests::{
    jwt::{SigningKey, b64, jwks},
    upstream::{CertKind, HttpUpstream, TestCa},
    *,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

const ISSUER: &str = "https://issuer.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(aud: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "aud": aud, "sub": "alice", "tenant": "acme", "exp": exp})
}

/// Writes `text` to `path` the way a Secret update does: a new file renamed over.
fn rotate(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Gate {
    pod: Pod,
    app: HttpUpstream,
    dir: PathBuf,
}

impl Gate {
    fn new(auth: &str, jwks_text: &str) -> Gate {
        let pod = Pod::new("");
        let dir = pod.shared_dir();
        std::fs::write(dir.join("jwks.json"), jwks_text).unwrap();
        std::fs::write(dir.join("keys.yaml"), "billing: billing-key-0123456789\n").unwrap();
        let auth = auth
            .replace("JWKS", &dir.join("jwks.json").display().to_string())
            .replace("KEYS", &dir.join("keys.yaml").display().to_string());
        pod.rewrite_config(&format!(
            "inbound:\n  ports: [8080]\n  policies:\n    - port: 8080\n      auth: {auth}\n"
        ));
        let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
        assert!(out.status.success(), "{}", stderr(&out));
        let app = HttpUpstream::plain(pod.app_listener(8080));
        let mut gate = Gate { pod, app, dir };
        let uid = gate.pod.name();
        gate.pod.start_proxy_with_kernel_maps(&uid, &[]);
        gate
    }

    /// The status a caller gets, with `extra` curl arguments.
    fn status(&self, extra: &[&str]) -> String {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        let out = self
            .pod
            .caller_curl(&format!("http://{POD_V4}:8080/orders"), &args);
        stdout(&out)
    }

    fn bearer(&self, token: &str) -> String {
        self.status(&["-H", &format!("Authorization: Bearer {token}")])
    }

    fn failures(&self, reason: &str) -> f64 {
        let m = self.pod.metrics();
        let line = format!(
            r#"ambassador_auth_failures_total{{service="inbound-8080",direction="inbound",reason="{reason}"}} "#
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

#[test]
fn jwt_callers_are_checked_and_the_app_learns_only_verified_claims() {
    let dir = std::env::temp_dir();
    let rsa = SigningKey::rsa(&dir, &format!("rsa-{}", std::process::id()));
    let ec = SigningKey::ec("ec-1");
    let gate = Gate::new(
        &format!(
            "{{ jwt: {{ jwks_file: JWKS, issuers: ['{ISSUER}'], audiences: [orders] }}, \
             forward_claims: {{ sub: x-user, tenant: x-tenant }} }}"
        ),
        &jwks(&[&rsa, &ec]),
    );
    let exp = now() + 600;

    // Nothing presented: 401 with a challenge, and the app sees nothing.
    let out = gate
        .pod
        .caller_curl(&format!("http://{POD_V4}:8080/orders"), &["-i"]);
    let head = stdout(&out);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(gate.failures("missing"), 1.0);

    // Valid, both key kinds; the caller's own x-user is replaced.
    let good = rsa.token(&claims("orders", exp));
    let out = gate.status(&[
        "-H",
        &format!("Authorization: Bearer {good}"),
        "-H",
        "X-User: mallory",
    ]);
    assert_eq!(out, "200");
    assert_eq!(gate.bearer(&ec.token(&claims("orders", exp))), "200");
    let seen = gate.app.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].header("x-user"), Some("alice"));
    assert_eq!(seen[0].header("x-tenant"), Some("acme"));
    assert_eq!(
        seen[0]
            .headers
            .iter()
            .filter(|(n, _)| n == "x-user")
            .count(),
        1
    );

    // Each way to be wrong is a 401 that names it, counted by reason.
    let cases: Vec<(String, &str)> = vec![
        (rsa.token(&claims("orders", now() - 3600)), "expired"),
        (rsa.token(&claims("billing", exp)), "wrong_audience"),
        (
            rsa.token(
                &serde_json::json!({"iss": "https://evil.test", "aud": "orders", "exp": exp}),
            ),
            "wrong_issuer",
        ),
        (
            rsa.token(&serde_json::json!({"aud": "orders", "exp": exp})),
            "missing_claim",
        ),
        (
            // alg none: unsigned.
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims("orders", exp).to_string().as_bytes())
            ),
            "malformed",
        ),
        (
            // HS256 keyed with the RSA key's public PEM: the classic confusion.
            {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some(rsa.kid.clone());
                encode(
                    &h,
                    &claims("orders", exp),
                    &EncodingKey::from_secret(&rsa.public_pem),
                )
                .unwrap()
            },
            "algorithm",
        ),
        (
            {
                let other = SigningKey::ec("ec-1");
                other.token(&claims("orders", exp))
            },
            "bad_signature",
        ),
        (
            SigningKey::ec("nobody").token(&claims("orders", exp)),
            "unknown_key",
        ),
    ];
    for (token, reason) in &cases {
        assert_eq!(gate.bearer(token), "401", "{reason}");
        assert_eq!(gate.failures(reason), 1.0, "{reason}");
    }
    assert_eq!(
        gate.app.seen().len(),
        2,
        "no refused request reached the app"
    );

    // A key added to the file (a rotation) is used without a restart.
    let next = SigningKey::ec("ec-2");
    rotate(&gate.dir.join("jwks.json"), &jwks(&[&rsa, &ec, &next]));
    let token = next.token(&claims("orders", exp));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.bearer(&token) != "200" {
        assert!(
            Instant::now() < deadline,
            "the rotated key set was never used"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let line = gate
        .pod
        .wait_access_log(r#""status":401"#)
        .expect("a refused request's line");
    assert!(!line.contains(&good), "no token in logs: {line}");
    assert!(
        !gate.pod.proxy_log().contains(&good),
        "no token in the proxy's log"
    );
}

#[test]
fn api_keys_rotate_and_name_the_client() {
    let gate = Gate::new("{ api_keys: { file: KEYS, forward_name: x-client } }", "{}");
    let key = |k: &str| gate.status(&["-H", &format!("X-Api-Key: {k}"), "-H", "X-Client: admin"]);
    assert_eq!(key("billing-key-0123456789"), "200");
    assert_eq!(gate.app.seen()[0].header("x-client"), Some("billing"));
    assert_eq!(key("guessed-key-0123456789"), "401");
    assert_eq!(gate.failures("unknown_api_key"), 1.0);

    rotate(
        &gate.dir.join("keys.yaml"),
        "billing: billing-key-rotated-9876\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while key("billing-key-rotated-9876") != "200" {
        assert!(
            Instant::now() < deadline,
            "the rotated key was never accepted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        key("billing-key-0123456789"),
        "401",
        "the old key still works"
    );
    // A bad file (a half-written rotation) keeps the last good keys.
    rotate(&gate.dir.join("keys.yaml"), "billing: [not, a, key]\n");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(key("billing-key-rotated-9876"), "200");
    let log = gate.pod.proxy_log();
    assert!(log.contains("keeping the previous one"), "{log}");
    assert!(!log.contains("billing-key"), "no key in the log: {log}");
}

#[test]
fn keys_from_a_url_are_fetched_once_for_a_burst_of_unknown_kids() {
    let ec = SigningKey::ec("url-1");
    let pod = Pod::new("");
    let dir = pod.shared_dir();
    let ca = TestCa::new("jwks CA");
    let (cert, key) = ca.issue(
        CertKind::Valid,
        "jwks.test",
        Some(SERVER_V4.parse().unwrap()),
    );
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("jwks.json"), jwks(&[&ec])).unwrap();
    std::fs::write(dir.join("jwks.crt"), cert).unwrap();
    std::fs::write(dir.join("jwks.key"), key).unwrap();
    let ca_file = ca.write_ca_file(&dir);
    let log = dir.join("jwks.log");
    let server = format!(
        "import http.server, ssl, sys, os\n\
         os.chdir({www:?})\n\
         class H(http.server.SimpleHTTPRequestHandler):\n\
         \x20   def log_message(self, f, *a):\n\
         \x20       open({log:?}, 'a').write('GET ' + self.path + '\\n')\n\
         s = http.server.HTTPServer(('{SERVER_V4}', 8443), H)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         c.load_cert_chain({crt:?}, {key:?})\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()\n",
        www = www.display().to_string(),
        log = log.display().to_string(),
        crt = dir.join("jwks.crt").display().to_string(),
        key = dir.join("jwks.key").display().to_string(),
    );
    let _srv = Killed(
        Command::new("ip")
            .args(["netns", "exec", &pod.servers.name, "python3", "-c", &server])
            .spawn()
            .unwrap(),
    );
    pod.rewrite_config(&format!(
        "inbound:\n  ports: [8080]\n  policies:\n    - port: 8080\n      auth: {{ jwt: {{ jwks_url: 'https://{SERVER_V4}:8443/jwks.json', jwks_ca_file: {} }} }}\n",
        ca_file.display()
    ));
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    let _app = HttpUpstream::plain(pod.app_listener(8080));
    let mut pod = pod;
    let uid = pod.name();
    pod.start_proxy_with_kernel_maps(&uid, &[]);
    let fetches = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let status = |token: &str| {
        stdout(&pod.caller_curl(
            &format!("http://{POD_V4}:8080/"),
            &[
                "-H",
                &format!("Authorization: Bearer {token}"),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ],
        ))
    };
    let exp = now() + 600;
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&ec.token(&claims("orders", exp))) != "200" {
        assert!(
            Instant::now() < deadline,
            "the JWKS URL never served: {}",
            pod.proxy_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = fetches();
    let stranger = SigningKey::ec("url-2");
    for _ in 0..5 {
        assert_eq!(status(&stranger.token(&claims("orders", exp))), "401");
    }
    assert!(
        fetches() - before <= 1,
        "fetched {} times for 5 requests",
        fetches() - before
    );

    // The issuer publishes the new key; a token naming it makes the proxy
    // fetch again (at most every 10 s), and it passes.
    std::fs::write(www.join("jwks.json"), jwks(&[&ec, &stranger])).unwrap();
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(status(&stranger.token(&claims("orders", exp))), "200");
}

/// A child process killed (by its PID) when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
