//! Files that rotate under a running proxy: mounted Secrets, projected
//! service-account tokens, certificates. Kubernetes swaps them through a
//! symlink, so identity is (device, inode, size, mtime) of the target, checked
//! at most once a second by whoever uses the file.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const CHECK_EVERY: Duration = Duration::from_secs(1);

type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// A set of files watched together.
#[derive(Debug)]
pub struct WatchedFiles {
    paths: Vec<PathBuf>,
    state: Mutex<(Instant, Vec<Stamp>)>,
}

impl WatchedFiles {
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> WatchedFiles {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        WatchedFiles {
            paths,
            state: Mutex::new((Instant::now(), stamps)),
        }
    }

    /// True once after any of the files changed since the last call that said
    /// so; costs nothing more than a clock read between checks.
    pub fn changed(&self) -> bool {
        if self.paths.is_empty() {
            return false;
        }
        let mut state = crate::sync::lock(&self.state);
        if state.0.elapsed() < CHECK_EVERY {
            return false;
        }
        state.0 = Instant::now();
        let now: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
        if now != state.1 {
            state.1 = now;
            true
        } else {
            false
        }
    }

    /// Forces the next `changed` to look at the files (tests, reloads).
    pub fn check_now(&self) {
        crate::sync::lock(&self.state).0 = Instant::now() - CHECK_EVERY;
    }
}

/// A value made from watched files (a certificate, a credentials table, a
/// token), made again when they change. A version that cannot be made (a
/// rotation briefly removes or half-writes files on some volume types)
/// keeps the last good one, and says why. Debug shows the files, never the
/// value: it may be a secret.
pub struct FromFiles<T> {
    files: WatchedFiles,
    current: Mutex<Arc<T>>,
}

impl<T> FromFiles<T> {
    /// `first` is the value made from the files as they are now.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>, first: T) -> FromFiles<T> {
        FromFiles {
            files: WatchedFiles::new(paths),
            current: Mutex::new(Arc::new(first)),
        }
    }

    /// The current value, made again first with `make` if a file changed
    /// (checked at most once a second). `what` names it in the log.
    pub fn get<E: std::fmt::Display>(
        &self,
        what: &str,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Arc<T> {
        if self.files.changed() {
            match make() {
                Ok(v) => {
                    tracing::info!("{what} changed: reloaded");
                    *crate::sync::lock(&self.current) = Arc::new(v);
                }
                Err(e) => {
                    tracing::warn!(
                        "{what} changed but cannot be used ({e}); keeping the previous one"
                    )
                }
            }
        }
        crate::sync::lock(&self.current).clone()
    }
}

impl<T> FromFiles<T> {
    /// Forces the next `get` to look at the files (tests).
    pub fn check_now(&self) {
        self.files.check_now();
    }
}

impl<T> std::fmt::Debug for FromFiles<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromFiles")
            .field("paths", &self.files.paths)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_made_again_when_its_file_changes_and_kept_when_it_cannot_be() {
        let dir = std::env::temp_dir().join(format!("amb-fromfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "first-secret").unwrap();
        let read = || match std::fs::read_to_string(&f) {
            Ok(t) if !t.is_empty() => Ok(t),
            _ => Err("empty"),
        };
        let v = FromFiles::new([f.clone()], read().unwrap());
        std::fs::write(&f, "second-secret").unwrap();
        v.files.check_now();
        assert_eq!(*v.get("token", read), "second-secret");
        std::fs::write(&f, "").unwrap();
        v.files.check_now();
        assert_eq!(
            *v.get("token", read),
            "second-secret",
            "the last good one stays"
        );
        assert!(!format!("{v:?}").contains("secret"), "no value in Debug");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notices_a_replaced_file_once() {
        let dir = std::env::temp_dir().join(format!("amb-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "one").unwrap();
        let w = WatchedFiles::new([f.clone()]);
        w.check_now();
        assert!(!w.changed());
        // Like a Secret rotation: a new file renamed over the old one.
        let tmp = dir.join("token.new");
        std::fs::write(&tmp, "two!").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        assert!(!w.changed(), "checked less than a second ago");
        w.check_now();
        assert!(w.changed());
        w.check_now();
        assert!(!w.changed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
