//! Files that rotate under a running proxy: mounted Secrets, projected
//! service-account tokens, certificates. Kubernetes swaps them through a
//! symlink, so identity is (device, inode, size, mtime) of the target, checked
//! at most once a second by whoever uses the file.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
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

#[cfg(test)]
mod tests {
    use super::*;

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
