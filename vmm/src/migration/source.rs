//! The sending side of a live migration: iterative pre-copy of guest memory from the dirty log
//! while the guest runs, then stop-and-copy of the last pages and the machine state.
//!
//! 1. Hello: the destination checks it can host the VM and answers `Ack 0`.
//! 2. Pass 0: every non-zero page (the destination's memory starts zeroed), guest running.
//! 3. Passes 1..: the pages the guest dirtied during the previous pass, until what is left
//!    would take less than the allowed downtime to send at the measured rate and another pass
//!    would not shrink it much (a smaller final copy is a shorter pause), or the passes run out.
//! 4. Freeze (vCPUs parked, device events held), send the last dirty pages, the state and
//!    `Commit`; the destination restores, answers `Ack`, and runs. This VM then ends.
//!
//! Any failure before the `Ack` — the destination dies, the link breaks, it refuses — leaves
//! this VM running (resumed, its dirty pages given back) and the migration can be retried.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::wire::{
    self, Hello, Message, MessageReader, MessageWriter, PageBatch, Purpose, BATCH_PAGES,
};
use crate::microvm::{freeze_deadline, FreezeHandle, FreezeTerms};
use crate::vstate::dirty::DirtyConsumer;
use crate::vstate::memory::{PageMap, PAGE_SIZE};
use crate::vstate::vm::{Vm, VmError};

/// Default largest pause of the guest.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// Passes over the dirty log before stopping the guest regardless.
pub const MAX_PASSES: u32 = 30;
/// Dirty pages few enough to stop the guest for, however the passes go.
const SMALL_FINAL_COPY: usize = 64;
/// The sequence number of the final `Commit` (pre-copy passes sync with 1..=`MAX_PASSES`).
const COMMIT_SEQ: u64 = u64::MAX;
/// How long the destination may take to answer while the guest runs here (once it is frozen,
/// the freeze's deadline bounds every wait instead).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the source stays out of the way of the moved guest after the `Ack` (see
/// [`super::CpuYield`]): long enough for the destination to start it.
const SWITCH_OVER_GRACE: Duration = Duration::from_millis(300);

/// Why a migration failed (the VM keeps running here).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination address does not resolve.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The destination cannot be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The stream broke.
    #[error("the migration stream to {addr} broke: {source}")]
    Wire {
        /// The destination.
        addr: String,
        /// The transport error.
        source: wire::WireError,
    },
    /// The destination refused or failed.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The destination answered something else than expected.
    #[error("unexpected answer from the destination: {0}")]
    Protocol(String),
    /// The dirty log could not be read.
    #[error(transparent)]
    DirtyLog(#[from] VmError),
    /// The VM could not be frozen.
    #[error("cannot stop the VM for the final copy: {0}")]
    Freeze(String),
    /// The final copy and the destination's `Ack` did not fit in the freeze's deadline: the
    /// VM was resumed here.
    #[error(
        "the destination did not acknowledge within the freeze's deadline of {} ms: the VM \
         runs on here",
        .0.as_millis()
    )]
    FreezeDeadline(Duration),
}

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// `host:port` of `vmr receive`.
    pub destination: String,
    /// The largest pause of the guest to aim for.
    pub max_downtime: Duration,
    /// Compress pages with zstd.
    pub compress: bool,
}

/// What a finished migration took.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// From pausing the guest here to the destination's acknowledgement (it runs then).
    pub downtime: Duration,
    /// From connecting to the acknowledgement.
    pub total: Duration,
    /// Pre-copy passes, pass 0 included.
    pub passes: u32,
    /// Pages sent, all passes.
    pub pages_sent: u64,
    /// Bytes on the wire.
    pub bytes_sent: u64,
    /// Pages sent while the guest was stopped.
    pub final_pages: u64,
}

struct Link {
    addr: String,
    /// The socket, to bound its waits (its timeouts are the socket's, shared by the clones
    /// inside `writer` and `reader`).
    stream: TcpStream,
    writer: MessageWriter<TcpStream>,
    reader: MessageReader<TcpStream>,
    /// While the guest is frozen: when the freeze ends, and how long it was allowed. No send
    /// or receive waits past it.
    deadline: Option<(Instant, Duration)>,
}

impl Link {
    fn wire_err(&self, source: wire::WireError) -> MigrationError {
        match self.deadline {
            Some((deadline, allowed)) if Instant::now() >= deadline => {
                MigrationError::FreezeDeadline(allowed)
            }
            _ => MigrationError::Wire {
                addr: self.addr.clone(),
                source,
            },
        }
    }

