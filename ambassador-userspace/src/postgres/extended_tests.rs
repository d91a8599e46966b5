//! The app's messages in transaction pooling, without sockets: what goes to
//! the server and what the app gets back, for a scripted server.

use bytes::BufMut;
use postgres_protocol::{IsNull, message::frontend};

use super::*;

/// One session against one server connection.
struct World {
    named: Named,
    server: ServerStatements,
    registry: Registry,
    from_app: BytesMut,
    to_server: BytesMut,
    to_app: BytesMut,
}

impl World {
    fn new(cap: usize) -> World {
        World {
            named: Named::new(
                cap,
                Counters {
                    prepared: Counter::default(),
                    reused: Counter::default(),
                    evicted: Counter::default(),
                },
            ),
            server: ServerStatements::default(),
            registry: Registry::default(),
            from_app: BytesMut::new(),
            to_server: BytesMut::new(),
            to_app: BytesMut::new(),
        }
    }

    /// A new session (another app connection) on the same server.
    fn next_session(self) -> World {
        World {
            named: Named::new(self.named.cap, self.named.counters),
            ..self
        }
    }

    /// The message at the front of what the app sent, taken.
    fn take_front(&mut self) -> Took {
        let m = protocol::peek(&self.from_app).unwrap().unwrap();
        self.named
            .take(
                m,
                &mut Sides {
                    from_app: &mut self.from_app,
                    to_server: &mut self.to_server,
                    server: &mut self.server,
                    registry: &self.registry,
                    status: b'I',
                },
            )
            .unwrap()
    }

    /// The app sends `msg`; returns how it was taken.
    fn app(&mut self, msg: &BytesMut) -> Took {
        self.from_app.extend_from_slice(msg);
        let took = self.take_front();
        match took {
            Took::Sent { left, .. } => {
                let rest = self.from_app.split_to(left);
                self.to_server.extend_from_slice(&rest);
            }
            Took::Answered => self.named.expected.answer_due(&mut self.to_app),
            Took::More => panic!("a whole message was not enough"),
        }
        assert!(self.from_app.is_empty());
        took
    }

    /// The messages the server got since the last look: (tag, name).
    fn sent(&mut self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut b = self.to_server.split();
        while let Some((tag, len)) = protocol::frame(&b).unwrap() {
            let msg = b.split_to(len);
            let body = &msg[5..];
            let name = match tag {
                b'P' | b'Q' => body,
                b'B' => {
                    let portal_end = body.iter().position(|&c| c == 0).unwrap();
                    &body[portal_end + 1..]
                }
                b'D' | b'C' => &body[1..],
                _ => &body[..0],
            };
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            out.push((tag, String::from_utf8_lossy(&name[..end]).into_owned()));
        }
        out
    }

    /// The server answers with these tags; returns the tags the app got.
    fn server(&mut self, tags: &[u8]) -> Vec<u8> {
        for &t in tags {
            let mut undone = Vec::new();
            if self.named.expected.on_server(t, &mut undone) == Verdict::Pass {
                self.to_app.put_u8(t);
                self.to_app.put_i32(4);
            }
            for u in &undone {
                self.named.undo(u, Some(&mut self.server));
            }
            self.named.expected.answer_due(&mut self.to_app);
        }
        self.app_got()
    }

    fn app_got(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = self.to_app.split();
        while let Some((tag, len)) = protocol::frame(&b).unwrap() {
            out.push(tag);
            b.advance(len);
        }
        out
    }
}

use crate::postgres::expect::Verdict;

fn parse(name: &str, q: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::parse(name, q, [23], &mut b).unwrap();
    b
}

fn bind(stmt: &str, value: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::bind(
        "",
        stmt,
        [1],
        [value],
        |v, buf| {
            buf.put_slice(v);
            Ok(IsNull::No)
        },
        [1],
        &mut b,
    )
    .map_err(|_| ())
    .unwrap();
    b
}

fn simple(f: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::new();
    f(&mut b);
    b
}

fn execute() -> BytesMut {
    simple(|b| frontend::execute("", 0, b).unwrap())
}

fn sync() -> BytesMut {
    simple(frontend::sync)
}

#[test]
fn a_statement_is_renamed_and_prepared_once_per_server_connection() {
    let mut w = World::new(10);
    w.app(&parse("s1", "select $1"));
    w.app(&bind("s1", b"\0\0\0\x07"));
    w.app(&execute());
    w.app(&sync());
    let name = w.sent()[0].1.clone();
    assert!(name.starts_with("amb_"), "{name}");
    assert_eq!(w.sent(), [], "sent() drains; the first call saw everything");
    assert_eq!(w.server(b"12DCZ"), b"12DCZ");

    // Another session, the same text: the server has it, nothing is prepared.
    let mut w = w.next_session();
    assert_eq!(w.app(&parse("other", "select $1")), Took::Answered);
    assert_eq!(w.app_got(), b"1", "ParseComplete from the ambassador");
    w.app(&bind("other", b"\0\0\0\x08"));
    w.app(&execute());
    w.app(&sync());
    assert_eq!(
        w.sent(),
        [
            (b'B', name.clone()),
            (b'E', String::new()),
            (b'S', String::new())
        ]
    );
    assert_eq!(w.server(b"2DCZ"), b"2DCZ");
}

