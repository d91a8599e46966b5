//! CancelRequest through the ambassador. Each app session gets a cancel key
//! of the ambassador's own (its BackendKeyData); while the session holds a
//! server connection the key maps to that connection's server key. A cancel
//! arrives on a new app connection, is looked up, and goes to the server the
//! session is on at that moment (none: nothing is running, nothing to do).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

/// Where a cancel for one session goes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub key: i32,
}

#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<(i32, i32), Option<CancelTarget>>>,
}

/// One session's entry; removed when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    pub pid: i32,
    pub key: i32,
}

impl Registry {
    /// A fresh, unguessable (pid, key) for a new session.
    pub fn register(self: &Arc<Self>) -> Registration {
        let mut sessions = crate::sync::lock(&self.sessions);
        loop {
            // Positive like a real backend pid; the key is the secret part.
            let pid = (rand::random::<u32>() >> 1) as i32;
            let key = rand::random::<i32>();
            if pid != 0 && !sessions.contains_key(&(pid, key)) {
                sessions.insert((pid, key), None);
                return Registration {
                    registry: self.clone(),
                    pid,
                    key,
                };
            }
        }
    }

    pub fn target(&self, pid: i32, key: i32) -> Option<CancelTarget> {
        crate::sync::lock(&self.sessions)
            .get(&(pid, key))
            .copied()
            .flatten()
    }
}

impl Registration {
    pub fn set(&self, target: Option<CancelTarget>) {
        if let Some(t) = crate::sync::lock(&self.registry.sessions).get_mut(&(self.pid, self.key)) {
            *t = target;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::sync::lock(&self.registry.sessions).remove(&(self.pid, self.key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_the_current_server_and_vanish_with_the_session() {
        let r = Arc::new(Registry::default());
        let a = r.register();
        let b = r.register();
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        assert!(a.pid > 0);
        assert_eq!(r.target(a.pid, a.key), None);
        let t = CancelTarget {
            addr: "10.0.0.1:5432".parse().unwrap(),
            pid: 42,
            key: 7,
        };
        a.set(Some(t));
        assert_eq!(r.target(a.pid, a.key), Some(t));
        assert_eq!(
            r.target(a.pid, a.key ^ 1),
            None,
            "a wrong key cancels nothing"
        );
        let (pid, key) = (a.pid, a.key);
        drop(a);
        assert_eq!(r.target(pid, key), None);
    }
}
