//! A fixed set of worker threads, created once, that run one job at a time: the calling
//! thread is worker 0 and `threads - 1` workers wait on a condition variable. Dispatch
//! allocates nothing (the job is passed by reference), so a layer run stays allocation
//! free. Model-checked with loom (`tests/loom_runner.rs`).

use crate::sync::{thread, Arc, AtomicBool, Condvar, Mutex, MutexGuard, Ordering};

/// Locks the state. A panic never happens while the lock is held (jobs run outside it and
/// every update under it is a plain assignment), so a poisoned lock still holds a
/// consistent state: take it rather than failing every later run.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv`, tolerating poison as `lock` does.
fn wait<'a>(cv: &Condvar, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// A job: called once on each worker with its index `0..threads`.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// A `&Job` with its lifetime erased so workers can hold it. Only `Runner::run` creates
/// one, and it waits until every worker has dropped it before returning.
#[derive(Clone, Copy)]
struct JobRef(*const Job<'static>);
// SAFETY: the pointee is `Sync` and outlives every use (see `Runner::run`).
unsafe impl Send for JobRef {}

struct State {
    generation: u64,
    job: Option<JobRef>,
    /// Workers that have not finished the current generation.
    running: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
    panicked: AtomicBool,
}

pub struct Runner {
    shared: Arc<Shared>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Runner {
    /// Starts `threads - 1` workers (none for `threads <= 1`).
    pub fn new(threads: usize) -> Runner {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { generation: 0, job: None, running: 0, shutdown: false }),
            start: Condvar::new(),
            done: Condvar::new(),
            panicked: AtomicBool::new(false),
        });
        let handles = (1..threads.max(1))
            .map(|i| {
                let s = Arc::clone(&shared);
                thread::spawn(move || worker(&s, i))
            })
            .collect();
        Runner { shared, handles }
    }

    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `job(i)` for every worker `i`, the caller being worker 0, and returns when all
    /// have finished. A panic in any worker is re-raised here after all have stopped.
    /// One run at a time: overlapping runs would share the workers' generation count. The
    /// backend's whole-layer runs hold `&mut CpuBackend`, and the C ABI refuses an
    /// overlapping call with `NSA_STATUS_BUSY` before it gets here.
    pub fn run(&self, job: &Job<'_>) {
        if self.handles.is_empty() {
            job(0);
            return;
        }
        // SAFETY: only the lifetime is erased. This function does not return (nor unwind:
        // the caller's own share is wrapped in catch_unwind) before `running` is back to 0
        // and `job` is cleared, so no worker uses the reference after it dies.
        let erased = JobRef(unsafe { std::mem::transmute::<*const Job<'_>, *const Job<'static>>(job as *const Job<'_>) });
        {
            let mut st = lock(&self.shared.state);
            st.job = Some(erased);
            st.running = self.handles.len();
            st.generation = st.generation.wrapping_add(1);
        }
        self.shared.start.notify_all();
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        let mut st = lock(&self.shared.state);
        while st.running > 0 {
            st = wait(&self.shared.done, st);
        }
        st.job = None;
        drop(st);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a CPU worker thread panicked during a layer run");
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut st = lock(&shared.state);
            while st.generation == seen && !st.shutdown {
                st = wait(&shared.start, st);
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job.expect("a new generation always carries a job")
        };
        // SAFETY: `Runner::run` keeps the job alive until `running` reaches 0 (below).
        let f = unsafe { &*job.0 };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index))).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        let mut st = lock(&shared.state);
        st.running -= 1;
        if st.running == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.start.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
