//! The process-wide bound on attempts in flight, and the turns a message's attempts take
//! within its share of it.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The process-wide bound on attempts in flight.
#[derive(Debug)]
pub struct InFlight {
    semaphore: Arc<Semaphore>,
    capacity: usize,
}

impl InFlight {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        InFlight {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Waits for `n` attempts' room at once (never part of it, so two wide events cannot each
    /// hold half and wait for the rest). An event wider than the capacity takes all of it, and
    /// its attempts take turns on that room (see [`super::Pipeline::run_attempts`]).
    pub(super) async fn acquire(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = n.min(self.capacity);
        if n == 0 {
            return None;
        }
        self.semaphore.clone().acquire_many_owned(n as u32).await.ok()
    }

    /// How many attempts of the same event run before the one at `rank` can start: its lease
    /// must last through their turns as well as its own.
    pub(super) fn turns_before(&self, rank: usize) -> i64 {
        (rank / self.capacity) as i64
    }
}

/// Runs `tasks`, as many at once as `room` holds permits (all at once without one): each
/// permit is a turn that takes the next waiting task when its own ends, and is released when
/// none is left. Permits beyond the tasks go back before any runs.
pub(super) async fn take_turns<T, Fut>(tasks: Vec<T>, mut room: Option<OwnedSemaphorePermit>, run: impl Fn(T) -> Fut)
where
    Fut: std::future::Future<Output = ()>,
{
    let turns = room.as_ref().map_or(tasks.len(), |r| r.num_permits()).min(tasks.len());
    let queue = std::sync::Mutex::new(tasks.into_iter());
    let next = || queue.lock().expect("task queue lock").next();
    let run = &run;
    let turns: Vec<_> = (0..turns)
        .map(|_| {
            let permit = room.as_mut().and_then(|r| r.split(1));
            async move {
                let _permit = permit;
                while let Some(task) = next() {
                    run(task).await;
                }
            }
        })
        .collect();
    // Room for deliveries that were deferred or already known is not held while others run.
    drop(room);
    futures_util::future::join_all(turns).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_past_the_room_take_turns_and_each_runs_once() {
        let semaphore = Arc::new(Semaphore::new(8));
        let room = semaphore.clone().acquire_many_owned(3).await.unwrap();
        let (running, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let ran = std::sync::Mutex::new(Vec::new());
        take_turns((0..20).collect(), Some(room), |task: usize| {
            let (running, peak, ran) = (&running, &peak, &ran);
            async move {
                peak.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                running.fetch_sub(1, SeqCst);
                ran.lock().unwrap().push(task);
            }
        })
        .await;
        assert_eq!(peak.load(SeqCst), 3, "never more at once than the room");
        let mut ran = ran.into_inner().unwrap();
        ran.sort();
        assert_eq!(ran, (0..20).collect::<Vec<_>>(), "each task once");
        assert_eq!(semaphore.available_permits(), 8, "the room is given back");
    }

    #[tokio::test]
    async fn room_beyond_the_tasks_goes_back_before_they_run() {
        let semaphore = Arc::new(Semaphore::new(8));
        let room = semaphore.clone().acquire_many_owned(5).await.unwrap();
        let free_while_running = AtomicUsize::new(0);
        take_turns(vec![()], Some(room), |()| async {
            free_while_running.store(semaphore.available_permits(), SeqCst);
        })
        .await;
        assert_eq!(
            free_while_running.load(SeqCst),
            7,
            "only the one task's permit is held while it runs"
        );
    }
}
