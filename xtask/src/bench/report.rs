//! The bench's report: each section's table and the notes under it, as the
//! text printed and written to `target/bench/`. Formatting only: the figures
//! come from the sections.

use ambassador_tests::SERVER_V4;

use super::{
    failover, http, inbound, l4,
    oha::Figures,
    postgres,
    stats::{added, median, quartiles},
    transcode,
};

// Each table names its own section's constants (`use` in the function): the
// sections share names (RATE, SECONDS) with different values.

/// The L4 section's table; `build` says which ambassador build ran.
pub(super) fn l4_table((results, counters): &l4::L4Results, build: &str) -> String {
    use l4::{PARALLEL_EACH, PARALLEL_THREADS, SEQUENTIAL};
    let base = &results[0];
    let mut report = String::new();
    report.push_str(&format!(
        "ambassador bench ({} sequential connects, {}x{} parallel; ratio = mode / direct; throughput: the relay section)\n\n",
        SEQUENTIAL, PARALLEL_THREADS, PARALLEL_EACH
    ));
    report.push_str(&format!(
        "{:<34} {:>10} {:>10} {:>8} {:>12} {:>8}\n",
        "mode", "p50 us", "p99 us", "ratio", "connects/s", "ratio"
    ));
    for (mode, seq, par) in results {
        report.push_str(&format!(
            "{:<34} {:>10.1} {:>10.1} {:>8.2} {:>12.0} {:>8.2}\n",
            mode.name(),
            seq.p50_us,
            seq.p99_us,
            seq.p50_us / base.1.p50_us,
            par.rate,
            par.rate / base.2.rate,
        ));
    }
    report.push_str(&format!(
        "\nconnect = TCP connect + 1-byte echo + close, from the Pod to a server across a veth.\n\
         kernel counters for the eBPF run: redirected {} refused {} passed {}\n\
         {}",
        counters.redirected, counters.refused, counters.passed, build
    ));
    report
}

/// What the HTTP report says besides the numbers.
pub(super) struct HttpNotes {
    pub(super) redirected: u64,
    pub(super) accelerated: u64,
    pub(super) busy_before: String,
    pub(super) busy_after: String,
}

/// The HTTP section's table, the comparison of ambassador with HAProxy and
/// nginx, and the notes.
pub(super) fn http_table(rows: &[http::Row], v: &http::Versions, notes: &HttpNotes) -> String {
    use http::{BODY_BYTES, Bin, CONNECTIONS, ORIGIN_NAME, ROUNDS, Via, cores};
    let base = &rows[0].f;
    let mut r = format!(
        "ambassador HTTP bench (oha {}: keep-alive HTTP/1.1 GET, {BODY_BYTES}-byte body, {CONNECTIONS} connections;\n\
         {}\n\n",
        v.oha,
        rounds_explained(ROUNDS, base.requests)
    );
    r.push_str(&modes_table(rows.iter().map(|x| &x.f)));

    // The one-thread ambassador rows are the ones set against the others.
    let find = |via: Via, tls: bool, bin: Bin| {
        rows.iter().find(|x| {
            x.via == via
                && x.tls == tls
                && !x.cached
                && (via != Via::Ambassador
                    || (x.workers == Some(1) && x.accelerate && x.bin == bin))
        })
    };
    r.push_str(&versus_header("ambassador (1 worker)"));
    for (tls, bin) in [(false, Bin::Main), (true, Bin::Main), (false, Bin::Plain)] {
        let Some(amb) = find(Via::Ambassador, tls, bin) else {
            continue;
        };
        for (via, name) in [(Via::Haproxy, "HAProxy"), (Via::Nginx, "nginx")] {
            let Some(other) = find(via, tls, Bin::Main) else {
                continue;
            };
            let label = format!(
                "{}{} vs {name}",
                if tls { "TLS" } else { "plain" },
                if bin == Bin::Plain {
                    amb.f.label.trim_start_matches("ambassador")
                } else {
                    ""
                }
            );
            r.push_str(&versus(&label, &amb.f, &other.f, base));
        }
    }
    let cached = |via: Via| rows.iter().find(|x| x.via == via && x.cached);
    if let (Some(amb), Some(ngx)) = (cached(Via::Ambassador), cached(Via::Nginx)) {
        r.push_str(&versus(
            "cache hits vs nginx proxy_cache",
            &amb.f,
            &ngx.f,
            base,
        ));
    }
    r.push_str(&format!(
        "\nOrigin: nginx {ngx} (1 worker) on {SERVER_V4} in the servers' namespace, across a veth.\n\
         Each proxy sets Authorization (checked at the origin first) and runs one thread:\n\
         ambassador proxy.workers 1, HAProxy nbthread 1, nginx worker_processes 1 (upstream keepalive 32);\n\
         cache hits: every request after the first answered from the proxy's response cache (the origin\n\
         marks /cached/ public, max-age=3600): ambassador `cache: {{}}` (in memory), nginx proxy_cache\n\
         with its cache directory on tmpfs (/dev/shm); the origin is not in their path.\n\
         The last rows are ambassador with 2 workers, with the app<->proxy hop over loopback TCP\n\
         (intercept.accelerate false, as HAProxy and nginx have it), and (if any) the release build without PGO.\n\
         ambassador: the client runs in the Pod's app cgroup\n\
         and dials the origin; the eBPF redirect takes it to the proxy. HAProxy and nginx listen on\n\
         127.0.0.1 in the Pod's namespace and the client dials them. TLS rows: plain from the client,\n\
         verified TLS (SNI {ORIGIN_NAME}) from the proxy to the origin, which picks http/1.1\n\
         (ambassador offers ALPN [h2, http/1.1], its default); x still to plain direct.\n\
         Client (oha), proxy and origin share the machine's {cores} cores; \"-\": an added latency\n\
         came out at or below 0. CPU us/req = the proxy's\n\
         user+system CPU time per request in the unthrottled run (all its processes and threads).\n\
         Everything runs at nice -10; CPU busy in the second before/after: {} / {} (other work on the machine still adds noise).\n\
         kernel counters for the ambassador runs: redirected {}, accelerated (sk_msg) {}\n",
        notes.busy_before,
        notes.busy_after,
        notes.redirected,
        notes.accelerated,
        ngx = v.nginx,
        cores = cores(),
    ));
    r
}

