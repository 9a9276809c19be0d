//! The receiving side of a live migration (`vmr receive`): accepts a migration stream, fills
//! fresh guest memory with its pages, restores the machine from its state on `Commit`, answers
//! `Ack` and hands the VM over to run. A stream that breaks or is refused before `Commit`
//! leaves nothing behind, and the next connection is accepted.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::wire::{self, Message, MessageReader, MessageWriter, Purpose, PROTOCOL_VERSION};
use crate::builder::{restore_from_state, BuildError, EmptyVm, PreparedVm, RestoreOptions};
use crate::config::{SerialConfig, VmConfig};
use crate::microvm::{MicroVm, RunError};
use crate::snapshot::MicroVmState;
use crate::vstate::memory::{self, PageMap, PAGE_SIZE};
use crate::vstate::vcpu::ExitReason;
use crate::vstate::vm::ClockRestore;

/// An all-zero page.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// How long the source may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Accepting a connection failed.
    #[error("cannot accept a migration: {0}")]
    Accept(std::io::Error),
    /// The thread that receives pages cannot be started.
    #[error("cannot start the thread receiving the migration: {0}")]
    Thread(std::io::Error),
    /// The thread that receives pages panicked.
    #[error("the thread receiving the migration panicked")]
    ThreadPanicked,
    /// The stream broke.
    #[error("the migration stream broke: {0}")]
    Wire(#[from] wire::WireError),
    /// The source sent something out of order.
    #[error("unexpected message from the source: {0}")]
    Protocol(String),
    /// The source gave up.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// The VM cannot be hosted here.
    #[error("cannot host this VM: {0}")]
    Unfit(String),
    /// Guest memory cannot be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The VM cannot be created here.
    #[error("cannot create the VM here: {0}")]
    Prepare(BuildError),
    /// A page lies outside guest memory.
    #[error("page {0} is outside guest memory")]
    PageOutOfRange(u64),
    /// The state does not decode.
    #[error("the machine state does not decode: {0}")]
    State(String),
    /// The machine cannot be restored from the state.
    #[error("cannot restore the VM: {0}")]
    Restore(#[from] BuildError),
    /// The restored VM's vCPUs cannot be started.
    #[error("cannot start the received VM: {0}")]
    Start(RunError),
}

/// What a received migration took.
#[derive(Debug, Clone)]
pub struct Received {
    /// Pages received.
    pub pages: u64,
    /// From the first byte to the acknowledgement.
    pub total: Duration,
    /// From `Commit` to the acknowledgement (restore time).
    pub restore: Duration,
}

/// Accepts migrations on `listener` until one completes; returns the restored VM, its vCPUs
/// running (the source has ended).
pub fn receive(
    listener: &TcpListener,
    options: &RestoreOptions,
) -> Result<(MicroVm, Received), ReceiveError> {
    if let Err(e) = rehearse_switch_over(options) {
        tracing::warn!("the switch-over's rehearsal failed (migrations go on): {e}");
    }
    loop {
        // Made while waiting, out of the migration's way; the code that will restore the
        // machine brought into memory too (and run once, above), out of the switch-over's.
        let empty = EmptyVm::new(options.allow_pvm).map_err(ReceiveError::Prepare)?;
        crate::prefault::own_code();
        let (stream, peer) = listener.accept().map_err(ReceiveError::Accept)?;
        tracing::info!(%peer, "incoming migration");
        match receive_one(stream, options, empty) {
            Ok(done) => return Ok(done),
            Err(e) => tracing::warn!(%peer, "incoming migration failed, waiting for another: {e}"),
        }
    }
}

fn receive_one(
    stream: TcpStream,
    options: &RestoreOptions,
    empty: EmptyVm,
) -> Result<(MicroVm, Received), ReceiveError> {
    let t0 = Instant::now();
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(ReceiveError::Accept)?;
    let _ = stream.set_nodelay(true);
    let mut writer = MessageWriter::new(stream.try_clone().map_err(ReceiveError::Accept)?);
    // The receiving thread's own, for its answers to `Sync`s; this thread's answers only
    // before and after it.
    let rx_writer = MessageWriter::new(stream.try_clone().map_err(ReceiveError::Accept)?);
    let reader = MessageReader::new(stream);
    let result = receive_stream(reader, rx_writer, &mut writer, options, empty, t0);
    if let Err(e) = &result {
        // Tell the source why, if the link still works.
        let _ = writer.send(&Message::Error(e.to_string()));
        let _ = writer.flush();
    }
    result
}

fn receive_stream(
    mut reader: MessageReader<TcpStream>,
    mut rx_writer: MessageWriter<TcpStream>,
    writer: &mut MessageWriter<TcpStream>,
    options: &RestoreOptions,
    empty: EmptyVm,
    t0: Instant,
) -> Result<(MicroVm, Received), ReceiveError> {
    let hello = match reader.recv()? {
        Message::Hello(hello) => hello,
        other => return Err(ReceiveError::Protocol(format!("{other:?} before Hello"))),
    };
    if !PROTOCOL_VERSION.reads(hello.protocol) {
        return Err(ReceiveError::Unfit(format!(
            "the source speaks protocol version {}, this vmr speaks {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    if hello.purpose != Purpose::Migration {
        return Err(ReceiveError::Unfit(format!(
            "a {:?} stream sent to `vmr receive`",
            hello.purpose
        )));
    }
    if hello.page_size as usize != PAGE_SIZE || hello.mem_bytes % PAGE_SIZE as u64 != 0 {
        return Err(ReceiveError::Unfit(format!(
            "page size {} / memory {} bytes",
            hello.page_size, hello.mem_bytes
        )));
    }
    if hello.vcpus == 0 {
        return Err(ReceiveError::Unfit("a VM of no vCPUs".into()));
    }
    // The VM is built now, while the guest still runs at the source: the switch-over then
    // only restores state into it.
    let mem = memory::create_guest_memory(hello.mem_bytes)?;
    let prepared =
        PreparedVm::in_vm(empty, hello.vcpus, mem, false).map_err(ReceiveError::Prepare)?;
    let map = PageMap::new(prepared.memory());
    reader.set_max_pages(map.pages());
    writer.send(&Message::Ack { seq: 0 })?;
    writer.flush()?;
    tracing::info!(
        mem_mib = hello.mem_bytes >> 20,
        vcpus = hello.vcpus,
        protocol = %PROTOCOL_VERSION,
        source_protocol = %hello.protocol,
        "migration accepted"
    );

    // Received on a thread of its own, which gives way to the guest (still running at the
    // source, maybe on this host's CPUs); this one, handed what came at `Commit`, will run the
    // VM. That thread then ends at idle priority: its exit (2.2 ms of CPU, traced in the lab)
    // waits until neither the switch-over nor the guest needs the CPU.
    let (done, handed_over) = mpsc::sync_channel(1);
    let memory = prepared.memory().clone();
    std::thread::Builder::new()
        .name("migration-rx".into())
        .spawn(move || {
            super::yield_to_guest();
            let map = PageMap::new(&memory);
            let _ = done.send(receive_until_commit(&mut reader, &mut rx_writer, &map));
            super::give_way_for_good();
        })
        .map_err(ReceiveError::Thread)?;
    let (pages, state, commit) = handed_over
        .recv()
        .map_err(|_| ReceiveError::ThreadPanicked)??;
    let committed = Instant::now();
    super::write_page_digest(&map, "destination");
    // Decoded here, on the thread that runs the VM: the guest is stopped at the source by now,
    // and the receiving thread gives way to everything else.
    let state: MicroVmState = wire::decode_payload(
        &state.ok_or_else(|| ReceiveError::Protocol("Commit before State".into()))?,
    )
    .map_err(|e| ReceiveError::State(e.to_string()))?;
    let mut microvm = restore_from_state(
        &state,
        || Ok(prepared),
        options,
        None,
        ClockRestore::CatchUp,
    )?;
    // The vCPU threads take the vCPUs now and wait: after the Ack (the source has stopped for
    // good) the guest runs here at once, before anything else.
    let restored = committed.elapsed();
    microvm.launch_vcpus().map_err(ReceiveError::Start)?;
    let launched = committed.elapsed();
    let acked = writer
        .send(&Message::Ack { seq: commit })
        .and_then(|()| writer.flush());
    if let Err(e) = acked {
        microvm.abandon_vcpus(ExitReason::Error(format!("the Ack was not sent: {e}")));
        return Err(e.into());
    }
    let acked_after = committed.elapsed();
    microvm.release_vcpus();
    tracing::info!(
        restore_us = restored.as_micros() as u64,
        launch_us = (launched - restored).as_micros() as u64,
        ack_us = (acked_after - launched).as_micros() as u64,
        "migration committed and acknowledged, the guest runs here"
    );
    Ok((
        microvm,
        Received {
            pages,
            total: t0.elapsed(),
            restore: acked_after,
        },
    ))
}

/// Why [`rehearse_switch_over`] failed.
#[derive(Debug, thiserror::Error)]
enum RehearsalError {
    #[error("cannot map the scratch VM's memory: {0}")]
    Memory(memory::MemoryError),
    #[error("cannot create the scratch VM: {0}")]
    Prepare(BuildError),
    #[error("cannot save the scratch VM's state: {0}")]
    Save(BuildError),
    #[error("cannot encode the state: {0}")]
    Encode(wire::WireError),
    #[error("cannot decode the state: {0}")]
    Decode(wire::WireError),
    #[error("cannot restore the scratch VM: {0}")]
    Restore(BuildError),
    #[error("cannot launch the scratch VM's vCPU threads: {0}")]
    Launch(RunError),
}

/// Guest memory of the scratch VM of [`rehearse_switch_over`], which never runs.
const SCRATCH_MEM_BYTES: u64 = 2 << 20;

/// Runs, while waiting for a migration, the code the switch-over will run with the guest
/// stopped, on a scratch VM of one vCPU: its own state as KVM created it, with a configuration
/// and the legacy devices at power-on, is encoded, decoded and restored into a whole machine
/// (devices, buses, event loop), whose vCPU thread is launched and then ended before the guest
/// runs; the machine is dropped. Code runs slower the first time a process runs it; in the
/// lab, where an emulated CPU translates it then, decoding the state took 4.4-10.1 ms the first
/// time and 0.6-0.8 ms the second, building the devices about 3 ms (README). Virtio devices
/// are not rehearsed: they would open the VM's TAPs and images.
fn rehearse_switch_over(options: &RestoreOptions) -> Result<(), RehearsalError> {
    let _span = tracing::info_span!("rehearsal").entered();
    let config = VmConfig {
        vcpus: 1,
        mem_mib: SCRATCH_MEM_BYTES >> 20,
        serial: SerialConfig::None,
        allow_pvm: options.allow_pvm,
        ..VmConfig::new(PathBuf::new())
    };
    let mem = memory::create_guest_memory(SCRATCH_MEM_BYTES).map_err(RehearsalError::Memory)?;
    let scratch = PreparedVm::new(config.vcpus, mem, false, options.allow_pvm)
        .map_err(RehearsalError::Prepare)?;
    let state = scratch
        .initial_state(config)
        .map_err(RehearsalError::Save)?;
    let encoded = wire::encode_payload(&state).map_err(RehearsalError::Encode)?;
    let state: MicroVmState = wire::decode_payload(&encoded).map_err(RehearsalError::Decode)?;
    let scratch_options = RestoreOptions {
        serial: SerialConfig::None,
        allow_pvm: options.allow_pvm,
        ..RestoreOptions::default()
    };
    let mut machine = restore_from_state(
        &state,
        || Ok(scratch),
        &scratch_options,
        None,
        ClockRestore::CatchUp,
    )
    .map_err(RehearsalError::Restore)?;
    machine.launch_vcpus().map_err(RehearsalError::Launch)?;
    machine.abandon_vcpus(ExitReason::Error("a rehearsal".into()));
    Ok(())
}

/// Applies pages, keeps the (encoded) state and answers `Sync`s until `Commit`; returns the
/// pages received, the state and the `Commit`'s sequence number.
fn receive_until_commit(
    reader: &mut MessageReader<TcpStream>,
    writer: &mut MessageWriter<TcpStream>,
    map: &PageMap<'_>,
) -> Result<(u64, Option<Vec<u8>>, u64), ReceiveError> {
    let mut pages = 0u64;
    let mut state = None;
    let commit = loop {
        match reader.recv()? {
            Message::Pages(batch) => {
                for (page, data) in batch.iter() {
                    let slice = map.page(page).ok_or(ReceiveError::PageOutOfRange(page))?;
                    match data {
                        Some(data) => slice.copy_from(data),
                        None => slice.copy_from(&ZERO_PAGE[..]),
                    }
                    pages += 1;
                }
            }
            Message::State(bytes) => state = Some(bytes),
            Message::Sync { seq } => {
                writer.send(&Message::Ack { seq })?;
                writer.flush()?;
            }
            Message::Commit { seq } => break seq,
            Message::Error(reason) => return Err(ReceiveError::Aborted(reason)),
            other => return Err(ReceiveError::Protocol(format!("{other:?}"))),
        }
    };
    Ok((pages, state, commit))
}
