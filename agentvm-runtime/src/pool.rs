//! [`VmPool`]: a pool of booted VMs reverted to their golden snapshot after
//! every use.
//!
//! * `min_size` VMs are booted in parallel up front and kept ready; the pool
//!   grows up to `max_size` under load.
//! * [`VmPool::acquire`] hands out a ready VM in FIFO order of the callers;
//!   a [`Lease`] returns it when dropped (also on panic), and the revert runs in
//!   the background, off the caller's path.
//! * A VM that crashed, hung, or failed to revert is destroyed and replaced,
//!   never handed out again. VMs are recycled after `max_uses` or `ttl`.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::backend::Backend;
use crate::events::{emit, Event};
use crate::spec::VmSpec;
use crate::vm::{RevertTimings, Vm, VmError};

/// Consecutive boot failures after which the pool stops booting replacements
/// and fails acquires with the last boot error instead.
pub const MAX_CONSECUTIVE_BOOT_FAILURES: u32 = 3;

/// How the pool is sized and when VMs are recycled.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// VMs kept booted and ready (booted in parallel at start).
    pub min_size: usize,
    /// Most VMs alive at once (ready + leased + booting + reverting).
    pub max_size: usize,
    /// Destroy a VM after this many uses (`None`: never).
    pub max_uses: Option<u64>,
    /// Destroy a VM this long after it booted (`None`: never).
    pub ttl: Option<Duration>,
    /// Check idle VMs this often (a ping, and the hypervisor's view of
    /// the VM); one that died or grew too old while idle is replaced before
    /// anyone acquires it (`None`: only when they are handed back).
    pub health_interval: Option<Duration>,
    /// What each VM looks like.
    pub spec: VmSpec,
}

impl PoolConfig {
    /// A pool of exactly `size` VMs of `spec`, never recycled.
    pub fn fixed(size: usize, spec: VmSpec) -> Self {
        Self {
            min_size: size,
            max_size: size,
            max_uses: None,
            ttl: None,
            health_interval: None,
            spec,
        }
    }
}

/// Why the pool could not hand out a VM.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No VM became free in time.
    #[error("no VM available within {after:?} (pool status: {status})")]
    AcquireTimeout {
        /// The deadline.
        after: Duration,
        /// The pool's state at the deadline.
        status: PoolStatus,
    },
    /// VMs fail to boot; the pool gave up booting more.
    #[error("VMs fail to boot ({failures} in a row); last error: {last_error}")]
    BootFailing {
        /// Consecutive failures.
        failures: u32,
        /// The last boot error.
        last_error: String,
    },
    /// The pool is shutting down.
    #[error("the VM pool is shutting down")]
    ShuttingDown,
    /// The configuration makes no sense.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
}

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Ready to be acquired.
    pub available: usize,
    /// Held by callers.
    pub leased: usize,
    /// Being booted.
    pub booting: usize,
    /// Being reverted after a release.
    pub reverting: usize,
    /// VMs that failed (boot, crash, revert) since the start.
    pub failed: u64,
    /// VMs destroyed since the start (failed, recycled, shut down).
    pub destroyed: u64,
    /// Callers waiting in `acquire`.
    pub waiting: usize,
}

impl std::fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} available, {} leased, {} booting, {} reverting, {} waiting, {} failed",
            self.available, self.leased, self.booting, self.reverting, self.waiting, self.failed
        )
    }
}

/// What happened when a lease was given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Reverted and back in the pool.
    Reverted(RevertTimings),
    /// Destroyed because it reached its use count or age limit.
    Recycled,
    /// Destroyed because the revert failed or the VM was broken.
    Destroyed(String),
}

type Waiter = oneshot::Sender<Result<Vm, PoolError>>;

struct Waiting {
    id: u64,
    tx: Waiter,
}

#[derive(Default)]
struct State {
    idle: VecDeque<Vm>,
    waiters: VecDeque<Waiting>,
    leased: usize,
    booting: usize,
    reverting: usize,
    failed: u64,
    destroyed: u64,
    consecutive_boot_failures: u32,
    last_boot_error: Option<String>,
    next_waiter: u64,
    shutting_down: bool,
    uses: std::collections::HashMap<String, u64>,
}