/// The transcoding section's table: the REST call ambassador transcodes
/// next to the same call made natively, direct and through ambassador.
pub(super) fn transcode_table(
    rows: &[transcode::Row],
    v: &http::Versions,
    notes: &HttpNotes,
) -> String {
    use http::{CONNECTIONS, ROUNDS};
    use transcode::How;
    let base = &rows[0].f;
    let mut r = format!(
        "\nambassador transcoding bench (oha {}: one unary gRPC call, GetBook, {CONNECTIONS} connections;\n\
         {}\n\n",
        v.oha,
        rounds_explained(ROUNDS, base.requests)
    );
    r.push_str(&modes_table(rows.iter().map(|x| &x.f)));
    let find = |how: How| rows.iter().find(|x| x.how == how);
    if let (Some(rest), Some(relayed)) = (find(How::Transcoded), find(How::Relayed)) {
        r.push_str(&versus_header("REST/JSON -> gRPC"));
        r.push_str(&versus(
            "vs gRPC relayed by ambassador",
            &rest.f,
            &relayed.f,
            base,
        ));
    }
    r.push_str(&format!(
        "\nThe server: tonic (the test bookstore, release build), one runtime thread, in the servers'\n\
         namespace. Native rows: oha --http2 POSTs the framed binary request (content-type application/grpc);\n\
         the transcoded row: oha GETs /v1/shelves/s1/books/7 over HTTP/1.1 and gets JSON (the body of the\n\
         request message made of the path, the answer made into canonical proto3 JSON). ambassador: one\n\
         worker, the client in the Pod's app cgroup; x is the ratio to the native call made directly.\n\
         CPU busy in the second before/after: {} / {}.\n",
        notes.busy_before, notes.busy_after
    ));
    r
}