#[test]
fn a_bind_on_a_connection_without_the_statement_prepares_it_first() {
    let mut w = World::new(10);
    w.app(&parse("s1", "select $1"));
    w.app(&sync());
    w.sent();
    assert_eq!(w.server(b"1Z"), b"1Z");
    // The next transaction lands on a fresh server connection.
    w.server = ServerStatements::default();
    w.app(&bind("s1", b"\0\0\0\x07"));
    w.app(&execute());
    w.app(&sync());
    let sent = w.sent();
    assert_eq!(sent[0].0, b'P', "{sent:?}");
    assert_eq!(sent[1], (b'B', sent[0].1.clone()));
    // Its ParseComplete is not the app's: dropped.
    assert_eq!(w.server(b"12DCZ"), b"2DCZ");
}

#[test]
fn an_unnamed_statement_and_an_unknown_name_pass_unchanged() {
    let mut w = World::new(10);
    w.app(&parse("", "select 1"));
    w.app(&bind("", b"x"));
    w.app(&bind("never_prepared", b"x"));
    w.app(&sync());
    assert_eq!(
        w.sent(),
        [
            (b'P', String::new()),
            (b'B', String::new()),
            (b'B', "never_prepared".into()),
            (b'S', String::new())
        ]
    );
    assert_eq!(w.server(b"12EZ"), b"12EZ");
}

#[test]
fn close_is_answered_here_and_the_name_is_gone_for_the_app() {
    let mut w = World::new(10);
    w.app(&parse("s1", "select 1"));
    w.app(&simple(|b| frontend::close(b'S', "s1", b).unwrap()));
    w.app(&sync());
    let sent = w.sent();
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), b"PS");
    // ParseComplete (the server's), CloseComplete (ours, in its turn), Ready.
    assert_eq!(w.server(b"1Z"), b"13Z");
    // Bound again by that name: the server decides (it knows no such name).
    w.app(&bind("s1", b"x"));
    assert_eq!(w.sent(), [(b'B', "s1".into())]);
}

#[test]
fn a_full_connection_closes_its_least_recently_used_statement() {
    let mut w = World::new(1);
    w.app(&parse("a", "select 1"));
    w.app(&parse("b", "select 2"));
    w.app(&sync());
    let sent = w.sent();
    let first = sent[0].1.clone();
    assert_eq!(sent[1], (b'C', first.clone()), "{sent:?}");
    assert_eq!(sent[2].0, b'P');
    // The Close's answer is ours.
    assert_eq!(w.server(b"131Z"), b"11Z");
    // `a` is used again: prepared again, `b` closed.
    w.app(&bind("a", b"x"));
    let sent = w.sent();
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        b"CPB",
        "{sent:?}"
    );
    assert_eq!(sent[1].1, first);
}

#[test]
fn a_failed_parse_takes_its_name_and_what_the_server_skipped_back() {
    let mut w = World::new(10);
    w.app(&parse("bad", "selec 1"));
    w.app(&bind("bad", b"x"));
    w.app(&execute());
    w.app(&sync());
    w.sent();
    // The server refuses the Parse and skips to the Sync.
    assert_eq!(w.server(b"EZ"), b"EZ");
    assert_eq!(w.server.len(), 0, "nothing is prepared there");
    w.app(&bind("bad", b"x"));
    assert_eq!(
        w.sent(),
        [(b'B', "bad".into())],
        "no such statement for the app"
    );
}

#[test]
fn sql_that_would_break_pooling_is_refused_and_deallocate_all_forgets() {
    let mut w = World::new(10);
    for q in ["PREPARE p AS select 1", "  execute p", "deallocate p;"] {
        assert_eq!(
            w.app(&simple(|b| frontend::query(q, b).unwrap())),
            Took::Answered
        );
        assert_eq!(w.app_got(), b"EZ", "{q}");
    }
    w.app(&parse("s1", "select 1"));
    w.sent();
    w.server(b"1");
    assert_eq!(
        w.app(&simple(|b| frontend::query("DEALLOCATE ALL;", b).unwrap())),
        Took::Answered
    );
    assert_eq!(w.app_got(), b"CZ");
    assert!(w.sent().is_empty(), "the server keeps its statements");
    w.app(&bind("s1", b"x"));
    assert_eq!(w.sent(), [(b'B', "s1".into())]);
    // Any other query passes.
    w.app(&simple(|b| frontend::query("select 'prepare'", b).unwrap()));
    assert_eq!(w.sent()[0].0, b'Q');
}

#[test]
fn a_big_bind_is_renamed_at_its_head_and_streamed() {
    let mut w = World::new(10);
    w.app(&parse("s1", "select $1"));
    w.sent();
    let value = vec![7u8; 1 << 20];
    let msg = bind("s1", &value);
    w.from_app.extend_from_slice(&msg[..64]);
    let took = w.take_front();
    let Took::Sent { left, .. } = took else {
        panic!("{took:?}")
    };
    // The head went with the new name; the rest follows as it comes.
    let consumed = 64 - w.from_app.len();
    assert_eq!(left, msg.len() - consumed);
    let rest = w.from_app.split();
    w.to_server.extend_from_slice(&rest);
    w.to_server.extend_from_slice(&msg[64..]);
    let (tag, len) = protocol::frame(&w.to_server).unwrap().unwrap();
    assert_eq!((tag, len), (b'B', w.to_server.len()));
}