impl State {
    fn alive(&self) -> usize {
        self.idle.len() + self.leased + self.booting + self.reverting
    }

    fn status(&self) -> PoolStatus {
        PoolStatus {
            available: self.idle.len(),
            leased: self.leased,
            booting: self.booting,
            reverting: self.reverting,
            failed: self.failed,
            destroyed: self.destroyed,
            waiting: self.waiters.len(),
        }
    }

    fn boot_failing(&self) -> Option<PoolError> {
        (self.consecutive_boot_failures >= MAX_CONSECUTIVE_BOOT_FAILURES).then(|| {
            PoolError::BootFailing {
                failures: self.consecutive_boot_failures,
                last_error: self.last_boot_error.clone().unwrap_or_default(),
            }
        })
    }
}

struct Inner {
    id: String,
    backend: Arc<dyn Backend>,
    config: PoolConfig,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    changed: Notify,
}

/// A pool of warm VMs. Cheap to clone (shared).
#[derive(Clone)]
pub struct VmPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPool")
            .field("status", &self.status())
            .finish()
    }
}

impl VmPool {
    /// Creates the pool and starts booting `min_size` VMs in parallel. Must be
    /// called inside the tokio runtime that will run the pool's background work
    /// (boots and reverts); that runtime must outlive the pool's use.
    pub fn new(backend: Arc<dyn Backend>, config: PoolConfig) -> Result<Self, PoolError> {
        if config.max_size == 0 || config.min_size > config.max_size {
            return Err(PoolError::InvalidConfig(format!(
                "need 0 <= min_size ({}) <= max_size ({}) and max_size >= 1",
                config.min_size, config.max_size
            )));
        }
        static NEXT_POOL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = format!(
            "pool-{}",
            NEXT_POOL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let pool = Self {
            inner: Arc::new(Inner {
                id,
                backend,
                config,
                runtime: tokio::runtime::Handle::current(),
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        };
        pool.replenish();
        if let Some(every) = pool.inner.config.health_interval {
            pool.spawn_health_checks(every);
        }
        Ok(pool)
    }

    /// Every `every`, checks each idle VM (alive, agent answers, younger
    /// than the TTL) and replaces those that fail, so nobody acquires a VM
    /// that died while it waited. Stops when the pool is dropped or shut down.
    fn spawn_health_checks(&self, every: Duration) {
        let weak = Arc::downgrade(&self.inner);
        self.inner.runtime.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let pool = VmPool { inner };
                if pool.inner.state.lock().expect("pool lock").shutting_down {
                    return;
                }
                pool.check_idle().await;
            }
        });
    }

    /// One round of [`VmPool::spawn_health_checks`].
    async fn check_idle(&self) {
        let count = self.inner.state.lock().expect("pool lock").idle.len();
        for _ in 0..count {
            let vm = {
                let mut state = self.inner.state.lock().expect("pool lock");
                let Some(vm) = state.idle.pop_front() else {
                    return;
                };
                state.reverting += 1;
                vm
            };
            let mut vm = vm;
            let expired = self.inner.config.ttl.is_some_and(|ttl| vm.age() >= ttl);
            let verdict = if expired {
                Err("recycled (ttl)".to_string())
            } else {
                vm.health_check().await.map_err(|e| e.to_string())
            };
            match verdict {
                Ok(()) => self.offer(vm, Counted::Reverting).await,
                Err(reason) => {
                    tracing::warn!(vm = vm.id(), %reason, "idle VM replaced");
                    if !expired {
                        emit(Event::VmCrashed {
                            vm: vm.id().to_string(),
                            error: reason.clone(),
                        });
                    }
                    {
                        let mut state = self.inner.state.lock().expect("pool lock");
                        state.reverting -= 1;
                        state.destroyed += 1;
                        if !expired {
                            state.failed += 1;
                        }
                        state.uses.remove(vm.id());
                    }
                    let _ = vm
                        .destroy_because(if expired { "recycled" } else { "broken" })
                        .await;
                    self.replenish();
                    self.grow_for_waiters();
                }
            }
            self.changed();
        }
    }