/// The inbound section's table, ambassador set against HAProxy and nginx
/// doing the same job, and the notes.
pub(super) fn inbound_table(
    rows: &[inbound::Row],
    v: &http::Versions,
    notes: &HttpNotes,
) -> String {
    use http::{BODY_BYTES, CONNECTIONS, cores};
    use inbound::{Job, POD_NAME, ROUNDS, Via};
    let base = &rows[0].f;
    let mut r = format!(
        "\nambassador inbound bench: the Pod's gateway (oha {}: keep-alive HTTPS GET with a bearer JWT from a caller\n\
         outside the Pod, {BODY_BYTES}-byte answers from the app in the Pod, {CONNECTIONS} connections;\n\
         {}\n\n",
        v.oha,
        rounds_explained(ROUNDS, base.requests)
    );
    r.push_str(&modes_table(rows.iter().map(|x| &x.f)));
    let find = |via: Via, job: Job, full: bool| {
        rows.iter()
            .find(|x| x.via == via && x.job == job && x.full == full)
    };
    r.push_str(&versus_header("ambassador"));
    for (job, full, name) in [
        (Job::Rs256, false, "JWT RS256"),
        (Job::Rs256, true, "JWT RS256, no memo"),
        (Job::Es256, false, "JWT ES256"),
        (Job::Es256, true, "JWT ES256, no memo"),
        (Job::Tls, false, "TLS only"),
    ] {
        let Some(amb) = find(Via::Ambassador, job, full) else {
            continue;
        };
        for (via, other_name) in [(Via::Haproxy, "HAProxy"), (Via::Nginx, "nginx")] {
            if let Some(other) = find(via, job, false) {
                r.push_str(&versus(
                    &format!("{name} vs {other_name}"),
                    &amb.f,
                    &other.f,
                    base,
                ));
            }
        }
    }
    r.push_str(&format!(
        "\nThe app: nginx {ngx} (1 worker) in the Pod. The caller (oha, rustls) is in the servers' namespace\n\
         and dials the Pod's address ({POD_NAME}, one certificate for every gateway, TLS 1.3 with its default suites).\n\
         ambassador: the sk_lookup program hands the caller's connection to its inbound listener; one worker;\n\
         by default a connection remembers the last token it verified (the same bytes under the same key\n\
         have only exp/nbf checked again; oha sends one token throughout); \"no token memo\" rows verify\n\
         every request's token in full, as HAProxy does.\n\
         HAProxy: nbthread 1, `bind ssl crt`, the token checked with jwt_header_query, jwt_verify (public key PEM)\n\
         and jwt_payload_query for issuer, audience and expiry; nginx: 1 worker, TLS only (open source nginx has\n\
         no JWT check: auth_jwt is NGINX Plus). Every gateway sets X-Forwarded-For, Forwarded and\n\
         X-Forwarded-Proto; the JWT ones replace x-user with the token's sub (all checked before the first run,\n\
         with a forged x-user, no token and an expired one). x and +p50/+p99 are over the app reached directly\n\
         over plain HTTP, so they include TLS. Client, gateway and app share the machine's {cores} cores;\n\
         CPU us/req = the gateway's user+system CPU time per request in the unthrottled run.\n\
         CPU busy in the second before/after: {} / {}. Callers' connections handed over by sk_lookup: {}\n",
        notes.busy_before,
        notes.busy_after,
        notes.redirected,
        ngx = v.nginx,
        cores = cores(),
    ));
    r
}

/// The head of the comparison lines ([`versus`]) of `who` with the others.
fn versus_header(who: &str) -> String {
    format!(
        "\n{who} / other: below 1 = less added latency, above 1 = more req/s or CPU;\n\
         won = rounds in which ambassador's percentile was the lower of the two\n\
         {:<34} {:>6} {:>6} {:>6} {:>6} {:>9} {:>7}\n",
        "", "+p50", "won", "+p99", "won", "max req/s", "CPU/req"
    )
}

