//! The `vmr` command line: a tiny ELF "kernel" booted end to end on this host's `/dev/kvm`, and
//! every bad input refused with a one-line error and a non-zero status, never a panic.

mod common;

use common::{assert_refused, scratch, tiny_elf, vmr};

use vmm::hostcheck::{probe, HostKvm};

#[test]
fn tiny_kernel_boots_prints_and_resets_cleanly() {
    let elf = tiny_elf("boot_hello");
    let out = vmr(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--mem",
        "64",
        "--allow-pvm",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from vmr run\n");
}

#[test]
fn config_file_and_serial_file_work_the_same() {
    let elf = tiny_elf("boot_hello");
    let console = scratch("console.txt");
    let config = scratch("vm.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\nmem = 64\nvcpus = 2\nallow_pvm = true\nserial = \"file:{}\"\n",
            elf,
            console.display()
        ),
    )
    .unwrap();
    let out = vmr(&["run", "--config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from vmr run\n"
    );
}

#[test]
fn stock_kernels_are_refused_on_a_pvm_host() {
    let elf = tiny_elf("boot_hello");
    let out = vmr(&["run", "--kernel", elf.to_str().unwrap()]);
    match probe() {
        HostKvm::Pvm => {
            assert_refused(&out, "PVM");
            assert!(String::from_utf8_lossy(&out.stderr).contains("images/lab"));
        }
        HostKvm::Missing => assert_refused(&out, "/dev/kvm"),
        HostKvm::Hardware => assert!(out.status.success()),
    }
}

#[test]
fn bad_inputs_get_one_line_errors() {
    let garbage = scratch("garbage");
    std::fs::write(&garbage, vec![0x5a; 64 << 10]).unwrap();
    let elf = tiny_elf("boot_hello");
    let elf = elf.to_str().unwrap();
    let garbage = garbage.to_str().unwrap();

    assert_refused(&vmr(&["run"]), "no kernel given");
    assert_refused(
        &vmr(&["run", "--kernel", "/nonexistent/bzImage"]),
        "cannot open kernel /nonexistent/bzImage",
    );
    assert_refused(
        &vmr(&["run", "--kernel", garbage]),
        "is not a loadable x86_64 kernel",
    );
    assert_refused(&vmr(&["run", "--kernel", elf, "--mem", "8"]), "--mem 8 MiB");
    assert_refused(&vmr(&["run", "--kernel", elf, "--vcpus", "0"]), "--vcpus 0");
    assert_refused(
        &vmr(&["run", "--kernel", elf, "--initrd", "/nonexistent/initrd"]),
        "cannot read initrd /nonexistent/initrd",
    );
    assert_refused(
        &vmr(&["run", "--kernel", elf, "--disk", "/nonexistent/disk.img"]),
        "/nonexistent/disk.img",
    );
    assert_refused(
        &vmr(&["run", "--config", "/nonexistent/vm.toml"]),
        "cannot read config file /nonexistent/vm.toml",
    );
    let bad_toml = scratch("bad.toml");
    std::fs::write(&bad_toml, "kernel = 3\n").unwrap();
    assert_refused(
        &vmr(&["run", "--config", bad_toml.to_str().unwrap()]),
        "invalid config file",
    );
    assert_refused(
        &vmr(&[
            "run",
            "--kernel",
            elf,
            "--serial",
            "file:/nonexistent/dir/console",
        ]),
        "cannot create serial output file",
    );
    // `lo` exists and is not a TAP: the kernel refuses to attach to it.
    assert_refused(&vmr(&["run", "--kernel", elf, "--net", "tap=lo"]), "lo");
}

#[test]
fn malformed_flags_are_usage_errors() {
    for args in [
        vec!["run", "--kernel", "k", "--net", "tap0"],
        vec!["run", "--kernel", "k", "--net", "tap=this-name-is-too-long"],
        vec!["run", "--kernel", "k", "--net", "tap=t0,mac=01:02"],
        vec!["run", "--kernel", "k", "--disk", "a.img,rx"],
        vec!["run", "--kernel", "k", "--serial", "tty"],
        vec!["run", "--kernel", "k", "--vcpus", "lots"],
    ] {
        let out = vmr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("vmr: error: invalid value"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
    // An unknown subcommand or flag: one line too, naming the help that explains it.
    for args in [
        vec!["launch"],
        vec!["run", "--kernal", "k"],
        vec!["ctl", "--api", "x", "snapshot"],
    ] {
        let out = vmr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("--help`)"), "{args:?}: {stderr}");
    }
}
