//! A private redis-server under valgrind's callgrind, for `redis-calls --callgrind`.
//!
//! A change to the store's writes moves Redis's cost per delivery by a few percent, and CPU
//! time on this shared two-core host moves by a fifth from run to run, so timed runs cannot
//! tell such a change from noise. The instructions Redis executes for the same calls barely
//! move (0.1% between two runs of the same build), whatever else the machine is doing. It runs
//! about fifty times slower, so a run takes a few thousand events, not the default 200,000.

use laabam_tests::ports::free_port;
use laabam_tests::wait_until;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) struct CallgrindRedis {
    child: Child,
    pub(crate) port: u16,
    pub(crate) url: String,
    dir: PathBuf,
    dumps: u32,
}

impl CallgrindRedis {
    /// Starts it on a free port with the flags `scripts/services` gives the shared Redis, and
    /// waits until it answers.
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("laabam-callgrind-{port}"));
        std::fs::create_dir_all(&dir).expect("a directory for callgrind's output");
        let child = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", dir.join("out").display()))
            .args(["redis-server", "--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("valgrind runs (apt-get install valgrind)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).expect("Redis URL");
        wait_until(
            "redis-server under callgrind answers",
            Duration::from_secs(60),
            || async { client.get_multiplexed_async_connection().await.is_ok() },
        )
        .await;
        CallgrindRedis {
            child,
            port,
            url,
            dir,
            dumps: 0,
        }
    }

    /// Forgets what was counted so far: the next [`CallgrindRedis::phase`] counts from here.
    pub(crate) fn zero(&self) {
        self.control("-z");
    }

    /// The instructions Redis executed since the last zero or phase.
    pub(crate) fn phase(&mut self) -> u64 {
        self.control("-d");
        self.dumps += 1;
        let dump = self.dir.join(format!("out.{}", self.dumps));
        let text = std::fs::read_to_string(&dump).expect("callgrind's dump");
        text.lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("a dump has a summary line")
    }

    fn control(&self, what: &str) {
        let out = Command::new("callgrind_control")
            .args([what, &self.child.id().to_string()])
            .output()
            .expect("callgrind_control runs");
        assert!(out.status.success(), "callgrind_control {what} failed");
    }

    /// Shuts it down and removes its output.
    pub(crate) async fn stop(mut self) {
        if let Ok(mut conn) = redis::Client::open(self.url.as_str())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
        {
            let _: Result<(), _> = redis::cmd("SHUTDOWN").arg("NOSAVE").query_async(&mut conn).await;
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
