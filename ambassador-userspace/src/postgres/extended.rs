//! The app's messages in transaction pooling, one at a time: named
//! statements renamed to the service's server-side names (Parse, Bind,
//! Describe, Close), prepared first on a server connection that lacks them,
//! answered in the server's place where nothing needs sending (a Parse of a
//! statement the connection has, a Close of the app's name), and the SQL
//! that would break this (`PREPARE`, `EXECUTE`, `DEALLOCATE` by name) refused
//! with the reason. Every message sent records the answer it is owed
//! ([`Expected`]), so answers reach the app in its own order.

use std::{collections::HashMap, sync::Arc};

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;

use super::{
    error::PgError,
    expect::{Action, Answer, Expected, Undo},
    protocol::{self, Peeked, Severity},
    statements::{Ensure, Prepared, Registry, ServerStatements},
};

/// A named Parse is read whole; a bigger one is refused.
const MAX_PARSE: usize = 16 << 20;
/// Names of a Bind, Describe or Close must be within this of its start.
const MAX_NAMES: usize = 64 << 10;
/// How much of a Query is looked at before it is streamed on.
const QUERY_PEEK: usize = 512;

const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// How prepared statements went, for metrics.
#[derive(Clone)]
pub struct Counters {
    pub prepared: Counter,
    pub reused: Counter,
    pub evicted: Counter,
}

/// What became of one app message.
#[derive(Debug, PartialEq, Eq)]
pub enum Took {
    /// Needs more of it first.
    More,
    /// On its way: `left` bytes of it still to stream as they are; `ready`
    /// when a ReadyForQuery will answer it.
    Sent { left: usize, ready: bool },
    /// Answered here; nothing went to the server.
    Answered,
}

/// One session's named statements and the answers it is owed.
pub struct Named {
    /// The app's names (without the NUL).
    statements: HashMap<Bytes, Arc<Prepared>>,
    pub expected: Expected,
    /// Statements a server connection keeps.
    cap: usize,
    counters: Counters,
}

/// Where one message goes.
pub struct Sides<'a> {
    pub from_app: &'a mut BytesMut,
    pub to_server: &'a mut BytesMut,
    pub server: &'a mut ServerStatements,
    pub registry: &'a Registry,
    /// The last ReadyForQuery status the app saw.
    pub status: u8,
}

impl Named {
    pub fn new(cap: usize, counters: Counters) -> Named {
        Named {
            statements: HashMap::new(),
            expected: Expected::default(),
            cap,
            counters,
        }
    }

    /// The message at the front of `from_app`, its header peeked as `m`.
    pub fn take(&mut self, m: Peeked, s: &mut Sides<'_>) -> Result<Took, PgError> {
        match m.tag {
            b'P' => self.parse(m, s),
            b'B' => self.bind(m, s),
            b'D' | b'C' => self.describe_or_close(m, s),
            b'Q' => self.query(m, s),
            b'E' => Ok(self.pass(m, Some(Answer::Rows), false)),
            b'S' => Ok(self.pass(m, Some(Answer::Sync), true)),
            b'F' => Ok(self.pass(m, Some(Answer::Ready), true)),
            // Flush, COPY data from the app, and anything else: no answer of its own.
            _ => Ok(self.pass(m, None, false)),
        }
    }

    /// A statement failed or never ran: it does not exist for the app.
    pub fn undo(&mut self, undo: &Undo, server: Option<&mut ServerStatements>) {
        if let (Some(id), Some(server)) = (undo.prepared, server) {
            server.forget(id);
        }
        if let Some(name) = &undo.statement {
            self.statements.remove(name);
        }
    }

    fn pass(&mut self, m: Peeked, answer: Option<Answer>, ready: bool) -> Took {
        if let Some(a) = answer {
            self.expected.push(a, Action::Pass, Undo::default());
        }
        Took::Sent { left: m.len, ready }
    }

    fn parse(&mut self, m: Peeked, s: &mut Sides<'_>) -> Result<Took, PgError> {
        match m.first_body_byte {
            None if m.len > 5 => return Ok(Took::More),
            None | Some(0) => return Ok(self.pass(m, Some(Answer::One), false)),
            Some(_) => {}
        }
        if m.len > MAX_PARSE {
            return Err(PgError::Unsupported(format!(
                "a named prepared statement of {} bytes: over the ambassador's 16 MiB",
                m.len
            )));
        }
        if s.from_app.len() < m.len {
            return Ok(Took::More);
        }
        let msg = s.from_app.split_to(m.len).freeze();
        let Some((name, rest)) = split_name(&msg[5..]) else {
            return Err(bad("a Parse without its name's end"));
        };
        let p = s.registry.get(rest);
        let name = msg.slice_ref(name);
        self.statements.insert(name.clone(), p.clone());
        let undo = Undo {
            prepared: None,
            statement: Some(name),
        };
        if self.ensure(&p, s, undo) {
            Ok(Took::Sent {
                left: 0,
                ready: false,
            })
        } else {
            Ok(Took::Answered)
        }
    }

