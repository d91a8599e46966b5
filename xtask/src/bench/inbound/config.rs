//! The inbound section's configs: the app (nginx in the Pod), ambassador's
//! inbound policies, HAProxy and nginx in front of the same app. Every
//! gateway ends TLS with the same certificate, tells the app the caller
//! (`X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto`) and, where it checks
//! JWTs, checks the same things (signature by a key of the token's algorithm,
//! issuer, audience, expiry) and forwards `sub` as `x-user`, any copy the
//! caller sent removed.

use std::path::Path;

use ambassador_tests::POD_V4;

use super::{
    AMB_JWT_FULL_PORT, AMB_JWT_PORT, AMB_TLS_PORT, APP_DIRECT_PORT, AUDIENCE, HAPROXY_ES256_PORT,
    HAPROXY_RS256_PORT, HAPROXY_TLS_PORT, ISSUER, NGINX_TLS_PORT, USER_HEADER,
};
use crate::bench::http::{
    BODY_BYTES,
    config::{haproxy_common, nginx_common},
};

/// The files the gateways read.
pub(super) struct Files<'a> {
    pub(super) cert: &'a Path,
    pub(super) key: &'a Path,
    /// Certificate and key in one file, as HAProxy's `crt` takes them.
    pub(super) cert_and_key: &'a Path,
    pub(super) jwks: &'a Path,
    pub(super) rsa_public: &'a Path,
    pub(super) ec_public: &'a Path,
}

/// The app: 1 KiB at `/`, and at `/whoami` the user and client the gateway
/// said (checked before each mode is measured). It listens on every address
/// of the Pod: ambassador's ports are taken by the kernel before they reach
/// it, the direct port is not intercepted.
pub(super) fn app_config(dir: &Path) -> String {
    let body = "x".repeat(BODY_BYTES);
    let server = |port: u16| {
        format!(
            r#"
  server {{
    listen 0.0.0.0:{port};
    location = /whoami {{ return 200 "$http_{user}|$http_x_forwarded_for|$http_x_forwarded_proto"; }}
    location / {{ return 200 "{body}"; }}
  }}"#,
            user = USER_HEADER.replace('-', "_")
        )
    };
    format!(
        "{}{}{}{}{}\n}}\n",
        nginx_common(dir),
        server(AMB_JWT_PORT),
        server(AMB_JWT_FULL_PORT),
        server(AMB_TLS_PORT),
        server(APP_DIRECT_PORT)
    )
}

/// One proxy thread; access logs off, as for HAProxy and nginx. The JWT
/// policy twice: as users have it (a connection remembers the last token it
/// verified), and verifying every request's token in full.
pub(super) fn ambassador_config(f: &Files<'_>) -> String {
    let tls = format!(
        "{{ cert: \"{}\", key: \"{}\" }}",
        f.cert.display(),
        f.key.display()
    );
    let jwt = |port: u16, remember: bool| {
        format!(
            r#"
    - port: {port}
      tls: {tls}
      auth:
        jwt: {{ jwks_file: "{jwks}", issuers: ["{ISSUER}"], audiences: [{AUDIENCE}], remember_per_connection: {remember} }}
        forward_claims: {{ sub: {USER_HEADER} }}"#,
            jwks = f.jwks.display(),
        )
    };
    format!(
        r#"
proxy: {{ workers: 1 }}
telemetry: {{ access_log: false }}
inbound:
  ports: [{AMB_JWT_PORT}, {AMB_JWT_FULL_PORT}, {AMB_TLS_PORT}]
  policies:{}{}
    - port: {AMB_TLS_PORT}
      tls: {tls}
"#,
        jwt(AMB_JWT_PORT, true),
        jwt(AMB_JWT_FULL_PORT, false),
    )
}

/// HAProxy 2.6 checks a JWT with converters: the algorithm from the header,
/// `jwt_verify` with the public key, then issuer, audience and expiry from
/// the payload; a failed check is a 401, as ambassador's.
pub(super) fn haproxy_config(f: &Files<'_>) -> String {
    let jwt = |alg: &str, key: &Path| {
        format!(
            r#"
  http-request del-header {USER_HEADER}
  http-request deny deny_status 401 unless {{ http_auth_bearer -m found }}
  http-request set-var(txn.alg) http_auth_bearer,jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str {alg} }}
  http-request deny deny_status 401 unless {{ http_auth_bearer,jwt_verify(txn.alg,"{key}") -m int 1 }}
  http-request deny deny_status 401 unless {{ http_auth_bearer,jwt_payload_query('$.iss') -m str {ISSUER} }}
  http-request deny deny_status 401 unless {{ http_auth_bearer,jwt_payload_query('$.aud') -m str {AUDIENCE} }}
  http-request set-var(txn.exp) http_auth_bearer,jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
  http-request set-header {USER_HEADER} %[http_auth_bearer,jwt_payload_query('$.sub')]"#,
            key = key.display()
        )
    };
    let frontend = |name: &str, port: u16, checks: &str| {
        format!(
            r#"
frontend {name}
  bind {POD_V4}:{port} ssl crt {crt} alpn h2,http/1.1
  http-request del-header x-forwarded-proto
  http-request del-header forwarded{checks}
  http-request set-header x-forwarded-proto https
  http-request set-header forwarded "for=%[src];proto=https"
  option forwardfor
  default_backend app
"#,
            crt = f.cert_and_key.display()
        )
    };
    format!(
        r#"{}
{}{}{}
backend app
  server app 127.0.0.1:{AMB_TLS_PORT}
"#,
        haproxy_common(),
        frontend("jwt_rs256", HAPROXY_RS256_PORT, &jwt("RS256", f.rsa_public)),
        frontend("jwt_es256", HAPROXY_ES256_PORT, &jwt("ES256", f.ec_public)),
        frontend("tls", HAPROXY_TLS_PORT, ""),
    )
}

/// nginx (open source) ends TLS and forwards; it has no JWT check (that is
/// `auth_jwt`, NGINX Plus only), so it runs the TLS-only job.
pub(super) fn nginx_config(dir: &Path, f: &Files<'_>) -> String {
    format!(
        r#"
{}
  upstream app {{ server 127.0.0.1:{AMB_TLS_PORT}; keepalive 32; keepalive_requests 1000000; }}
  server {{
    listen {POD_V4}:{NGINX_TLS_PORT} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header Forwarded "for=$remote_addr;proto=https";
    }}
  }}
}}
"#,
        nginx_common(dir),
        cert = f.cert.display(),
        key = f.key.display()
    )
}
