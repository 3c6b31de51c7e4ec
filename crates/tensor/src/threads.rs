//! The thread count every kernel uses, and a persistent worker pool to run them on.
//!
//! Spawning threads per op costs tens of microseconds, which is most of a batch-1 inference
//! layer, so workers live for the whole process and sleep between jobs. [`parallel_for`] runs
//! inline when only one thread is wanted, or when called from inside a pool task (so nesting
//! cannot deadlock). Concurrent callers (a server's request threads, tests running in parallel)
//! take turns for the whole pool in arrival order: each job still gets every thread it asked for,
//! where a caller that found the pool busy used to run its job alone on its own thread.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

/// 0 until first read: then `SCALPEL_THREADS`, else the available parallelism.
static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on pool workers and while a caller runs its share of a job.
    static IN_POOL_TASK: Cell<bool> = const { Cell::new(false) };
    /// Per-thread override installed by [`with_num_threads`].
    static THREAD_OVERRIDE: Cell<usize> = const { Cell::new(0) };
}

/// Sets the process-wide thread count (at least 1).
pub fn set_num_threads(n: usize) {
    NUM_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The thread count kernels called from this thread will use.
pub fn num_threads() -> usize {
    let local = THREAD_OVERRIDE.with(Cell::get);
    if local != 0 {
        return local;
    }
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = std::env::var("SCALPEL_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // Keep a concurrent `set_num_threads` if it won the race.
            match NUM_THREADS.compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => n,
                Err(current) => current,
            }
        }
        n => n,
    }
}

/// Runs `f` with kernels called from this thread using `n` threads, without touching the
/// process-wide setting (so concurrent callers, such as parallel tests, do not interfere).
pub fn with_num_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_OVERRIDE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD_OVERRIDE.with(|c| c.replace(n.max(1))));
    f()
}

/// Calls `f(task)` for every `task in 0..n_tasks`, spread over up to [`num_threads`] threads
/// (the caller included). Returns when all tasks have finished; a panic in any task is
/// re-raised here after the others finish.
pub fn parallel_for(n_tasks: usize, f: impl Fn(usize) + Sync) {
    let threads = num_threads().min(n_tasks);
    if threads <= 1 || IN_POOL_TASK.with(Cell::get) {
        (0..n_tasks).for_each(f);
        return;
    }
    let pool = Pool::get();
    let _turn = pool.dispatch.wait_turn();
    pool.run(threads - 1, n_tasks, &f);
}

/// Calls `f` on every item, spread over threads like [`parallel_for`]. The items are typically
/// disjoint `&mut` chunks of the outputs, which is how kernels share work without `unsafe`.
pub fn parallel_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let slots: Vec<Mutex<Option<T>>> = items
        .into_iter()
        .map(|item| Mutex::new(Some(item)))
        .collect();
    parallel_for(slots.len(), |task| {
        let item = slots[task]
            .lock()
            .unwrap()
            .take()
            .expect("each task runs once");
        f(item)
    });
}

/// A job as the workers see it: the task function with its lifetime erased.
#[derive(Clone, Copy)]
struct Job {
    func: *const (dyn Fn(usize) + Sync),
    n_tasks: usize,
}

// SAFETY: `func` points to a `Sync` closure that `Pool::run` keeps alive until every worker has
// reported back, so sharing the pointer across threads is sound.
unsafe impl Send for Job {}

struct State {
    /// Bumped for every job, so a worker can tell a new job from one it already ran.
    generation: u64,
    job: Option<Job>,
    /// Workers `0..invited` take part in the current job.
    invited: usize,
    finished: usize,
    panic: Option<Box<dyn Any + Send>>,
    /// Workers blocked on `job_posted`, and whether the caller is blocked on `job_done`: a
    /// notification is a system call, made only when someone is asleep to receive it (spinning
    /// threads see the atomics instead).
    sleeping_workers: usize,
    caller_sleeping: bool,
}

/// A first-come, first-served lock on the pool: a ticket counter and the ticket now served. A
/// plain mutex would let the caller that just released it take it straight back for its next
/// op (a forward is dozens of back-to-back jobs) while a woken waiter is still being scheduled.
struct Turnstile {
    next_ticket: AtomicU64,
    serving: AtomicU64,
    /// Guards sleeping on `turn_changed`; the count is how many are asleep.
    sleepers: Mutex<usize>,
    turn_changed: Condvar,
}

/// The pool held by one caller; dropping it serves the next ticket.
struct Turn<'a>(&'a Turnstile);

impl Turnstile {
    const fn new() -> Self {
        Turnstile {
            next_ticket: AtomicU64::new(0),
            serving: AtomicU64::new(0),
            sleepers: Mutex::new(0),
            turn_changed: Condvar::new(),
        }
    }

    fn wait_turn(&self) -> Turn<'_> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let mine = || self.serving.load(Ordering::Acquire) == ticket;
        // No spinning here (unlike the workers): a waiter spinning would take a core from the
        // job it is waiting for.
        if !mine() {
            let mut sleepers = self.sleepers.lock().unwrap();
            while !mine() {
                *sleepers += 1;
                sleepers = self.turn_changed.wait(sleepers).unwrap();
                *sleepers -= 1;
            }
        }
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let turnstile = self.0;
        // Under the lock, so a waiter between its check and its wait cannot miss the change.
        let sleepers = turnstile.sleepers.lock().unwrap();
        turnstile.serving.fetch_add(1, Ordering::Release);
        if *sleepers > 0 {
            turnstile.turn_changed.notify_all();
        }
    }
}