    /// While frozen, bounds the socket's next waits by what is left of the freeze.
    fn arm(&self) -> Result<(), MigrationError> {
        let Some((deadline, allowed)) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::FreezeDeadline(allowed));
        }
        let armed = self
            .stream
            .set_write_timeout(Some(left))
            .and_then(|()| self.stream.set_read_timeout(Some(left)));
        armed.map_err(|e| self.wire_err(e.into()))
    }

    fn send(&mut self, msg: &Message) -> Result<(), MigrationError> {
        self.arm()?;
        self.writer.send(msg).map_err(|e| self.wire_err(e))
    }

    fn send_pages(&mut self, batch: &PageBatch) -> Result<(), MigrationError> {
        self.arm()?;
        self.writer.send_pages(batch).map_err(|e| self.wire_err(e))
    }

    /// Waits for `Ack seq`.
    fn expect_ack(&mut self, seq: u64) -> Result<(), MigrationError> {
        self.arm()?;
        self.writer.flush().map_err(|e| self.wire_err(e))?;
        self.arm()?;
        match self.reader.recv().map_err(|e| self.wire_err(e))? {
            Message::Ack { seq: s } if s == seq => Ok(()),
            Message::Error(reason) => Err(MigrationError::Refused(reason)),
            other => Err(MigrationError::Protocol(format!("{other:?}"))),
        }
    }
}