/// ambassador's row set against another proxy's doing the same job: added
/// latency (each over `base`, direct), rounds won, max rate and CPU, as
/// ratios.
fn versus(label: &str, amb: &Figures, other: &Figures, base: &Figures) -> String {
    // Added latency can come out ~0 or below in a noisy run; a ratio with
    // that in it means nothing, so it is left out.
    let ratio = |a: f64, b: f64| {
        if a >= 1.0 && b >= 1.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    let median_added =
        |row: &Figures, pick: fn(&Figures) -> &[f64]| quartiles(added(pick(row), pick(base))).1;
    let p50s: fn(&Figures) -> &[f64] = |x| &x.round_p50;
    let p99s: fn(&Figures) -> &[f64] = |x| &x.round_p99;
    let cpu = match (amb.cpu_us, other.cpu_us) {
        (Some((au, asys)), Some((ou, osys))) if ou + osys > 0.0 => {
            format!("{:.2}", (au + asys) / (ou + osys))
        }
        _ => "-".into(),
    };
    let won = |pick: fn(&Figures) -> &[f64]| {
        let rounds = pick(amb).len().min(pick(other).len());
        let won = pick(amb)
            .iter()
            .zip(pick(other))
            .filter(|(a, o)| a < o)
            .count();
        format!("{won}/{rounds}")
    };
    format!(
        "{label:<34} {:>6} {:>6} {:>6} {:>6} {:>9.2} {cpu:>7}\n",
        ratio(median_added(amb, p50s), median_added(other, p50s)),
        won(p50s),
        ratio(median_added(amb, p99s), median_added(other, p99s)),
        won(p99s),
        amb.max_rps / other.max_rps,
    )
}

/// How the HTTP tables' figures were made.
fn rounds_explained(rounds: usize, requests: usize) -> String {
    use super::oha::{FIXED_SECONDS, MAX_SECONDS, RATE, WARM_UP_SECONDS};
    format!(
        "latency at a fixed {RATE} req/s for {FIXED_SECONDS} s (the first {WARM_UP_SECONDS} s left out: the client's start),\n\
         corrected for coordinated omission; max = unthrottled for {MAX_SECONDS} s;\n\
         {rounds} interleaved rounds, every mode once per round; p50/p99 = over all their requests pooled ({requests} per mode);\n\
         +p50/+p99 = added over direct: the median over rounds of (mode - direct in the same round), IQR = its middle half;\n\
         x = pooled mode / pooled direct; max and CPU the median round)"
    )
}

/// One line per mode, the first being direct: percentiles, added latency
/// and rates, each also as a ratio to direct, and the proxy's CPU.
fn modes_table<'a>(mut rows: impl Iterator<Item = &'a Figures>) -> String {
    use http::RATE;
    let Some(base) = rows.next() else {
        return String::new();
    };
    let mut r = format!(
        "{:<34} {:>6} {:>6} {:>5} {:>9} {:>5} {:>9} {:>5} {:>5} {:>9} {:>5} {:>10}\n",
        "mode",
        "p50 us",
        "p99 us",
        "+p50",
        "IQR",
        "+p99",
        "IQR",
        "p50 x",
        "p99 x",
        "max req/s",
        "max x",
        "CPU us/req"
    );
    let spread = |(lo, _, hi): (f64, f64, f64)| format!("{lo:.0}..{hi:.0}");
    for row in std::iter::once(base).chain(rows) {
        // A mode that fell behind the fixed rate has latencies that mean
        // "saturated", not "slow": say so.
        let held = if row.fixed_rps < f64::from(RATE) * 0.95 {
            format!("  (held only {:.0} req/s)", row.fixed_rps)
        } else {
            String::new()
        };
        let cpu = row
            .cpu_us
            .map_or(String::new(), |(u, s)| format!("{u:.1}+{s:.1}"));
        let (a50, a99) = (
            quartiles(added(&row.round_p50, &base.round_p50)),
            quartiles(added(&row.round_p99, &base.round_p99)),
        );
        r.push_str(&format!(
            "{:<34} {:>6.0} {:>6.0} {:>5.0} {:>9} {:>5.0} {:>9} {:>5.2} {:>5.2} {:>9.0} {:>5.2} {cpu:>10}{held}\n",
            row.label,
            row.p50_us,
            row.p99_us,
            a50.1,
            spread(a50),
            a99.1,
            spread(a99),
            row.p50_us / base.p50_us,
            row.p99_us / base.p99_us,
            row.max_rps,
            row.max_rps / base.max_rps,
        ));
    }
    r
}