    /// The pool's id in events and metrics (`pool-1`, `pool-2`, ... in
    /// creation order within the process).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Wakes whoever waits for a change and publishes the counters as an
    /// [`Event::PoolStatus`].
    fn changed(&self) {
        self.inner.changed.notify_waiters();
        self.publish_status();
    }

    fn publish_status(&self) {
        let status = self.status();
        emit(Event::PoolStatus {
            pool: self.inner.id.clone(),
            available: status.available,
            leased: status.leased,
            booting: status.booting,
            reverting: status.reverting,
        });
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Current counters.
    pub fn status(&self) -> PoolStatus {
        self.inner.state.lock().expect("pool lock").status()
    }

    /// Waits until `min_size` VMs are ready (or booting keeps failing).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), PoolError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            {
                let state = self.inner.state.lock().expect("pool lock");
                if let Some(error) = state.boot_failing() {
                    return Err(error);
                }
                if state.idle.len() >= self.inner.config.min_size {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(PoolError::AcquireTimeout {
                    after: timeout,
                    status: self.status(),
                });
            }
        }
    }

    /// Takes a ready VM, waiting at most `timeout` (callers are served first
    /// come, first served). Boots a new VM when none is free and the pool is
    /// below `max_size`.
    pub async fn acquire(&self, timeout: Duration) -> Result<Lease, PoolError> {
        let started = Instant::now();
        let (id, rx) = {
            let mut state = self.inner.state.lock().expect("pool lock");
            if state.shutting_down {
                return Err(PoolError::ShuttingDown);
            }
            if state.waiters.is_empty() {
                if let Some(vm) = state.idle.pop_front() {
                    state.leased += 1;
                    drop(state);
                    return Ok(self.lease(vm, started.elapsed()));
                }
            }
            if let Some(error) = state.boot_failing() {
                return Err(error);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.waiters.push_back(Waiting { id, tx });
            (id, rx)
        };
        self.grow_for_waiters();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(vm))) => Ok(self.lease(vm, started.elapsed())),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(PoolError::ShuttingDown),
            Err(_) => {
                let mut state = self.inner.state.lock().expect("pool lock");
                state.waiters.retain(|w| w.id != id);
                Err(PoolError::AcquireTimeout {
                    after: timeout,
                    status: state.status(),
                })
            }
        }
    }

    /// Destroys every VM and refuses further acquires. Leases still out are
    /// destroyed when dropped. Waits for boots and reverts in progress.
    pub async fn shutdown(&self) {
        let (idle, waiters) = {
            let mut state = self.inner.state.lock().expect("pool lock");
            state.shutting_down = true;
            let idle: Vec<Vm> = state.idle.drain(..).collect();
            state.destroyed += idle.len() as u64;
            let waiters: Vec<Waiting> = state.waiters.drain(..).collect();
            (idle, waiters)
        };
        for waiter in waiters {
            let _ = waiter.tx.send(Err(PoolError::ShuttingDown));
        }
        self.publish_status();
        for vm in idle {
            let _ = vm.destroy_because("shutdown").await;
        }
        loop {
            let notified = self.inner.changed.notified();
            {
                let state = self.inner.state.lock().expect("pool lock");
                if state.booting == 0 && state.reverting == 0 && state.leased == 0 {
                    break;
                }
            }
            notified.await;
        }
        self.changed();
    }

    fn lease(&self, vm: Vm, waited: Duration) -> Lease {
        let uses = {
            let mut state = self.inner.state.lock().expect("pool lock");
            let uses = state.uses.entry(vm.id().to_string()).or_insert(0);
            *uses += 1;
            *uses
        };
        emit(Event::VmAcquired {
            pool: self.inner.id.clone(),
            vm: vm.id().to_string(),
            waited_seconds: waited.as_secs_f64(),
            uses,
        });
        self.publish_status();
        Lease {
            vm: Some(vm),
            pool: self.clone(),
            waited,
            uses,
        }
    }

    /// Boots VMs until `min_size` are alive (or booting keeps failing).
    fn replenish(&self) {
        let to_boot = {
            let mut state = self.inner.state.lock().expect("pool lock");
            if state.shutting_down || state.boot_failing().is_some() {
                0
            } else {
                let missing = self.inner.config.min_size.saturating_sub(state.alive());
                state.booting += missing;
                missing
            }
        };
        for _ in 0..to_boot {
            self.spawn_boot();
        }
        if to_boot > 0 {
            self.publish_status();
        }
    }

    /// Boots one more VM when callers wait and nothing will free up for them.
    fn grow_for_waiters(&self) {
        let boot = {
            let mut state = self.inner.state.lock().expect("pool lock");
            let incoming = state.booting + state.reverting;
            let grow = state.waiters.len() > incoming
                && state.alive() < self.inner.config.max_size
                && state.boot_failing().is_none()
                && !state.shutting_down;
            if grow {
                state.booting += 1;
            }
            grow
        };
        if boot {
            self.spawn_boot();
            self.publish_status();
        }
    }

    fn spawn_boot(&self) {
        let pool = self.clone();
        self.inner.runtime.spawn(async move {
            let result =
                match Vm::boot(pool.inner.backend.as_ref(), pool.inner.config.spec.clone()).await {
                    // A VM started from the golden cache was restored: warm it.
                    Ok(mut vm) => match vm.warm_up().await {
                        Ok(_) => Ok(vm),
                        Err(error) => {
                            let _ = vm.destroy_because("broken").await;
                            Err(error)
                        }
                    },
                    Err(error) => Err(error),
                };
            match result {
                Ok(vm) => {
                    pool.inner
                        .state
                        .lock()
                        .expect("pool lock")
                        .consecutive_boot_failures = 0;
                    pool.offer(vm, Counted::Booting).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "VM boot failed");
                    let failing = {
                        let mut state = pool.inner.state.lock().expect("pool lock");
                        state.booting -= 1;
                        state.failed += 1;
                        state.consecutive_boot_failures += 1;
                        state.last_boot_error = Some(error.to_string());
                        state.boot_failing()
                    };
                    if let Some(error) = failing {
                        pool.fail_waiters(error);
                    } else {
                        pool.replenish();
                        pool.grow_for_waiters();
                    }
                }
            }
            pool.changed();
        });
    }

    fn fail_waiters(&self, error: PoolError) {
        let waiters: Vec<Waiting> = {
            let mut state = self.inner.state.lock().expect("pool lock");
            let incoming = state.booting + state.reverting;
            if incoming > 0 {
                return;
            }
            state.waiters.drain(..).collect()
        };
        let message = error.to_string();
        for waiter in waiters {
            let _ = waiter.tx.send(Err(PoolError::BootFailing {
                failures: MAX_CONSECUTIVE_BOOT_FAILURES,
                last_error: message.clone(),
            }));
        }
    }

    /// Gives a ready VM to the first waiter, or parks it as idle. `from` is
    /// the state the VM leaves; it is left under the same lock that places the
    /// VM, so the VM is never uncounted — an acquire in between would see the
    /// pool below `max_size` and boot one VM too many.
    async fn offer(&self, mut vm: Vm, from: Counted) {
        let mut leaving = Some(from);
        loop {
            let waiter = {
                let mut state = self.inner.state.lock().expect("pool lock");
                match leaving.take() {
                    Some(Counted::Booting) => state.booting -= 1,
                    Some(Counted::Reverting) => state.reverting -= 1,
                    Some(Counted::Leased) => state.leased -= 1,
                    None => {}
                }
                if state.shutting_down {
                    state.destroyed += 1;
                    None
                } else if let Some(waiter) = state.waiters.pop_front() {
                    state.leased += 1;
                    Some(waiter)
                } else {
                    state.idle.push_back(vm);
                    drop(state);
                    self.changed();
                    return;
                }
            };
            let Some(waiter) = waiter else {
                let _ = vm.destroy_because("shutdown").await;
                self.changed();
                return;
            };
            match waiter.tx.send(Ok(vm)) {
                Ok(()) => return,
                Err(Ok(returned)) => {
                    // That caller gave up; try the next one.
                    leaving = Some(Counted::Leased);
                    vm = returned;
                }
                Err(Err(_)) => unreachable!("we sent Ok"),
            }
        }
    }

    /// Takes a VM back from a lease: revert (or recycle/destroy) and re-offer.
    async fn take_back(&self, mut vm: Vm, uses: u64) -> ReleaseOutcome {
        {
            let mut state = self.inner.state.lock().expect("pool lock");
            state.leased -= 1;
            state.reverting += 1;
        }
        emit(Event::VmReleased {
            pool: self.inner.id.clone(),
            vm: vm.id().to_string(),
        });
        self.publish_status();
        vm.sample_resources();
        let config = &self.inner.config;
        let worn_out = config.max_uses.is_some_and(|max| uses >= max)
            || config.ttl.is_some_and(|ttl| vm.age() >= ttl);
        let shutting_down = self.inner.state.lock().expect("pool lock").shutting_down;
        let outcome = if shutting_down || worn_out {
            let _ = vm
                .destroy_because(if shutting_down {
                    "shutdown"
                } else {
                    "recycled"
                })
                .await;
            ReleaseOutcome::Recycled
        } else {
            let reverted = match vm.delete_user_snapshots().await {
                Ok(_) => vm.revert().await,
                Err(error) => Err(error),
            };
            // Warm the guest's code up now, off the next test's path.
            let reverted = match reverted {
                Ok(timings) => vm.warm_up().await.map(|_| timings),
                Err(error) => Err(error),
            };
            match reverted {
                Ok(timings) => match vm.health_check().await {
                    Ok(()) => {
                        self.offer(vm, Counted::Reverting).await;
                        self.changed();
                        return ReleaseOutcome::Reverted(timings);
                    }
                    Err(error) => self.discard(vm, &error).await,
                },
                Err(error) => self.discard(vm, &error).await,
            }
        };
        {
            let mut state = self.inner.state.lock().expect("pool lock");
            state.reverting -= 1;
            state.destroyed += 1;
            if matches!(outcome, ReleaseOutcome::Destroyed(_)) {
                state.failed += 1;
            }
        }
        self.replenish();
        self.grow_for_waiters();
        self.changed();
        outcome
    }

    async fn discard(&self, vm: Vm, error: &VmError) -> ReleaseOutcome {
        tracing::warn!(vm = vm.id(), %error, "VM failed after use; destroying it");
        emit(Event::VmCrashed {
            vm: vm.id().to_string(),
            error: error.to_string(),
        });
        self.inner
            .state
            .lock()
            .expect("pool lock")
            .uses
            .remove(vm.id());
        let _ = vm.destroy_because("broken").await;
        ReleaseOutcome::Destroyed(error.to_string())
    }
}

