//! What the server owes for each message sent to it, in order, and what to
//! do with each answer: pass it to the app, drop it (the answer to a message
//! the ambassador added, such as a Parse of a statement the server
//! connection lacked), or answer in the server's place at that point in the
//! stream (a ParseComplete for a statement the server already has). Needed
//! once the ambassador changes what the app sends (named statements in
//! transaction pooling); the order of answers is the app's whole contract.

use std::collections::VecDeque;

use bytes::Bytes;

/// How a message's answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// One message (Parse, Bind, Close, Describe of a portal).
    One,
    /// ParameterDescription, then RowDescription or NoData (Describe of a
    /// statement).
    Two,
    /// Rows (or COPY data) until CommandComplete, EmptyQueryResponse or
    /// PortalSuspended (Execute).
    Rows,
    /// Until ReadyForQuery (Query, FunctionCall): errors included.
    Ready,
    /// Until ReadyForQuery, and where an error's skipping stops (Sync).
    Sync,
}

/// What to do with the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pass,
    /// Ours: the app did not ask (an error still goes to the app: its next
    /// message depended on this one).
    Drop,
    /// Not sent: these bytes are the answer, given when its turn comes.
    Answer(Bytes),
}

/// What to undo when the server never ran a message, or refused it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Undo {
    /// A statement id marked prepared on the server connection.
    pub prepared: Option<u64>,
    /// The app's name for a statement its Parse made (it does not exist
    /// when the Parse failed).
    pub statement: Option<Bytes>,
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    action: Action,
    undo: Undo,
    /// Messages of a `Two` answer seen.
    seen: u8,
}

/// The queue of answers owed, oldest first.
#[derive(Debug, Default)]
pub struct Expected {
    q: VecDeque<Entry>,
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

impl Expected {
    pub fn push(&mut self, answer: Answer, action: Action, undo: Undo) {
        self.q.push_back(Entry {
            answer,
            action,
            undo,
            seen: 0,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Answers given in the server's place that are now due, into `out`.
    pub fn answer_due(&mut self, out: &mut bytes::BytesMut) {
        while let Some(Entry {
            action: Action::Answer(b),
            ..
        }) = self.q.front()
        {
            out.extend_from_slice(b);
            self.q.pop_front();
        }
    }

    /// One server message by its tag: pass or drop it; `undone` gets what
    /// the server did not do after all.
    pub fn on_server(&mut self, tag: u8, undone: &mut Vec<Undo>) -> Verdict {
        // Asynchronous (notices, parameter changes, notifications) and COPY
        // traffic belong to no answer's end.
        if matches!(tag, b'N' | b'S' | b'A' | b'G' | b'H' | b'W' | b'd' | b'c') {
            return Verdict::Pass;
        }
        let Some(head) = self.q.front_mut() else {
            return Verdict::Pass;
        };
        let verdict = match head.action {
            Action::Drop if tag != b'E' => Verdict::Drop,
            _ => Verdict::Pass,
        };
        let done = match (head.answer, tag) {
            (Answer::Ready | Answer::Sync, b'Z') => true,
            (Answer::Ready | Answer::Sync, _) => false,
            (_, b'E') => {
                self.failed(undone);
                return verdict;
            }
            (Answer::One, _) => true,
            (Answer::Two, _) => {
                head.seen += 1;
                head.seen == 2
            }
            (Answer::Rows, t) => matches!(t, b'C' | b'I' | b's'),
        };
        if done {
            self.q.pop_front();
        }
        verdict
    }

    /// The head message failed: the server skips everything up to the next
    /// Sync, so those answers never come (answers of ours among them are
    /// not given either, as the server would not have).
    fn failed(&mut self, undone: &mut Vec<Undo>) {
        while let Some(e) = self.q.front() {
            if e.answer == Answer::Sync {
                break;
            }
            undone.push(e.undo.clone());
            self.q.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(q: &mut Expected, tags: &[u8]) -> (Vec<(u8, Verdict)>, Vec<Undo>) {
        let mut undone = Vec::new();
        let v = tags
            .iter()
            .map(|t| (*t, q.on_server(*t, &mut undone)))
            .collect();
        (v, undone)
    }

    #[test]
    fn an_added_parse_is_dropped_and_the_apps_answers_pass_in_order() {
        let mut q = Expected::default();
        let ours = Undo {
            prepared: Some(7),
            statement: None,
        };
        q.push(Answer::One, Action::Drop, ours); // our Parse
        q.push(Answer::One, Action::Pass, Undo::default()); // Bind
        q.push(Answer::Rows, Action::Pass, Undo::default()); // Execute
        q.push(Answer::Sync, Action::Pass, Undo::default());
        let (v, undone) = run(&mut q, b"12DDCZ");
        let verdicts: Vec<Verdict> = v.into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Drop,
                Verdict::Pass,
                Verdict::Pass,
                Verdict::Pass,
                Verdict::Pass,
                Verdict::Pass
            ]
        );
        assert!(undone.is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn an_answer_of_ours_is_given_in_its_turn() {
        let mut q = Expected::default();
        let mut out = bytes::BytesMut::new();
        q.push(Answer::One, Action::Pass, Undo::default()); // the app's Bind, sent
        q.push(
            Answer::One,
            Action::Answer(Bytes::from_static(b"1\0\0\0\x04")),
            Undo::default(),
        );
        q.answer_due(&mut out);
        assert!(out.is_empty(), "not before the Bind's answer");
        run(&mut q, b"2");
        q.answer_due(&mut out);
        assert_eq!(&out[..], b"1\0\0\0\x04");
        assert!(q.is_empty());
    }

    fn ours(id: u64) -> Undo {
        Undo {
            prepared: Some(id),
            statement: None,
        }
    }

    #[test]
    fn an_error_skips_to_sync_and_undoes_what_never_ran() {
        let mut q = Expected::default();
        let mut out = bytes::BytesMut::new();
        q.push(Answer::One, Action::Drop, ours(1)); // our Parse: fails
        q.push(Answer::One, Action::Pass, Undo::default()); // Bind: skipped
        q.push(Answer::Two, Action::Pass, Undo::default()); // Describe: skipped
        q.push(
            Answer::One,
            Action::Answer(Bytes::from_static(b"3\0\0\0\x04")),
            Undo::default(),
        ); // a Close we answer: skipped too
        q.push(Answer::One, Action::Drop, ours(2)); // never ran
        q.push(Answer::Sync, Action::Pass, Undo::default());
        let (v, undone) = run(&mut q, b"E");
        assert_eq!(v, [(b'E', Verdict::Pass)], "the app sees the error");
        assert_eq!(
            undone.iter().filter_map(|u| u.prepared).collect::<Vec<_>>(),
            [1, 2]
        );
        q.answer_due(&mut out);
        assert!(out.is_empty());
        let (v, _) = run(&mut q, b"Z");
        assert_eq!(v, [(b'Z', Verdict::Pass)]);
        assert!(q.is_empty());
    }

    #[test]
    fn describe_and_queries_end_where_the_protocol_says() {
        let mut q = Expected::default();
        q.push(Answer::Two, Action::Pass, Undo::default());
        q.push(Answer::Ready, Action::Pass, Undo::default()); // a Query that fails
        let (v, undone) = run(&mut q, b"tTNTDCEZ");
        assert!(v.iter().all(|(_, v)| *v == Verdict::Pass));
        assert!(undone.is_empty(), "a Query's error skips nothing");
        assert!(q.is_empty());
    }
}