/// The PostgreSQL section's table: each path's pgbench runs, persistent
/// connections, `-C` and `-M prepared` (a run that could not be done shows
/// why).
pub(super) fn postgres_table(rows: &[postgres::Row]) -> String {
    use postgres::{CLIENTS, LOADS, ROUNDS, SECONDS, Via};
    let mut r = format!(
        "\npostgres bench (pgbench -S select-only, scale 1, {CLIENTS} clients, {SECONDS} s per run, \
         {ROUNDS} rounds interleaved; server PostgreSQL with TLS + SCRAM required; tps and latency: \
         medians over rounds; ratio = the median of each round's tps / direct's in that round)\n\n"
    );
    r.push_str(&format!("{:<40}", "path"));
    for load in LOADS {
        r.push_str(&format!(
            " {:>16} {:>6} {:>7}",
            format!("tps {}", load.flags().trim_start_matches("-M ")),
            "ratio",
            "lat ms"
        ));
    }
    r.push('\n');
    let get = |via: Via, load: postgres::Load| {
        rows.iter()
            .find(|(v, l, _)| *v == via && *l == load)
            .map(|(_, _, r)| r)
            .expect("every run recorded")
    };
    let tps = |runs: &[postgres::Run]| runs.iter().map(|x| x.tps).collect::<Vec<f64>>();
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y));
    let mut notes = Vec::new();
    for via in [Via::Direct, Via::Ambassador, Via::PgBouncer] {
        r.push_str(&format!("{:<40}", via.name()));
        for load in LOADS {
            match (get(via, load), get(Via::Direct, load)) {
                (Ok(runs), base) => {
                    let ratio = match base {
                        Ok(b) => paired(&tps(runs), &tps(b)),
                        Err(_) => f64::NAN,
                    };
                    r.push_str(&format!(
                        " {:>16.0} {:>6.2} {:>7.3}",
                        median(runs.iter().map(|x| x.tps)),
                        ratio,
                        median(runs.iter().map(|x| x.latency_ms))
                    ))
                }
                (Err(e), _) => {
                    r.push_str(&format!(" {:>16} {:>6} {:>7}", "fails", "-", "-"));
                    notes.push(format!("{} {}: {e}", via.name(), load.flags()));
                }
            }
        }
        r.push('\n');
    }
    r.push('\n');
    for load in LOADS {
        if let (Ok(a), Ok(b)) = (get(Via::Ambassador, load), get(Via::PgBouncer, load)) {
            let ahead = a.iter().zip(b).filter(|(x, y)| x.tps > y.tps).count();
            let cpu = |runs: &[postgres::Run]| median(runs.iter().map(|x| x.cpu_us));
            r.push_str(&format!(
                "ambassador / PgBouncer {}: {:.2}x tps paired by round (ahead in {ahead}/{} rounds), CPU per transaction {:.1} vs {:.1} us; each round: {}\n",
                load.flags(),
                paired(&tps(a), &tps(b)),
                a.len(),
                cpu(a),
                cpu(b),
                a.iter()
                    .zip(b)
                    .map(|(x, y)| format!("{:.0}/{:.0}", x.tps, y.tps))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    let failed: u64 = rows
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .flatten()
        .map(|r| r.failed)
        .sum();
    r.push_str(&format!(
        "\n-C = a new connection per transaction. The ambassador and PgBouncer keep their TLS+SCRAM \
         server connections;\ndirect -C pays a TLS handshake and SCRAM per transaction. Both run one thread (ambassador \
         proxy.workers 1) without connection logs. -M prepared: named statements; the ambassador \
         prepares them once per pooled server connection.\nFailed transactions: {failed}.\n"
    ));
    for n in notes {
        r.push_str(&format!("{n}\n"));
    }
    r
}

/// The failover table: the steady run, the run with an endpoint killed and
/// restarted, and how many requests the restarted endpoint served (`back`).
pub(super) fn failover_table(steady: &failover::Run, chaos: &failover::Run, back: usize) -> String {
    use failover::{BACK_AT, KILL_AT, RATE, SECONDS};
    let mut r = format!(
        "\nambassador failover bench (oha: GET at a fixed {RATE} req/s for {SECONDS} s, latency-corrected;\n\
         a service with two endpoints; in the second run one is killed at {} s and restarted at {} s)\n\n",
        KILL_AT.as_secs(),
        BACK_AT.as_secs()
    );
    r.push_str(&format!(
        "{:<36} {:>8} {:>8} {:>9} {:>9} {:>8}\n",
        "run", "p50 ms", "p99 ms", "p99.9 ms", "requests", "failed"
    ));
    for (name, x) in [("steady", steady), ("endpoint killed and restarted", chaos)] {
        r.push_str(&format!(
            "{:<36} {:>8.2} {:>8.2} {:>9.2} {:>9} {:>7.3}%\n",
            name,
            x.p50_ms,
            x.p99_ms,
            x.p999_ms,
            x.requests,
            100.0 * x.failed as f64 / x.requests.max(1) as f64
        ));
    }
    r.push_str(&format!(
        "ratio (killed / steady): p99 {:.2}, p99.9 {:.2}; the restarted endpoint served {back} requests again\n",
        chaos.p99_ms / steady.p99_ms,
        chaos.p999_ms / steady.p999_ms
    ));
    r
}
