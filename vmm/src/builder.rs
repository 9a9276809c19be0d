//! Builds a microVM from a [`VmConfig`]: guest memory, kernel, initrd, devices, boot
//! structures and vCPUs, in that order, so that every input is checked before KVM is touched.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::SubscriberOps;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot, layout, mptable, regs};
use crate::config::{ConfigError, NetConfig, SerialConfig, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialOut, SerialRestoreError};
use crate::devices::virtio::block::{Block, BlockError, BlockRestoreArgs};
use crate::devices::virtio::mmio::{MmioRestoreArgs, MmioRestoreError, MmioTransport};
use crate::devices::virtio::net::{Net, NetError, NetRestoreArgs};
use crate::devices::virtio::{VirtioDevice, VirtioDeviceState, VirtioInterrupt};
use crate::devices::DevicesState;
use crate::hostcheck::{self, HostError};
use crate::loader::{self, LoaderError};
use crate::microvm::{Devices, EventLoop, ExitHandler, MicroVm, Subscriber, VirtioSlot};
use crate::persist::Persist;
use crate::snapshot::{LoadedSnapshot, MicroVmState, ParentRef, SnapshotError};
use crate::vstate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VmRunState};
use crate::vstate::vm::{ClockRestore, Vm, VmError};

/// Arguments the monitor always passes to the kernel, before the user's.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Errors from building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The serial output file cannot be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A disk cannot be attached.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A network device cannot be attached.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The host cannot boot a stock Linux guest.
    #[error(transparent)]
    Host(#[from] HostError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("--vcpus {asked}: this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// vCPUs asked.
        asked: u8,
        /// KVM's limit.
        max: usize,
    },
    /// More devices than interrupt lines.
    #[error("too many devices: no interrupt line left")]
    OutOfIrqs,
    /// Creating an EventFd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The VM could not be created or set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Registering a queue ioeventfd failed.
    #[error("cannot register the queue notification of a virtio device: {0}")]
    RegisterIoevent(kvm_ioctls::Error),
    /// Setting up the event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// Writing the boot structures failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Writing the page tables or GDT failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A vCPU could not be created or configured.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The snapshot's files are bad.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A virtio transport cannot be restored.
    #[error(transparent)]
    MmioState(#[from] MmioRestoreError),
    /// The snapshot's serial port state is bad.
    #[error(transparent)]
    SerialState(#[from] SerialRestoreError),
    /// The power-on state of the legacy devices cannot be made.
    #[error("cannot make the devices' power-on state: {0}")]
    PowerOnDevices(std::io::Error),
    /// The snapshot's vCPU states are not in vCPU order.
    #[error("the snapshot holds the state of vCPU {saved} where vCPU {position}'s belongs")]
    SnapshotVcpuOrder {
        /// The vCPU whose state belongs there.
        position: u8,
        /// The vCPU whose state is there.
        saved: u8,
    },
    /// The snapshot has a different number of vCPU states than its configuration says.
    #[error("the snapshot holds {saved} vCPU states for a VM of {config} vCPUs")]
    SnapshotVcpus {
        /// vCPU states saved.
        saved: usize,
        /// vCPUs configured.
        config: u8,
    },
}

fn serial_output(config: &SerialConfig) -> Result<SerialOut, BuildError> {
    Ok(match config {
        // The serial device hands over whole lines (`ConsoleOut`) and flushes after each.
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::File(path) => {
            Box::new(File::create(path).map_err(|source| BuildError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
        SerialConfig::None => Box::new(std::io::sink()) as Box<dyn Write + Send>,
    })
}

/// A virtio device, both as a device model and as an event-loop subscriber.
struct VirtioEntry {
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Subscriber,
}

fn virtio_entry<D: VirtioDevice + 'static>(device: D) -> VirtioEntry {
    let device = Arc::new(Mutex::new(device));
    VirtioEntry {
        device: device.clone(),
        subscriber: device,
    }
}

/// The monitor's side of a VM before its vCPUs exist: buses, event loop, devices.
struct Machine {
    kvm: Kvm,
    vm: Vm,
    run_state: Arc<VmRunState>,
    event_loop: EventLoop,
    pio_bus: Bus,
    mmio_bus: Bus,
    devices: Devices,
    /// `virtio_mmio.device=` arguments announcing the virtio devices.
    virtio_cmdline: Vec<String>,
}

/// A KVM VM created before anything is known of what it will run: `/dev/kvm` opened on a
/// host checked to run the guest, `KVM_CREATE_VM` done. A migration's destination makes one
/// while it waits, as QEMU's `-incoming` does: creating a VM has KVM announce it (a uevent),
/// and on a busy host the handling of that (udev: traced in the lab at half a second of its
/// only CPU) would otherwise compete with the guest still running at the source.
pub struct EmptyVm {
    kvm: Kvm,
    fd: VmFd,
}

impl EmptyVm {
    /// Creates the VM.
    pub fn new(allow_pvm: bool) -> Result<Self, BuildError> {
        hostcheck::check_linux_guest_support(allow_pvm)?;
        let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Self { kvm, fd })
    }

    /// Gives the VM `mem` (KVM's dirty log on if `dirty_logging`), its irqchip and PIT, for
    /// `vcpus` vCPUs (refused if more than KVM supports).
    fn fill(
        self,
        vcpus: u8,
        mem: GuestMemoryMmap,
        dirty_logging: bool,
    ) -> Result<(Kvm, Vm), BuildError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(BuildError::TooManyVcpus { asked: vcpus, max });
        }
        let mut vm = Vm::with_fd(self.fd, mem, dirty_logging)?;
        vm.setup_irqchip()?;
        Ok((self.kvm, vm))
    }
}