struct Pool {
    /// Admits one caller at a time to run its job on the pool, in arrival order.
    dispatch: Turnstile,
    state: Mutex<State>,
    job_posted: Condvar,
    job_done: Condvar,
    next_task: AtomicUsize,
    /// `State::generation` of the latest job, readable without the lock: idle workers spin on it
    /// briefly before sleeping, because a futex wake-up costs more than a small op (batch-1
    /// inference runs dozens of short jobs back to back).
    posted: AtomicU64,
    /// Workers done with the current job, readable without the lock, for the caller's spin.
    done: AtomicUsize,
    /// Number of workers spawned so far; grows on demand, never shrinks.
    spawned: Mutex<usize>,
}

impl Pool {
    fn get() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool {
            dispatch: Turnstile::new(),
            state: Mutex::new(State {
                generation: 0,
                job: None,
                invited: 0,
                finished: 0,
                panic: None,
                sleeping_workers: 0,
                caller_sleeping: false,
            }),
            job_posted: Condvar::new(),
            job_done: Condvar::new(),
            next_task: AtomicUsize::new(0),
            posted: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            spawned: Mutex::new(0),
        })
    }

    fn ensure_workers(&'static self, n: usize) {
        let mut spawned = self.spawned.lock().unwrap();
        while *spawned < n {
            let index = *spawned;
            std::thread::Builder::new()
                .name(format!("scalpel-worker-{index}"))
                .spawn(move || self.worker(index))
                .expect("failed to spawn a scalpel worker thread");
            *spawned += 1;
        }
    }

    /// Must be called holding a `dispatch` turn.
    fn run(&'static self, workers: usize, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        self.ensure_workers(workers);
        self.next_task.store(0, Ordering::Relaxed);
        let wake_workers = {
            let mut st = self.state.lock().unwrap();
            st.generation += 1;
            // SAFETY: only erases the lifetime; `f` outlives the job because we wait below for
            // every invited worker to finish before returning (or unwinding).
            let func: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
            st.job = Some(Job { func, n_tasks });
            st.invited = workers;
            st.finished = 0;
            st.panic = None;
            self.done.store(0, Ordering::Relaxed);
            self.posted.store(st.generation, Ordering::Release);
            st.sleeping_workers > 0
        };
        if wake_workers {
            self.job_posted.notify_all();
        }

        let own = panic::catch_unwind(AssertUnwindSafe(|| {
            let _flag = InPoolTask::enter();
            self.drain(f, n_tasks);
        }));

        spin_until(|| self.done.load(Ordering::Acquire) >= workers);
        let mut st = self.state.lock().unwrap();
        while st.finished < st.invited {
            st.caller_sleeping = true;
            st = self.job_done.wait(st).unwrap();
            st.caller_sleeping = false;
        }
        st.job = None;
        let worker_panic = st.panic.take();
        drop(st);
        if let Err(payload) = own {
            panic::resume_unwind(payload);
        }
        if let Some(payload) = worker_panic {
            panic::resume_unwind(payload);
        }
    }

    fn drain(&self, f: &(dyn Fn(usize) + Sync), n_tasks: usize) {
        loop {
            let task = self.next_task.fetch_add(1, Ordering::Relaxed);
            if task >= n_tasks {
                break;
            }
            f(task);
        }
    }

    fn worker(&self, index: usize) {
        IN_POOL_TASK.with(|c| c.set(true));
        let mut seen = 0u64;
        loop {
            spin_until(|| self.posted.load(Ordering::Acquire) != seen);
            let job = {
                let mut st = self.state.lock().unwrap();
                loop {
                    if st.generation != seen {
                        seen = st.generation;
                        if index < st.invited {
                            if let Some(job) = st.job {
                                break job;
                            }
                        }
                    }
                    st.sleeping_workers += 1;
                    st = self.job_posted.wait(st).unwrap();
                    st.sleeping_workers -= 1;
                }
            };
            // SAFETY: the caller keeps the closure alive until we report `finished` below.
            let f = unsafe { &*job.func };
            let result = panic::catch_unwind(AssertUnwindSafe(|| self.drain(f, job.n_tasks)));
            let mut st = self.state.lock().unwrap();
            if let Err(payload) = result {
                st.panic.get_or_insert(payload);
            }
            st.finished += 1;
            self.done.fetch_add(1, Ordering::Release);
            if st.finished == st.invited && st.caller_sleeping {
                self.job_done.notify_all();
            }
        }
    }
}

/// How long a thread spins for an event before blocking on a condition variable.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Spins until `ready()` or [`SPIN`] has passed. Only a shortcut: callers re-check under the lock.
fn spin_until(ready: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN {
            return;
        }
    }
}

/// Marks the current thread as running pool tasks for as long as it lives.
struct InPoolTask(bool);

impl InPoolTask {
    fn enter() -> Self {
        InPoolTask(IN_POOL_TASK.with(|c| c.replace(true)))
    }
}

impl Drop for InPoolTask {
    fn drop(&mut self) {
        IN_POOL_TASK.with(|c| c.set(self.0));
    }
}
