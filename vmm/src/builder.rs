//! Builds a microVM from a [`VmConfig`]: guest memory, kernel, initrd, devices, boot
//! structures and vCPUs, in that order, so that every input is checked before KVM is touched.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot, layout, mptable, regs};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialOut};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::hostcheck::{self, HostError};
use crate::loader::{self, LoaderError};
use crate::microvm::{EventLoop, ExitHandler, MicroVm, Subscriber};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VmRunState};
use crate::vstate::vm::{Vm, VmError};

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
}

fn serial_output(config: &SerialConfig) -> Result<SerialOut, BuildError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(LineWriter::new(std::io::stdout())),
        SerialConfig::File(path) => {
            Box::new(LineWriter::new(File::create(path).map_err(|source| {
                BuildError::SerialFile {
                    path: path.clone(),
                    source,
                }
            })?))
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

    hostcheck::check_linux_guest_support(config.allow_pvm)?;
    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    let max = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max {
        return Err(BuildError::TooManyVcpus {
            asked: config.vcpus,
            max,
        });
    }
    let mut vm = Vm::new(&kvm, mem.clone(), false)?;
    vm.setup_irqchip()?;

    let run_state = Arc::new(VmRunState::new().map_err(BuildError::EventFd)?);
    let mut event_loop = EventLoop::new().map_err(BuildError::EventLoop)?;
    let mut pio_bus = Bus::new();
    let mut mmio_bus = Bus::new();

    let serial_irq = EventFdTrigger::new().map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq.0, layout::SERIAL_IRQ)?;
    pio_bus.insert(
        Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out))),
        layout::SERIAL_PORT,
        8,
    )?;
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let i8042_evt = reset_evt.try_clone().map_err(BuildError::EventFd)?;
    pio_bus.insert(
        Arc::new(Mutex::new(I8042::new(EventFdTrigger(i8042_evt)))),
        layout::I8042_PORT,
        5,
    )?;
    event_loop.add_subscriber(Arc::new(Mutex::new(ExitHandler::new(
        run_state.clone(),
        reset_evt,
    ))));

    let mut cmdline = String::from(BASE_CMDLINE);
    for (i, entry) in virtio.into_iter().enumerate() {
        let base = layout::MMIO_DEVICES_START + i as u64 * layout::MMIO_DEVICE_SIZE;
        let irq = layout::VIRTIO_IRQ_START + i as u32;
        if irq > layout::IRQ_MAX {
            return Err(BuildError::OutOfIrqs);
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
        let transport = MmioTransport::new(mem.clone(), entry.device, interrupt);
        transport
            .register_ioevents(vm.fd(), base)
            .map_err(BuildError::RegisterIoevent)?;
        mmio_bus.insert(
            Arc::new(Mutex::new(transport)),
            base,
            layout::MMIO_DEVICE_SIZE,
        )?;
        event_loop.add_subscriber(entry.subscriber);
        cmdline.push(' ');
        cmdline.push_str(&MmioTransport::cmdline_arg(base, irq));
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

    vcpu::register_kick_handler()?;
    let mut vcpus = Vec::with_capacity(config.vcpus.into());
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index, pio_bus.clone(), mmio_bus.clone())?;
        vcpu.configure_cpu(&kvm, config.vcpus)?;
        vcpu.configure_boot(kernel.entry.0, layout::ZERO_PAGE_START)?;
        vcpus.push(vcpu);
    }
    Ok(MicroVm::new(kvm, vm, vcpus, event_loop, run_state))
}