    /// Makes `p` usable on the server connection: prepared there (after
    /// closing its least recently used when full) with its answer dropped,
    /// or, when the app's own Parse is what asks (`parse_undo`), with its
    /// answer passed, or answered here if the connection has it. True when
    /// something was sent.
    fn ensure(&mut self, p: &Arc<Prepared>, s: &mut Sides<'_>, parse_undo: Undo) -> bool {
        let apps_parse = parse_undo.statement.is_some();
        match s.server.ensure(p, self.cap) {
            Ensure::Present => {
                self.counters.reused.inc();
                if apps_parse {
                    self.expected.push(
                        Answer::One,
                        Action::Answer(Bytes::from_static(PARSE_COMPLETE)),
                        parse_undo,
                    );
                }
                false
            }
            Ensure::Prepare { evict } => {
                if let Some(old) = evict {
                    self.counters.evicted.inc();
                    let name = format!("amb_{old}\0");
                    protocol::named_message(s.to_server, b'C', Some(b'S'), name.as_bytes(), b"");
                    self.expected
                        .push(Answer::One, Action::Drop, Undo::default());
                }
                self.counters.prepared.inc();
                protocol::named_message(s.to_server, b'P', None, &p.name, &p.body);
                let action = if apps_parse {
                    Action::Pass
                } else {
                    Action::Drop
                };
                let undo = Undo {
                    prepared: Some(p.id),
                    ..parse_undo
                };
                self.expected.push(Answer::One, action, undo);
                true
            }
        }
    }

    fn bind(&mut self, m: Peeked, s: &mut Sides<'_>) -> Result<Took, PgError> {
        let seen = &s.from_app[5..m.len.min(s.from_app.len())];
        let Some((portal, rest)) = split_name(seen) else {
            return more_or_bad(m, s, "a Bind without its portal name's end");
        };
        let Some((stmt, _)) = split_name(rest) else {
            return more_or_bad(m, s, "a Bind without its statement name's end");
        };
        let Some(p) = self.statements.get(stmt).cloned() else {
            // Unnamed, or a name the app never prepared: the server decides.
            return Ok(self.pass(m, Some(Answer::One), false));
        };
        let (portal_len, stmt_len) = (portal.len(), stmt.len());
        self.ensure(&p, s, Undo::default());
        let consumed = 5 + portal_len + 1 + stmt_len + 1;
        let left = m.len - consumed;
        let len = 4 + portal_len + 1 + p.name.len() + left;
        let head = s.from_app.split_to(consumed);
        s.to_server.extend_from_slice(b"B");
        s.to_server.extend_from_slice(&(len as i32).to_be_bytes());
        s.to_server.extend_from_slice(&head[5..5 + portal_len + 1]);
        s.to_server.extend_from_slice(&p.name);
        self.expected
            .push(Answer::One, Action::Pass, Undo::default());
        Ok(Took::Sent { left, ready: false })
    }

    fn describe_or_close(&mut self, m: Peeked, s: &mut Sides<'_>) -> Result<Took, PgError> {
        let describe = m.tag == b'D';
        let answer = if describe && m.first_body_byte == Some(b'S') {
            Answer::Two
        } else {
            Answer::One
        };
        if m.len < 7 {
            // Too short to name anything: the server says what is wrong.
            return Ok(self.pass(m, Some(answer), false));
        }
        if m.len > MAX_NAMES {
            return Err(bad("a Describe or Close over 64 KiB"));
        }
        if s.from_app.len() < m.len {
            return Ok(Took::More);
        }
        let named = match (m.first_body_byte, split_name(&s.from_app[6..m.len])) {
            (Some(b'S'), Some((name, _))) => self
                .statements
                .get_key_value(name)
                .map(|(k, p)| (k.clone(), p.clone())),
            _ => None,
        };
        let Some((app_name, p)) = named else {
            return Ok(self.pass(m, Some(answer), false));
        };
        if !describe {
            // The app's name goes; the server keeps the statement for others.
            s.from_app.advance(m.len);
            self.statements.remove(&app_name);
            self.expected.push(
                Answer::One,
                Action::Answer(Bytes::from_static(CLOSE_COMPLETE)),
                Undo::default(),
            );
            return Ok(Took::Answered);
        }
        s.from_app.advance(m.len);
        self.ensure(&p, s, Undo::default());
        protocol::named_message(s.to_server, b'D', Some(b'S'), &p.name, b"");
        self.expected
            .push(Answer::Two, Action::Pass, Undo::default());
        Ok(Took::Sent {
            left: 0,
            ready: false,
        })
    }

