"""Reads the guest kernel's timekeeping words straight from each running vmr's guest memory.

Usage: guest_clock.py VMLINUX

A guest whose vCPUs all spin in the kernel's timekeeping readers (seen in a dump's KVM exits as
every vCPU at one RIP in `ktime_get*`) waits for `tk_core.seq` to turn even. If guest memory
holds it odd while no vCPU is in the writer, a write of the guest was lost in memory (the
page's content is older than the vCPUs' state); even in memory means the vCPUs read something
other than what memory holds (a stale translation). Guest memory is found as the process's
anonymous read-write mappings of at least 64 MiB; the guest kernel is mapped without KASLR at
__START_KERNEL_map, so a symbol's guest-physical address is its address minus that base.
"""

import os
import struct
import subprocess
import sys

START_KERNEL_MAP = 0xFFFFFFFF80000000
SYMBOLS = ("tk_core", "timekeeper_lock", "jiffies_64")


def symbols(vmlinux):
    out = subprocess.run(["nm", vmlinux], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in SYMBOLS:
            found[parts[2]] = int(parts[0], 16) - START_KERNEL_MAP
    return found


def guest_mappings(pid):
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if fields[1] == "rw-p" and len(fields) == 5 and end - start >= 64 << 20:
                yield start, end


def main():
    syms = symbols(sys.argv[1])
    if len(syms) != len(SYMBOLS):
        print(f"guest clock: symbols missing from {sys.argv[1]}")
        return
    for pid in subprocess.run(["pgrep", "-x", "vmr"], capture_output=True, text=True).stdout.split():
        try:
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            for start, end in guest_mappings(pid):
                seq = struct.unpack("<I", os.pread(mem, 4, start + syms["tk_core"]))[0]
                lock = struct.unpack("<I", os.pread(mem, 4, start + syms["timekeeper_lock"]))[0]
                jiffies = struct.unpack("<Q", os.pread(mem, 8, start + syms["jiffies_64"]))[0]
                state = "odd: mid-update" if seq & 1 else "even"
                print(
                    f"guest clock (vmr {pid}, memory at {start:#x}, {(end - start) >> 20} MiB): "
                    f"tk_core.seq={seq} ({state}) timekeeper_lock={lock:#x} jiffies={jiffies}"
                )
            os.close(mem)
        except OSError as e:
            print(f"guest clock (vmr {pid}): {e}")


main()
