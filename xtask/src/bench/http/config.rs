//! The configs the HTTP section writes: ambassador's services (plain, TLS
//! origination, HTTP/2 both ways), the origin nginx, nginx as a proxy, and
//! HAProxy, each setting the same Authorization header.

use std::path::Path;

use ambassador_tests::SERVER_V4;

use super::{
    AMBASSADOR_H2_PORT, AMBASSADOR_TLS_PORT, AUTHORIZATION, BODY_BYTES, HAPROXY_PORT,
    HAPROXY_TLS_PORT, NGINX_PORT, NGINX_TLS_PORT, ORIGIN_H2_PORT, ORIGIN_H2C_PORT, ORIGIN_NAME,
    ORIGIN_PORT, ORIGIN_TLS_PORT, TRAIN_PATH, TRAIN_RESPONSE_BYTES,
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
            "\x20 - name: {name}\n\
             \x20   match: {{ cidr: {SERVER_V4}/32, port: {port} }}\n\
             \x20   protocol: http\n\
             \x20   upstream:\n\
             \x20     endpoints: [{{ address: \"{SERVER_V4}:{origin_port}\" }}]\n\
             \x20     tls: {{ server_name: {ORIGIN_NAME}, ca_file: \"{}\" }}\n\
             \x20   request: {auth}\n",
            ca_file.display()
        )
    };
    // Access logs off: HAProxy and nginx run without them too.
    format!(
        "{proxy}telemetry: {{ access_log: false }}\n\
         services:\n\
         \x20 - name: origin\n\
         \x20   match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_PORT} }}\n\
         \x20   protocol: http\n\
         \x20   request: {auth}\n\
         {}\
         {}\
         \x20 - name: origin-h2c\n\
         \x20   match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_H2C_PORT} }}\n\
         \x20   protocol: http\n\
         \x20   request: {auth}\n",
        tls_service("origin-tls", AMBASSADOR_TLS_PORT, ORIGIN_TLS_PORT),
        tls_service("origin-h2", AMBASSADOR_H2_PORT, ORIGIN_H2_PORT),
    )
}

/// What every nginx here shares: one worker, files in its own directory, and
/// keep-alive connections that are never closed for having served too many
/// requests (the default, 1000, would add reconnects to the measurement).
fn nginx_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 default_type text/plain;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n"
    )
}

pub(super) fn origin_config(dir: &Path, cert: &Path, key: &Path) -> String {
    let body = "x".repeat(BODY_BYTES);
    let trained = "y".repeat(TRAIN_RESPONSE_BYTES);
    // /auth shows which Authorization arrived, for the checks before each run.
    let locations = format!(
        "location = /auth {{ return 200 \"$http_authorization\"; }}\n\
         \x20   location = /{TRAIN_PATH} {{ return 200 \"{trained}\"; }}\n\
         \x20   location / {{ return 200 \"{body}\"; }}"
    );
    format!(
        "{}\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_PORT};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_TLS_PORT} ssl;\n\
         \x20   ssl_certificate {cert};\n\
         \x20   ssl_certificate_key {key};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_H2_PORT} ssl http2;\n\
         \x20   ssl_certificate {cert};\n\
         \x20   ssl_certificate_key {key};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_H2C_PORT} http2;\n\
         \x20   {locations}\n\
         \x20 }}\n\
         }}\n",
        nginx_common(dir),
        cert = cert.display(),
        key = key.display()
    )
}

pub(super) fn nginx_proxy_config(dir: &Path, ca_file: &Path) -> String {
    // HTTP/1.1 with `Connection ""` is what lets nginx keep upstream
    // connections open (it sends `Connection: close` otherwise).
    let proxying = format!(
        "proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Authorization \"{AUTHORIZATION}\";"
    );
    format!(
        "{}\
         \x20 upstream origin {{ server {SERVER_V4}:{ORIGIN_PORT}; keepalive 32; keepalive_requests 1000000; }}\n\
         \x20 upstream origin_tls {{ server {SERVER_V4}:{ORIGIN_TLS_PORT}; keepalive 32; keepalive_requests 1000000; }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{NGINX_PORT};\n\
         \x20   location / {{\n\
         \x20     proxy_pass http://origin;\n\
         \x20     {proxying}\n\
         \x20   }}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{NGINX_TLS_PORT};\n\
         \x20   location / {{\n\
         \x20     proxy_pass https://origin_tls;\n\
         \x20     {proxying}\n\
         \x20     proxy_ssl_verify on;\n\
         \x20     proxy_ssl_trusted_certificate {};\n\
         \x20     proxy_ssl_server_name on;\n\
         \x20     proxy_ssl_name {ORIGIN_NAME};\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n",
        nginx_common(dir),
        ca_file.display()
    )
}

pub(super) fn haproxy_config(ca_file: &Path) -> String {
    let ca = ca_file.display();
    format!(
        "global\n\
         \x20 nbthread 1\n\
         \x20 maxconn 4096\n\
         defaults\n\
         \x20 mode http\n\
         \x20 option http-keep-alive\n\
         \x20 timeout connect 5s\n\
         \x20 timeout client 30s\n\
         \x20 timeout server 30s\n\
         \x20 timeout http-keep-alive 30s\n\
         frontend plain\n\
         \x20 bind 127.0.0.1:{HAPROXY_PORT}\n\
         \x20 http-request set-header Authorization \"{AUTHORIZATION}\"\n\
         \x20 default_backend origin\n\
         frontend tls\n\
         \x20 bind 127.0.0.1:{HAPROXY_TLS_PORT}\n\
         \x20 http-request set-header Authorization \"{AUTHORIZATION}\"\n\
         \x20 default_backend origin_tls\n\
         backend origin\n\
         \x20 server s {SERVER_V4}:{ORIGIN_PORT}\n\
         backend origin_tls\n\
         \x20 server s {SERVER_V4}:{ORIGIN_TLS_PORT} ssl verify required ca-file {ca} sni str({ORIGIN_NAME}) verifyhost {ORIGIN_NAME}\n"
    )
}
