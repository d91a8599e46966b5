//! A SIGHUP from the moment the proxy can say it is ready reloads the config
//! and never ends the process. Its own test binary: tokio's SIGHUP handler,
//! once installed by any test, stays for the whole process, which would hide
//! a late registration (with one, the signal's default action ends this
//! binary, and the test fails).

use std::{sync::Arc, time::Duration};

use ambassador_userspace::{config::Config, reload};

#[tokio::test(flavor = "current_thread")]
async fn a_sighup_the_moment_watch_returns_reloads_and_never_kills() {
    let dir = std::env::temp_dir().join(format!("amb-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, "proxy: { port: 15001 }\n").unwrap();
    let cfg = Config::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let live: Arc<reload::Live> = reload::Live::start(cfg, Some(path.clone()), false)
        .await
        .unwrap();
    // The file watcher is slow on purpose: only the signal can reload here.
    reload::watch(live.clone(), Duration::from_secs(3600));
    // No await between: the watch task has not run yet.
    // SAFETY: raise(2) on this process with a valid signal number.
    assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while live.last_reload().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
