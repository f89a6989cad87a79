//! A Redis of a test's own, for faults that would disturb every other test's Redis: a crash
//! and restart, a pause, a memory limit.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A Redis of the test's own, with append-only persistence, on a port of its own; its data
/// directory is removed on drop.
#[derive(Debug)]
pub struct OwnRedis {
    port: u16,
    dir: PathBuf,
    /// Settings on top of append-only persistence.
    settings: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    /// Fsynced on every write, so a crash loses nothing that was answered.
    pub fn start() -> Self {
        Self::start_with(vec!["--appendfsync".into(), "always".into()])
    }

    /// With `settings` (flags of `redis-server`) on top of append-only persistence.
    pub fn start_with(settings: Vec<String>) -> Self {
        let port = crate::ports::free_port();
        let dir = std::env::temp_dir().join(format!("laabam-redis-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = OwnRedis {
            port,
            dir,
            settings,
            child: None,
        };
        redis.restart();
        redis
    }

    /// Starts it again on the same port, from its append-only file.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--appendonly",
                "yes",
            ])
            .args(&self.settings)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
    }

    /// Kills it (SIGKILL), as a crash would: only what reached its append-only file is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it answering every client for `ms` milliseconds (`CLIENT PAUSE … ALL`), with
    /// every connection kept open, as a failover or a slow command does.
    pub fn pause(&self, ms: u64) {
        let paused = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "client", "pause", &ms.to_string(), "all"])
            .output()
            .expect("redis-cli runs");
        assert!(
            paused.status.success() && paused.stdout.starts_with(b"OK"),
            "{paused:?}"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