/// Sends the pages listed by `pages` in batches (all-zero ones not at all if `skip_zero`);
/// returns how many.
fn send_pages(
    link: &mut Link,
    map: &PageMap<'_>,
    pages: impl Iterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    let mut batch = PageBatch::with_capacity(BATCH_PAGES);
    let mut sent = 0;
    for page in pages {
        let Some(slice) = map.page(page) else {
            continue;
        };
        batch.push_with(page, skip_zero, |buf| {
            slice.copy_to(buf);
        });
        if batch.len() >= BATCH_PAGES {
            link.send_pages(&batch)?;
            sent += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        link.send_pages(&batch)?;
        sent += batch.len() as u64;
    }
    Ok(sent)
}

/// Migrates the VM to `options.destination`. On success the VM has been told to end (it runs
/// at the destination); on failure it runs on here.
pub fn migrate(
    vm: &Vm,
    freeze: &FreezeHandle,
    config: &[u8],
    vcpus: u8,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    let addr = options
        .destination
        .to_socket_addrs()
        .map_err(|e| MigrationError::Resolve {
            addr: options.destination.clone(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| MigrationError::Resolve {
            addr: options.destination.clone(),
            reason: "no address".into(),
        })?;
    let connect_err = |source| MigrationError::Connect {
        addr: options.destination.clone(),
        source,
    };
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(connect_err)?;
    let mut link = Link {
        addr: options.destination.clone(),
        reader: MessageReader::new(stream.try_clone().map_err(connect_err)?),
        writer: MessageWriter::with_compression(
            stream.try_clone().map_err(connect_err)?,
            options.compress.then_some(wire::DEFAULT_ZSTD_LEVEL),
        ),
        stream,
        deadline: None,
    };
    let mem = vm.memory();
    let map = PageMap::new(mem);
    link.send(&Message::Hello(Hello::new(
        Purpose::Migration,
        map.pages() * PAGE_SIZE as u64,
        vcpus,
        config.to_vec(),
    )))?;
    link.expect_ack(0)?;

    // The freeze runs code this process has not run yet: in memory before the guest waits on it;
    // the thread that ends the yield after the switch-over made now, not near the pause.
    crate::prefault::own_code();
    let mut cpu_yield = super::CpuYield::prepare();
    // And the code that saves and encodes the state, run once now (the VM keeps running).
    if let Err(e) = freeze
        .rehearse()
        .and_then(|state| wire::encode_payload(&state).map_err(|e| e.to_string()))
    {
        tracing::warn!("the save's rehearsal failed (the migration goes on): {e}");
    }
    // This thread only copies from here on: the monitor's thread stops and saves the VM, and
    // the final copy runs with the guest stopped, when nothing here competes for the CPU.
    super::yield_to_guest();
    let mut report = MigrationReport::default();
    // Pass 0: everything, while the guest runs; the migration's own set of dirty pages says
    // what changed from here on (other consumers', the diff snapshots', keep theirs).
    vm.set_dirty_logging(true)?;
    let tracked = TrackedPages::register(vm);
    let consumer = tracked.consumer;
    let mut pass_start = Instant::now();
    let mut sent = send_pages(&mut link, &map, 0..map.pages(), true)?;
    report.passes = 1;
    report.pages_sent = sent;
    let mut previous_left = usize::MAX;
    loop {
        // The destination has applied this pass: nothing queues up for the guest's pause, and
        // the rate below is what the two ends achieve together.
        let seq = u64::from(report.passes) + 1;
        link.send(&Message::Sync { seq })?;
        link.expect_ack(seq)?;
        let elapsed = pass_start.elapsed().max(Duration::from_millis(1));
        let rate = sent.max(1) as f64 / elapsed.as_secs_f64(); // pages per second
        let dirty = vm.take_dirty_pages(consumer)?;
        let left = dirty.count();
        let estimate = Duration::from_secs_f64(left as f64 / rate);
        tracing::info!(
            pass = report.passes,
            sent,
            dirty = left,
            estimate_ms = estimate.as_millis() as u64,
            "migration: pre-copy pass done"
        );
        // Passes that cut what is left by a quarter or more are worth going on with: every
        // page copied now is one less to copy with the guest stopped.
        let shrinking = left > SMALL_FINAL_COPY && left < previous_left / 4 * 3;
        let fits = estimate <= options.max_downtime;
        if (fits && !shrinking) || report.passes >= MAX_PASSES {
            // Sent in the final copy, with whatever the guest writes until the freeze.
            vm.return_dirty_pages(consumer, &dirty);
            break;
        }
        previous_left = left;
        pass_start = Instant::now();
        sent = match send_pages(&mut link, &map, dirty.pages(&map), false) {
            Ok(n) => n,
            Err(e) => {
                vm.return_dirty_pages(consumer, &dirty);
                return Err(e);
            }
        };
        report.passes += 1;
        report.pages_sent += sent;
    }

    let max_freeze = freeze_deadline(options.max_downtime);
    let frozen = freeze
        .freeze(FreezeTerms {
            consumer,
            max_freeze,
        })
        .map_err(MigrationError::Freeze)?;
    let paused = frozen.since;
    // From here on, no wait on the network outlives the freeze.
    link.deadline = Some((frozen.deadline, max_freeze));
    let mut outcome = Some(frozen.outcome);
    let result = (|| {
        let saved = paused.elapsed();
        let n = send_pages(&mut link, &map, frozen.dirty.pages(&map), false)?;
        super::write_page_digest(&map, "source");
        let pages_sent = paused.elapsed();
        let state = wire::encode_payload(&frozen.state)
            .map_err(|e| MigrationError::Protocol(format!("cannot encode the state: {e}")))?;
        link.send(&Message::State(state))?;
        link.send(&Message::Commit { seq: COMMIT_SEQ })?;
        let committed = paused.elapsed();
        link.expect_ack(COMMIT_SEQ)?;
        let acked = paused.elapsed();
        // The guest runs at the destination now. Decide the move at once, before anything
        // else: giving the CPU away first let the freeze's deadline pass on a busy host (the
        // monitor then resumed the VM here while it ran there). Then what is left here
        // (waking the monitor thread, the report, the teardown of this VM) lets the moved
        // guest, maybe on this host's CPUs, start first.
        let notice = outcome
            .take()
            .expect("the outcome is decided once")
            .moved()
            .map_err(|_| {
                tracing::error!(
                    "the destination acknowledged after the freeze's deadline: the VM was \
                     resumed here, and the destination may run it too"
                );
                MigrationError::FreezeDeadline(max_freeze)
            })?;
        cpu_yield.moved(SWITCH_OVER_GRACE);
        drop(notice);
        tracing::info!(
            final_pages = n,
            freeze_us = saved.as_micros() as u64,
            pages_us = (pages_sent - saved).as_micros() as u64,
            state_us = (committed - pages_sent).as_micros() as u64,
            ack_us = (acked - committed).as_micros() as u64,
            "migration: final copy done"
        );
        Ok::<_, MigrationError>((n, acked))
    })();
    // The monitor thread ends this VM once moved, unless the deadline passed first and it
    // resumed it. Then the destination, which runs the guest once it has sent its `Ack`, may
    // run it as well: two copies, until the standby-staging work has it wait for a go-ahead.
    match result {
        Ok((n, downtime)) => {
            report.downtime = downtime;
            report.final_pages = n;
            report.pages_sent += n;
            report.bytes_sent = link.writer.bytes_sent();
            report.total = t0.elapsed();
            Ok(report)
        }
        Err(e) => {
            // A no-op once the deadline passed (the monitor gave the pages back itself).
            if let Some(outcome) = outcome {
                outcome.failed(frozen.dirty);
            }
            Err(e)
        }
    }
}

/// The migration's registration as a consumer of dirty pages, for as long as it runs.
struct TrackedPages<'a> {
    vm: &'a Vm,
    consumer: DirtyConsumer,
}

impl<'a> TrackedPages<'a> {
    fn register(vm: &'a Vm) -> Self {
        Self {
            vm,
            consumer: vm.register_dirty_consumer(),
        }
    }
}

impl Drop for TrackedPages<'_> {
    fn drop(&mut self) {
        self.vm.unregister_dirty_consumer(self.consumer);
    }
}
