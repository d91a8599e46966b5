//! The configs the HTTP section writes: ambassador's services (plain, TLS
//! origination, HTTP/2 both ways), the origin nginx, nginx as a proxy, and
//! HAProxy, each setting the same Authorization header.

use std::path::Path;

use ambassador_tests::SERVER_V4;

use super::{
    AMBASSADOR_CACHED_PORT, AMBASSADOR_H2_PORT, AMBASSADOR_TLS_PORT, AUTHORIZATION, BODY_BYTES,
    CACHED_PATH, HAPROXY_PORT, HAPROXY_TLS_PORT, NGINX_CACHED_PORT, NGINX_PORT, NGINX_TLS_PORT,
    ORIGIN_H2_PORT, ORIGIN_H2C_PORT, ORIGIN_NAME, ORIGIN_PORT, ORIGIN_TLS_PORT, TRAIN_PATH,
    TRAIN_RESPONSE_BYTES,
};

/// `workers: None` leaves ambassador's default.
pub(super) fn ambassador_config(workers: Option<u32>, accelerate: bool, ca_file: &Path) -> String {
    let mut proxy = workers
        .map(|w| format!("proxy:\n  workers: {w}\n"))
        .unwrap_or_default();
    if !accelerate {
        proxy.push_str("intercept: { accelerate: false }\n");
    }
    let auth = format!("{{ set_headers: {{ authorization: {{ value: \"{AUTHORIZATION}\" }} }} }}");
    // ALPN as users leave it ([h2, http/1.1]): the origin picks http/1.1, the
    // protocol HAProxy and nginx speak to it, and after the first response
    // the service's requests take the HTTP/1.1 pool.
    // What the app dials -> the origin's TLS listener, verified.
    let tls_service = |name: &str, port: u16, origin_port: u16| {
        format!(
            r#"
  - name: {name}
    match: {{ cidr: {SERVER_V4}/32, port: {port} }}
    protocol: http
    upstream:
      endpoints: [{{ address: "{SERVER_V4}:{origin_port}" }}]
      tls: {{ server_name: {ORIGIN_NAME}, ca_file: "{}" }}
    request: {auth}
"#,
            ca_file.display()
        )
    };
    // Access logs off: HAProxy and nginx run without them too.
    format!(
        r#"
{proxy}telemetry: {{ access_log: false }}
services:
  - name: origin
    match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_PORT} }}
    protocol: http
    request: {auth}
{}{}
  - name: origin-h2c
    match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_H2C_PORT} }}
    protocol: http
    request: {auth}
  - name: origin-cached
    match: {{ cidr: {SERVER_V4}/32, port: {AMBASSADOR_CACHED_PORT} }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:{ORIGIN_PORT}" }}] }}
    request: {auth}
    cache: {{}}
"#,
        tls_service("origin-tls", AMBASSADOR_TLS_PORT, ORIGIN_TLS_PORT),
        tls_service("origin-h2", AMBASSADOR_H2_PORT, ORIGIN_H2_PORT),
    )
}

/// What every nginx here shares: one worker, files in its own directory, and
/// keep-alive connections that are never closed for having served too many
/// requests (the default, 1000, would add reconnects to the measurement).
pub(in crate::bench) fn nginx_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  default_type text/plain;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
"#
    )
}

pub(super) fn origin_config(dir: &Path, cert: &Path, key: &Path) -> String {
    let body = "x".repeat(BODY_BYTES);
    let trained = "y".repeat(TRAIN_RESPONSE_BYTES);
    // /auth shows which Authorization arrived, for the checks before each run.
    // /cached/ answers are public (the proxies send Authorization) and
    // fresh for an hour: after the first, every request is a hit.
    let locations = format!(
        r#"location = /auth {{ return 200 "$http_authorization"; }}
    location = /{CACHED_PATH}auth {{ return 200 "$http_authorization"; }}
    location /{CACHED_PATH} {{
      add_header Cache-Control "public, max-age=3600";
      return 200 "{body}";
    }}
    location = /{TRAIN_PATH} {{ return 200 "{trained}"; }}
    location / {{ return 200 "{body}"; }}"#
    );
    format!(
        r#"
{}
  server {{
    listen {SERVER_V4}:{ORIGIN_PORT};
    {locations}
  }}
  server {{
    listen {SERVER_V4}:{ORIGIN_TLS_PORT} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    {locations}
  }}
  server {{
    listen {SERVER_V4}:{ORIGIN_H2_PORT} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    {locations}
  }}
  server {{
    listen {SERVER_V4}:{ORIGIN_H2C_PORT} http2;
    {locations}
  }}
}}
"#,
        nginx_common(dir),
        cert = cert.display(),
        key = key.display()
    )
}

/// `cache`: proxy_cache's directory, on tmpfs so that its hits are served
/// from memory as ambassador's are.
pub(super) fn nginx_proxy_config(dir: &Path, ca_file: &Path, cache: &Path) -> String {
    // HTTP/1.1 with `Connection ""` is what lets nginx keep upstream
    // connections open (it sends `Connection: close` otherwise).
    let proxying = format!(
        r#"proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{AUTHORIZATION}";"#
    );
    format!(
        r#"
{}
  upstream origin {{ server {SERVER_V4}:{ORIGIN_PORT}; keepalive 32; keepalive_requests 1000000; }}
  upstream origin_tls {{ server {SERVER_V4}:{ORIGIN_TLS_PORT}; keepalive 32; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{NGINX_PORT};
    location / {{
      proxy_pass http://origin;
      {proxying}
    }}
  }}
  proxy_cache_path {cache} levels=1:2 keys_zone=bench:10m max_size=64m use_temp_path=off;
  server {{
    listen 127.0.0.1:{NGINX_CACHED_PORT};
    location / {{
      proxy_pass http://origin;
      {proxying}
      proxy_cache bench;
      add_header X-Cache-Status $upstream_cache_status;
    }}
  }}
  server {{
    listen 127.0.0.1:{NGINX_TLS_PORT};
    location / {{
      proxy_pass https://origin_tls;
      {proxying}
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {};
      proxy_ssl_server_name on;
      proxy_ssl_name {ORIGIN_NAME};
    }}
  }}
}}
"#,
        nginx_common(dir),
        ca_file.display(),
        cache = cache.display(),
    )
}

pub(super) fn haproxy_config(ca_file: &Path) -> String {
    let ca = ca_file.display();
    format!(
        r#"{}
frontend plain
  bind 127.0.0.1:{HAPROXY_PORT}
  http-request set-header Authorization "{AUTHORIZATION}"
  default_backend origin
frontend tls
  bind 127.0.0.1:{HAPROXY_TLS_PORT}
  http-request set-header Authorization "{AUTHORIZATION}"
  default_backend origin_tls
backend origin
  server s {SERVER_V4}:{ORIGIN_PORT}
backend origin_tls
  server s {SERVER_V4}:{ORIGIN_TLS_PORT} ssl verify required ca-file {ca} sni str({ORIGIN_NAME}) verifyhost {ORIGIN_NAME}
"#,
        haproxy_common()
    )
}

/// What every HAProxy here shares: one thread, keep-alive both ways.
pub(in crate::bench) fn haproxy_common() -> &'static str {
    r#"
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s"#
}
