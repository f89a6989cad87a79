//! A RabbitMQ node of a test's own, for faults that would disturb every other test's broker:
//! a restart, a resource alarm.

use crate::wait_until;
use std::time::Duration;

/// A RabbitMQ node of the test's own (own name, port and data directory), so restarting it
/// leaves every other test's broker alone.
#[derive(Debug)]
pub struct OwnRabbit {
    node: String,
    port: u16,
    dir: std::path::PathBuf,
    /// The `rabbitmq-server` processes started, reaped when the node stops.
    children: std::sync::Mutex<Vec<std::process::Child>>,
}

impl OwnRabbit {
    pub async fn start() -> Self {
        let port = crate::ports::free_port();
        let name = format!("laabam-fault-{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        // The broker drops to the rabbitmq user: it must own its directory.
        let _ = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let rabbit = OwnRabbit {
            node: format!("{name}@localhost"),
            port,
            dir,
            children: std::sync::Mutex::new(Vec::new()),
        };
        rabbit.boot().await;
        rabbit
    }

    /// Starts the node (again), and waits until it accepts connections.
    pub async fn boot(&self) {
        let d = &self.dir;
        let child = std::process::Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env(
                "RABBITMQ_DIST_PORT",
                (self.port as u32 + 20_000).min(65_000).to_string(),
            )
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d.join("feature_flags"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rabbitmq-server starts");
        self.children.lock().unwrap().push(child);
        let url = self.url();
        // Each probe is bounded: lapin's own connect can hang on a node that is still booting,
        // and an unbounded probe hung this test (and CI) with the node up and no connection.
        wait_until(
            "the RabbitMQ node accepts connections",
            Duration::from_secs(90),
            || async {
                laabam_shared::startup::amqp_connect(&url, "laabam-test-probe")
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn stop(&self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
    }

    /// Kills the node's Erlang VM outright (SIGKILL), as a crash or the kernel's OOM killer
    /// would: nothing is flushed or closed first, so only what the broker wrote to disk before
    /// confirming it is there when the node boots again.
    pub async fn kill(&self) {
        let pid = self.vm_pid();
        signal(&pid, "-KILL");
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        wait_until("the killed node is gone", Duration::from_secs(30), || async {
            !proc.exists()
        })
        .await;
    }

    /// Stops the node's Erlang VM (SIGSTOP) until the guard is thawed or dropped: its
    /// connections stay open and nothing on them is answered, as in a long pause of the VM or a
    /// network that drops everything without closing anything.
    pub fn freeze(&self) -> Frozen {
        let pid = self.vm_pid();
        signal(&pid, "-STOP");
        Frozen { pid }
    }

    fn vm_pid(&self) -> String {
        let pid = self.ctl(&["eval", "os:getpid()."]);
        let pid = pid.trim().trim_matches('"').to_owned();
        assert!(pid.parse::<u32>().is_ok(), "the node's process id, not {pid:?}");
        pid
    }

    /// Messages waiting in the node's queues, not yet delivered to a consumer.
    pub fn messages_ready(&self) -> u64 {
        self.ctl(&["list_queues", "--quiet", "--no-table-headers", "messages_ready"])
            .lines()
            .filter_map(|line| line.trim().parse::<u64>().ok())
            .sum()
    }

    /// Raises a memory alarm (a watermark far below what the node uses), or clears it, and
    /// waits until the node reports it so. While it is raised the node blocks every connection
    /// that publishes, as a node short of memory or disk does.
    pub async fn memory_alarm(&self, raised: bool) {
        let watermark: &[&str] = if raised { &["absolute", "1MB"] } else { &["0.4"] };
        self.ctl(&[&["set_vm_memory_high_watermark"], watermark].concat());
        let want = if raised { "memory" } else { "[]" };
        wait_until("the memory alarm as set", Duration::from_secs(30), || async {
            self.ctl(&["eval", "rabbit_alarm:get_alarms()."]).contains(want)
        })
        .await;
    }

    fn ctl(&self, args: &[&str]) -> String {
        crate::env::rabbitmqctl(&[&["-n", self.node.as_str()], args].concat())
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

fn signal(pid: &str, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "{signal} reached the node's VM ({pid})");
}

/// A node stopped by [`OwnRabbit::freeze`]; it runs again when this is dropped, so a test that
/// fails while it is frozen still leaves a node that can be stopped and removed.
#[derive(Debug)]
pub struct Frozen {
    pid: String,
}

impl Frozen {
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.pid]).status();
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
