//! Named prepared statements in transaction pooling, as PgBouncer 1.21+
//! does them: an app's statement is known by its text and parameter types;
//! each gets one server-side name (`amb_<n>`) for the whole service, and is
//! prepared on whichever server connection a transaction lands on when that
//! connection lacks it. Each server connection keeps a bounded set of them,
//! least recently used closed first.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;

/// One statement as the server knows it.
#[derive(Debug)]
pub struct Prepared {
    pub id: u64,
    /// The server-side name, NUL-terminated as it goes on the wire.
    pub name: Bytes,
    /// What follows the name in the app's Parse: the query (NUL-terminated)
    /// and the parameter types.
    pub body: Bytes,
}

/// The service's statements by content; a statement lives while a session
/// or a server connection holds it, so the same text keeps its server-side
/// name across sessions.
#[derive(Default)]
pub struct Registry {
    by_body: Mutex<HashMap<Bytes, Weak<Prepared>>>,
    next: AtomicU64,
}

impl Registry {
    /// The statement for this Parse body: the existing one, or a new name.
    pub fn get(&self, body: &[u8]) -> Arc<Prepared> {
        let mut map = crate::sync::lock(&self.by_body);
        if let Some(p) = map.get(body).and_then(Weak::upgrade) {
            return p;
        }
        // Dead entries go when the map has doubled since the last sweep.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(Prepared {
            id,
            name: Bytes::from(format!("amb_{id}\0")),
            body: Bytes::copy_from_slice(body),
        });
        map.insert(p.body.clone(), Arc::downgrade(&p));
        p
    }

    #[cfg(test)]
    pub fn live(&self) -> usize {
        crate::sync::lock(&self.by_body)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// The statements one server connection has prepared (by id), each with
/// when it was last used.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, (u64, Arc<Prepared>)>,
    tick: u64,
    /// The pool's count of statements on its connections.
    count: Option<Arc<AtomicUsize>>,
}

impl Drop for ServerStatements {
    fn drop(&mut self) {
        self.clear();
    }
}

/// What making a statement usable on a server connection takes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensure {
    /// Already prepared there.
    Present,
    /// Prepare it; first close this one (the least recently used) when set.
    Prepare { evict: Option<u64> },
}

impl ServerStatements {
    /// Keeps `count` (the pool's) up to date from now on.
    pub fn count_in(&mut self, count: Arc<AtomicUsize>) {
        count.fetch_add(self.used.len(), Ordering::Relaxed);
        self.count = Some(count);
    }

    fn counted(&self, added: usize, removed: usize) {
        if let Some(c) = &self.count {
            c.fetch_add(added, Ordering::Relaxed);
            c.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    /// Marks `p` as used (and prepared from now on), keeping at most `cap`.
    pub fn ensure(&mut self, p: &Arc<Prepared>, cap: usize) -> Ensure {
        self.tick += 1;
        if let Some((t, _)) = self.used.get_mut(&p.id) {
            *t = self.tick;
            return Ensure::Present;
        }
        let evict = (self.used.len() >= cap.max(1))
            .then(|| {
                self.used
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(id, _)| *id)
            })
            .flatten();
        if let Some(e) = evict {
            self.used.remove(&e);
            self.counted(0, 1);
        }
        self.used.insert(p.id, (self.tick, p.clone()));
        self.counted(1, 0);
        Ensure::Prepare { evict }
    }

    /// The Parse for `id` failed or never ran.
    pub fn forget(&mut self, id: u64) {
        if self.used.remove(&id).is_some() {
            self.counted(0, 1);
        }
    }

    /// The server dropped them all (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.counted(0, self.used.len());
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_and_types_share_one_server_name_while_held() {
        let r = Registry::default();
        let a = r.get(b"select 1\0\0\0");
        let b = r.get(b"select 1\0\0\0");
        let c = r.get(b"select 2\0\0\0");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id, c.id);
        assert_eq!(&a.name[..], format!("amb_{}\0", a.id).as_bytes());
        drop((a, b));
        assert_eq!(r.live(), 1);
        // Gone once no session holds it: the same text gets a new name.
        let again = r.get(b"select 1\0\0\0");
        assert_ne!(again.id, c.id);
    }

    #[test]
    fn a_full_server_set_closes_its_least_recently_used() {
        let r = Registry::default();
        let [one, two, three] = [b"1\0", b"2\0", b"3\0"].map(|b| r.get(b));
        let mut s = ServerStatements::default();
        let count = Arc::new(AtomicUsize::new(0));
        s.count_in(count.clone());
        assert_eq!(s.ensure(&one, 2), Ensure::Prepare { evict: None });
        assert_eq!(s.ensure(&two, 2), Ensure::Prepare { evict: None });
        assert_eq!(s.ensure(&one, 2), Ensure::Present);
        assert_eq!(
            s.ensure(&three, 2),
            Ensure::Prepare {
                evict: Some(two.id)
            }
        );
        assert_eq!(s.len(), 2);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        s.forget(three.id);
        assert_eq!(s.ensure(&three, 2), Ensure::Prepare { evict: None });
        // A server connection keeps its statements' names alive.
        let id = one.id;
        drop(one);
        assert_eq!(r.get(b"1\0").id, id);
        s.clear();
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert_eq!(s.ensure(&two, 2), Ensure::Prepare { evict: None });
        drop(s);
        assert_eq!(count.load(Ordering::Relaxed), 0, "a closed connection's go");
    }
}