    fn query(&mut self, m: Peeked, s: &mut Sides<'_>) -> Result<Took, PgError> {
        let peek = m.len.min(5 + QUERY_PEEK);
        if s.from_app.len() < peek {
            return Ok(Took::More);
        }
        // Every query passes here: decided on its first word, without a copy,
        // unless that word is one of the four this handles.
        if !ours(first_word(&s.from_app[5..peek])) {
            return Ok(self.pass(m, Some(Answer::Ready), true));
        }
        if s.from_app.len() < m.len {
            return Ok(Took::More);
        }
        let text = String::from_utf8_lossy(&s.from_app[5..peek]).to_ascii_lowercase();
        let words: Vec<&str> = text
            .trim_end_matches(['\0', ';', ' ', '\n', '\t', '\r'])
            .split_whitespace()
            .collect();
        let reply = match words.as_slice() {
            ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
                self.statements.clear();
                Some(Ok("DEALLOCATE ALL"))
            }
            ["deallocate", name] | ["deallocate", "prepare", name] => {
                // What drivers send as their own caches rotate (psycopg).
                let original = &s.from_app[5..peek];
                Some(self.deallocate(sql_name(name, original)))
            }
            ["discard", "all"] if matches!(s.status, b'T' | b'E') => Some(Err((
                "25001",
                "DISCARD ALL cannot run inside a transaction block".to_string(),
            ))),
            ["discard", "all"] => {
                self.statements.clear();
                Some(Ok("DISCARD ALL"))
            }
            [w, ..] if matches!(*w, "prepare" | "execute" | "deallocate") => Some(Err((
                "0A000",
                format!(
                    "ambassador: SQL {} is not supported in transaction pooling (server connections change \
                     between transactions); use the protocol's prepared statements (your driver's), \
                     or postgres.pool.mode: session",
                    w.to_ascii_uppercase()
                ),
            ))),
            _ => None,
        };
        let Some(reply) = reply else {
            return Ok(self.pass(m, Some(Answer::Ready), true));
        };
        s.from_app.advance(m.len);
        let mut out = BytesMut::new();
        // The app's statements are gone for it; the server keeps its own,
        // which other sessions may share.
        let status = match reply {
            Ok(tag) => {
                protocol::command_complete(&mut out, tag);
                s.status
            }
            Err((code, msg)) => {
                protocol::error_response(&mut out, Severity::Error, code, &msg);
                if s.status == b'I' { b'I' } else { b'E' }
            }
        };
        protocol::ready_for_query(&mut out, status);
        self.expected
            .push(Answer::Ready, Action::Answer(out.freeze()), Undo::default());
        Ok(Took::Answered)
    }
}

impl Named {
    /// `DEALLOCATE name` of the app's: the name goes (the server keeps the
    /// statement), or the error PostgreSQL gives for a name it lacks.
    fn deallocate(&mut self, name: Vec<u8>) -> Result<&'static str, (&'static str, String)> {
        match self.statements.remove(&name[..]) {
            Some(_) => Ok("DEALLOCATE"),
            None => Err((
                "26000",
                format!(
                    "prepared statement \"{}\" does not exist",
                    String::from_utf8_lossy(&name)
                ),
            )),
        }
    }
}

/// The first word of a query's text (up to whitespace, `;` or its NUL).
fn first_word(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let rest = &text[start..];
    let len = rest
        .iter()
        .position(|b| b.is_ascii_whitespace() || matches!(b, b';' | 0))
        .unwrap_or(rest.len());
    &rest[..len]
}

/// Whether a query starting with `word` is one transaction pooling handles.
fn ours(word: &[u8]) -> bool {
    ["prepare", "execute", "deallocate", "discard"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

/// A statement name as SQL writes it: folded to lower case unless quoted.
fn sql_name(lowered: &str, original: &[u8]) -> Vec<u8> {
    let word = lowered.trim_matches('"');
    if !lowered.starts_with('"') {
        return word.as_bytes().to_vec();
    }
    // Quoted: the original spelling, between the quotes.
    let text = String::from_utf8_lossy(original);
    let start = text.find('"').map_or(0, |i| i + 1);
    let end = text[start..].find('"').map_or(text.len(), |i| start + i);
    text[start..end].as_bytes().to_vec()
}

/// A NUL-terminated name at the start of `b`, and what follows the NUL.
fn split_name(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

fn more_or_bad(m: Peeked, s: &Sides<'_>, what: &str) -> Result<Took, PgError> {
    if s.from_app.len() >= m.len || s.from_app.len() > MAX_NAMES {
        Err(bad(what))
    } else {
        Ok(Took::More)
    }
}

fn bad(what: &str) -> PgError {
    PgError::AppProtocol(protocol::invalid(what))
}

#[cfg(test)]
#[path = "extended_tests.rs"]
mod tests;