/// The counter a VM is in while it is not idle (see [`VmPool::offer`]).
#[derive(Debug, Clone, Copy)]
enum Counted {
    Booting,
    Reverting,
    Leased,
}

/// A VM held by a caller. Dereferences to [`Vm`]. Dropping it gives the VM
/// back (reverted in the background); [`Lease::release`] does the same and
/// lets the caller learn the outcome.
pub struct Lease {
    vm: Option<Vm>,
    pool: VmPool,
    waited: Duration,
    uses: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("vm", &self.vm.as_ref().map(Vm::id))
            .field("waited", &self.waited)
            .finish()
    }
}

impl Lease {
    /// How long `acquire` waited for this VM.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// How many leases this VM has served, this one included.
    pub fn uses(&self) -> u64 {
        self.uses
    }

    /// Gives the VM back; the revert runs in the background and its outcome
    /// arrives on the returned channel (drop it if you do not care).
    pub fn release(mut self) -> oneshot::Receiver<ReleaseOutcome> {
        let (tx, rx) = oneshot::channel();
        if let Some(vm) = self.vm.take() {
            self.spawn_take_back(vm, Some(tx));
        }
        rx
    }

    fn spawn_take_back(&self, vm: Vm, report: Option<oneshot::Sender<ReleaseOutcome>>) {
        let pool = self.pool.clone();
        let uses = self.uses;
        self.pool.inner.runtime.spawn(async move {
            let outcome = pool.take_back(vm, uses).await;
            if let Some(report) = report {
                let _ = report.send(outcome);
            }
        });
    }
}

impl Deref for Lease {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        self.vm.as_ref().expect("lease holds a VM until released")
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("lease holds a VM until released")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.spawn_take_back(vm, None);
        }
    }
}
