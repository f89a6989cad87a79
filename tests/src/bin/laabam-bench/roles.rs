//! The bench process's CPU by role. Its receivers, and in `baseline` the bare pipeline, run on
//! runtimes of their own whose threads carry the role's name, so the process's CPU splits into
//! what receives the deliveries, what stands in for our dispatcher and what publishes the
//! events (the rest), instead of one figure for all three.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{LazyLock, Mutex};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Receiver,
    Pipeline,
}

/// Threads started for a role outside its runtime (a broker connection's I/O thread), by id and
/// start time: ids are reused once a thread ends, and only up to 32,768 on some hosts.
static ADOPTED: Mutex<Vec<(Thread, Role)>> = Mutex::new(Vec::new());

/// A thread of this process: its id and when it started (in clock ticks since boot).
type Thread = (u32, u64);

/// The name lapin gives each connection's I/O thread.
const BROKER_IO_THREAD: &str = "lapin-io-loop";

impl Role {
    pub(crate) const ALL: [Role; 2] = [Role::Receiver, Role::Pipeline];

    /// What the process table calls it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Role::Receiver => "receiver",
            Role::Pipeline => "bare pipeline",
        }
    }

    /// Its threads' name: at most 15 bytes, all the kernel keeps.
    fn thread_name(self) -> &'static str {
        match self {
            Role::Receiver => "bench-receiver",
            Role::Pipeline => "bench-pipeline",
        }
    }

    fn runtime(self) -> &'static Runtime {
        static RECEIVER: LazyLock<Runtime> = LazyLock::new(|| Role::Receiver.build());
        static PIPELINE: LazyLock<Runtime> = LazyLock::new(|| Role::Pipeline.build());
        match self {
            Role::Receiver => &RECEIVER,
            Role::Pipeline => &PIPELINE,
        }
    }

    fn build(self) -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(self.thread_name())
            .enable_all()
            .build()
            .expect("a runtime for the bench")
    }

    /// Runs `task` on this role's threads; what it spawns stays there.
    pub(crate) fn spawn<F>(self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(task)
    }

    /// Like [`Role::spawn`], awaiting its output (a receiver started there, say).
    pub(crate) async fn run<F>(self, task: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(task).await.expect("a bench task panicked")
    }

    /// Counts as this role's the broker I/O threads started since `before` (see [`threads`]):
    /// lapin names its own, wherever the connection was opened.
    pub(crate) fn adopt_broker_threads(self, before: &HashSet<u32>) {
        let mut adopted = ADOPTED.lock().expect("adopted threads");
        for (thread, name, _) in thread_stats() {
            if !before.contains(&thread.0) && name == BROKER_IO_THREAD {
                adopted.push((thread, self));
            }
        }
    }

    /// The CPU seconds its live threads have used.
    pub(crate) fn cpu_seconds(self) -> f64 {
        let adopted = ADOPTED.lock().expect("adopted threads");
        thread_stats()
            .filter(|(thread, name, _)| name == self.thread_name() || adopted.contains(&(*thread, self)))
            .map(|(_, _, cpu)| cpu)
            .sum()
    }
}

/// The ids of this process's threads now.
pub(crate) fn threads() -> HashSet<u32> {
    thread_stats().map(|(thread, _, _)| thread.0).collect()
}

/// Each thread's identity, name and CPU seconds.
fn thread_stats() -> impl Iterator<Item = (Thread, String, f64)> {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (head, fields) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // The 22nd field; the fields after the name start at the 3rd.
            let started = fields.split_whitespace().nth(19)?.parse().ok()?;
            Some(((tid, started), name, crate::measure::cpu_seconds_of_stat(&stat)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// Waits until `role` has been charged a tenth of a CPU-second more than `from`.
    fn charged(role: Role, from: f64) {
        let start = Instant::now();
        while role.cpu_seconds() - from < 0.1 {
            assert!(start.elapsed() < Duration::from_secs(30), "{role:?} was never charged");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_role_is_charged_for_its_runtime_threads_and_the_broker_threads_it_adopts() {
        let stop = Arc::new(AtomicBool::new(false));
        let spin = |stop: Arc<AtomicBool>| move || while !stop.load(Ordering::Relaxed) {};

        let (receiver, pipeline) = (Role::Receiver.cpu_seconds(), Role::Pipeline.cpu_seconds());
        let busy = Role::Receiver.spawn({
            let spin = spin(stop.clone());
            async move { spin() }
        });
        charged(Role::Receiver, receiver);
        stop.store(true, Ordering::Relaxed);
        Role::Receiver.runtime().block_on(busy).unwrap();
        assert_eq!(
            Role::Pipeline.cpu_seconds(),
            pipeline,
            "the receiver's work was charged to the pipeline"
        );

        // A broker connection's I/O thread, started after the snapshot.
        let stop = Arc::new(AtomicBool::new(false));
        let before = threads();
        let (started, running) = std::sync::mpsc::channel();
        let io = std::thread::Builder::new()
            .name(BROKER_IO_THREAD.into())
            .spawn({
                let spin = spin(stop.clone());
                move || {
                    started.send(()).unwrap();
                    spin()
                }
            })
            .unwrap();
        running.recv().unwrap();
        Role::Pipeline.adopt_broker_threads(&before);
        charged(Role::Pipeline, pipeline);
        stop.store(true, Ordering::Relaxed);
        io.join().unwrap();
    }
}