/// A VM made before its state is known: `/dev/kvm` opened and checked, the VM with its guest
/// memory, irqchip and PIT, and its vCPUs, none of them configured, each with its thread. A
/// migration's destination prepares one as it accepts the migration, so that the switch-over
/// only restores state ([`restore_from_state`]); a restore from a snapshot prepares one once
/// the snapshot's host resources are open.
pub struct PreparedVm {
    kvm: Kvm,
    vm: Vm,
    vcpus: Vec<Vcpu>,
}

impl PreparedVm {
    /// Creates a VM of `vcpus` vCPUs over `mem`, with KVM's dirty log on from the start if
    /// `dirty_logging`.
    pub fn new(
        vcpus: u8,
        mem: GuestMemoryMmap,
        dirty_logging: bool,
        allow_pvm: bool,
    ) -> Result<Self, BuildError> {
        Self::in_vm(EmptyVm::new(allow_pvm)?, vcpus, mem, dirty_logging)
    }

    /// As [`PreparedVm::new`], in the VM `empty` created beforehand.
    pub fn in_vm(
        empty: EmptyVm,
        vcpus: u8,
        mem: GuestMemoryMmap,
        dirty_logging: bool,
    ) -> Result<Self, BuildError> {
        let (kvm, vm) = empty.fill(vcpus, mem, dirty_logging)?;
        let vcpus = (0..vcpus)
            .map(|index| {
                // Buses come with the devices, at restore.
                let mut vcpu = Vcpu::new(&vm, index, Bus::new(), Bus::new())?;
                vcpu.spawn_thread()?;
                Ok(vcpu)
            })
            .collect::<Result<_, VcpuError>>()?;
        Ok(Self { kvm, vm, vcpus })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// This VM's state as created: KVM's initial state of the VM and of each vCPU, the legacy
    /// devices at power-on and `config` (for a rehearsal of a restore).
    pub fn initial_state(&self, config: VmConfig) -> Result<MicroVmState, BuildError> {
        Ok(MicroVmState {
            config,
            vm: self.vm.save_state()?,
            vcpus: self
                .vcpus
                .iter()
                .map(Vcpu::save_state)
                .collect::<Result<_, _>>()?,
            devices: DevicesState::power_on().map_err(BuildError::PowerOnDevices)?,
        })
    }
}

/// Puts the legacy devices (new, or restored from `saved`) and the virtio devices of `vm` on
/// their buses.
fn assemble(
    kvm: Kvm,
    vm: Vm,
    serial_out: SerialOut,
    virtio: Vec<VirtioEntry>,
    saved: Option<&DevicesState>,
) -> Result<Machine, BuildError> {
    let mem = vm.memory().clone();
    let run_state = Arc::new(VmRunState::new().map_err(BuildError::EventFd)?);
    let mut event_loop = EventLoop::new().map_err(BuildError::EventLoop)?;
    let mut pio_bus = Bus::new();
    let mut mmio_bus = Bus::new();

    let serial_irq = vm.irq_line(layout::SERIAL_IRQ);
    let serial = match saved {
        Some(state) => SerialDevice::restore((serial_irq, serial_out), &state.serial)?,
        None => SerialDevice::new(serial_irq, serial_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio_bus.insert(serial.clone(), layout::SERIAL_PORT, 8)?;

    let i8042 = match saved {
        Some(state) => match I8042::restore(run_state.clone(), &state.i8042) {
            Ok(dev) => dev,
            Err(never) => match never {},
        },
        None => I8042::new(run_state.clone()),
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    pio_bus.insert(i8042.clone(), layout::I8042_PORT, 5)?;
    event_loop.add_subscriber(Arc::new(Mutex::new(ExitHandler::new(run_state.clone()))));

    let mut slots = Vec::new();
    let mut virtio_cmdline = Vec::new();
    for (i, entry) in virtio.into_iter().enumerate() {
        let base = layout::MMIO_DEVICES_START + i as u64 * layout::MMIO_DEVICE_SIZE;
        let irq = layout::VIRTIO_IRQ_START + i as u32;
        if irq > layout::IRQ_MAX {
            return Err(BuildError::OutOfIrqs);
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
        let transport = match saved.and_then(|s| s.virtio.get(i)) {
            Some(state) => {
                let args = MmioRestoreArgs {
                    mem: mem.clone(),
                    interrupt,
                    device: entry.device,
                };
                MmioTransport::restore(args, state)?
            }
            None => MmioTransport::new(mem.clone(), entry.device, interrupt),
        };
        transport
            .register_ioevents(vm.fd(), base)
            .map_err(BuildError::RegisterIoevent)?;
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(transport.clone(), base, layout::MMIO_DEVICE_SIZE)?;
        event_loop.add_subscriber(entry.subscriber);
        virtio_cmdline.push(MmioTransport::cmdline_arg(base, irq));
        slots.push(VirtioSlot {
            base,
            irq,
            transport,
        });
    }
    vcpu::register_kick_handler()?;
    Ok(Machine {
        kvm,
        vm,
        run_state,
        event_loop,
        pio_bus,
        mmio_bus,
        devices: Devices {
            serial,
            i8042,
            virtio: slots,
        },
        virtio_cmdline,
    })
}

impl Machine {
    fn into_microvm(self, vcpus: Vec<Vcpu>, config: VmConfig, last: Option<ParentRef>) -> MicroVm {
        MicroVm::new(
            self.kvm,
            self.vm,
            vcpus,
            self.devices,
            self.event_loop,
            self.run_state,
            config,
            last,
        )
    }
}

/// Builds the microVM described by `config`, ready to [`MicroVm::run`].
pub fn build_microvm(config: &VmConfig) -> Result<MicroVm, BuildError> {
    config.validate()?;
    let mem = memory::create_guest_memory(config.mem_mib << 20)?;
    let kernel = loader::load_kernel(&mem, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| loader::load_initrd(&mem, kernel.end, path))
        .transpose()?;

    // Host resources, opened before KVM so that bad input is reported on any host.
    let mut virtio: Vec<VirtioEntry> = Vec::new();
    for disk in config.all_disks() {
        virtio.push(virtio_entry(Block::new(&disk.path, disk.read_only)?));
    }
    for net in &config.net {
        let mac = net.validate()?;
        virtio.push(virtio_entry(Net::new(&net.tap, mac.map(|m| m.0))?));
    }
    let serial_out = serial_output(&config.serial)?;

    let (kvm, vm) = EmptyVm::new(config.allow_pvm)?.fill(config.vcpus, mem.clone(), false)?;
    let machine = assemble(kvm, vm, serial_out, virtio, None)?;

    let mut cmdline = String::from(BASE_CMDLINE);
    for arg in &machine.virtio_cmdline {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    if config.rootfs.is_some() {
        cmdline.push_str(" root=/dev/vda rw");
    }
    if let Some(extra) = &config.cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    tracing::debug!(%cmdline, "kernel command line");
    let cmdline = loader::build_cmdline(&cmdline)?;
    let cmdline_size = loader::write_cmdline(&mem, &cmdline)?;
    boot::write_boot_params(&mem, kernel.setup_header, cmdline_size, initrd)?;
    mptable::setup_mptable(&mem, config.vcpus)?;
    regs::write_boot_structures(&mem)?;

    let mut vcpus = Vec::with_capacity(config.vcpus.into());
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(
            &machine.vm,
            index,
            machine.pio_bus.clone(),
            machine.mmio_bus.clone(),
        )?;
        vcpu.configure_cpu(&machine.kvm, config.vcpus)?;
        vcpu.configure_boot(kernel.entry.0, layout::ZERO_PAGE_START)?;
        vcpus.push(vcpu);
    }
    Ok(machine.into_microvm(vcpus, config.clone(), None))
}

/// What a restore may change: the host side of the VM.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// TAPs for the network devices, in order (the saved TAP names where absent).
    pub net: Vec<NetConfig>,
    /// Where the console goes.
    pub serial: SerialConfig,
    /// Go ahead on a PVM host.
    pub allow_pvm: bool,
}

/// Builds a microVM from a loaded snapshot, every part of it checked and restored before any
/// vCPU exists; [`MicroVm::run`] then resumes the guest where it was saved.
pub fn restore_microvm(
    snapshot: &LoadedSnapshot,
    options: &RestoreOptions,
) -> Result<MicroVm, BuildError> {
    let newest = snapshot.newest();
    let (dir, _) = snapshot.chain.last().expect("a chain is never empty");
    let last = ParentRef {
        id: newest.meta.id,
        path: dir.clone(),
    };
    let vcpus = newest.microvm.config.vcpus;
    restore_from_state(
        &newest.microvm,
        // KVM's dirty log is on from the start, so the next snapshot can be a diff on this one.
        || PreparedVm::new(vcpus, snapshot.restore_memory()?, true, options.allow_pvm),
        options,
        Some(last),
        ClockRestore::AsSaved,
    )
}

/// Builds a microVM from a saved state into the VM `prepare` makes (called once the host
/// resources are open, with guest memory holding the saved pages); `last` names the snapshot
/// the memory equals, if any. A VM prepared with KVM's dirty log on (a snapshot's restore)
/// tracks writes from here on, so that the next snapshot can be a diff; one without (a
/// migrated VM) runs faster - KVM maps its RAM in huge, writable pages - until a snapshot or
/// migration turns the log on. `clock` says whether the guest's clocks catch up with the time
/// since the save.
pub fn restore_from_state(
    state: &MicroVmState,
    prepare: impl FnOnce() -> Result<PreparedVm, BuildError>,
    options: &RestoreOptions,
    last: Option<ParentRef>,
    clock: ClockRestore,
) -> Result<MicroVm, BuildError> {
    let mut config = state.config.clone();
    config.serial = options.serial.clone();
    config.allow_pvm = options.allow_pvm;
    if state.vcpus.len() != usize::from(config.vcpus) || state.vcpus.is_empty() {
        return Err(BuildError::SnapshotVcpus {
            saved: state.vcpus.len(),
            config: config.vcpus,
        });
    }
    let t0 = Instant::now();
    // Host resources first: the disk images and TAPs the devices were using, or the ones
    // given for this host.
    let mut virtio: Vec<VirtioEntry> = Vec::new();
    let mut nets = 0;
    for saved in &state.devices.virtio {
        virtio.push(match &saved.device {
            VirtioDeviceState::Block(block) => {
                let args = BlockRestoreArgs {
                    path: None,
                    read_only: None,
                };
                virtio_entry(Block::restore(args, block)?)
            }
            VirtioDeviceState::Net(net) => {
                let tap_name = options.net.get(nets).map(|n| n.tap.clone());
                if let (Some(tap), Some(cfg)) = (&tap_name, config.net.get_mut(nets)) {
                    cfg.tap = tap.clone();
                }
                nets += 1;
                virtio_entry(Net::restore(NetRestoreArgs { tap_name }, net)?)
            }
        });
    }
    let serial_out = serial_output(&options.serial)?;
    let devices_done = t0.elapsed();
    let PreparedVm { kvm, vm, vcpus } = prepare()?;
    if vcpus.len() != state.vcpus.len() {
        return Err(BuildError::SnapshotVcpus {
            saved: state.vcpus.len(),
            config: vcpus.len() as u8,
        });
    }
    let track_dirty = vm.dirty_logging();
    let prepared = t0.elapsed();
    let machine = assemble(kvm, vm, serial_out, virtio, Some(&state.devices))?;
    let assembled = t0.elapsed();
    let advance = state.vm.clock_advance(clock);
    machine.vm.restore_state(&state.vm, advance)?;
    let mut restored = Vec::with_capacity(vcpus.len());
    for (mut vcpu, saved) in vcpus.into_iter().zip(&state.vcpus) {
        if vcpu.index() != saved.index {
            return Err(BuildError::SnapshotVcpuOrder {
                position: vcpu.index(),
                saved: saved.index,
            });
        }
        vcpu.attach_buses(machine.pio_bus.clone(), machine.mmio_bus.clone());
        vcpu.restore_state(saved, advance)?;
        restored.push(vcpu);
    }
    let vcpus_done = t0.elapsed();
    if track_dirty {
        // Dirty tracking starts now, from memory equal to the saved state's.
        machine.vm.harvest_dirty_log()?;
    }
    tracing::info!(
        devices_us = devices_done.as_micros() as u64,
        prepare_us = (prepared - devices_done).as_micros() as u64,
        assemble_us = (assembled - prepared).as_micros() as u64,
        vcpus_us = (vcpus_done - assembled).as_micros() as u64,
        dirty_log_us = (t0.elapsed() - vcpus_done).as_micros() as u64,
        clock_advance_us = advance.as_micros() as u64,
        "machine restored"
    );
    Ok(machine.into_microvm(restored, config, last))
}
