#!/usr/bin/env python3
"""Numbered TCP byte streams both ways with the guest, each checked where it is received.

- VM to client: a connection to OUT_PORT, where the guest writes the lines 1, 2, 3... without
  end; every line read must be the previous one plus one (a missing, repeated or torn line is
  a failure).
- Client to VM: a connection to IN_PORT, where the client writes the lines 1, 2, 3... and the
  guest checks them the same way, answering "ok N" every 20 lines (or "BAD ..." and hanging up
  on a wrong one); at the end the client writes "end" and the guest must answer "final N" with
  N the count the client wrote.

Runs until the file STOP exists, then prints "STREAM OK out=<lines read> in=<lines written>
max_gap_ms=<longest wait for a line from the VM>" and exits 0; a wrong line, a reset, an end
of stream or a read waiting over 90 s prints "FAIL: ..." and exits 1 at once.

usage: stream_client.py HOST OUT_PORT IN_PORT STOP_FILE
"""
import os
import socket
import sys
import threading
import time

host, out_port, in_port, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
failed = threading.Event()
figures = {"out": 0, "in": 0, "gap": 0.0}


def fail(what):
    print(f"FAIL: {what}", flush=True)
    failed.set()
    os._exit(1)


def connect(port):
    for _ in range(100):
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.settimeout(90)
            return sock
        except OSError:
            time.sleep(0.2)
    fail(f"cannot connect to {host}:{port}")


def vm_to_client():
    reader = connect(out_port).makefile("rb")
    expected = 1
    last = time.monotonic()
    while not os.path.exists(stop):
        try:
            line = reader.readline()
        except OSError as e:
            fail(f"VM-to-client stream, line {expected}: {e}")
        if not line:
            fail(f"VM-to-client stream ended before line {expected}")
        if line != b"%d\n" % expected:
            fail(f"VM-to-client stream: line {expected} read as {line!r}")
        now = time.monotonic()
        figures["gap"] = max(figures["gap"], now - last)
        last = now
        figures["out"] = expected
        expected += 1


def client_to_vm():
    sock = connect(in_port)
    reader = sock.makefile("rb")
    answers = []

    def read_answers():
        while True:
            try:
                line = reader.readline()
            except OSError as e:
                fail(f"client-to-VM stream, the guest's answers: {e}")
            if not line:
                fail("client-to-VM stream: the guest hung up")
            word = line.split()
            if word[:1] == [b"BAD"]:
                fail(f"client-to-VM stream: the guest read {line!r}")
            if word[:1] == [b"ok"] and len(word) == 2:
                answers.append(int(word[1]))
            elif word[:1] == [b"final"] and len(word) == 2:
                answers.append(("final", int(word[1])))
                return
            else:
                fail(f"client-to-VM stream: unexpected answer {line!r}")

    answering = threading.Thread(target=read_answers, daemon=True)
    answering.start()
    n = 0
    while not os.path.exists(stop):
        batch = b"".join(b"%d\n" % (n + k) for k in range(1, 6))
        try:
            sock.sendall(batch)
        except OSError as e:
            fail(f"client-to-VM stream, after line {n}: {e}")
        n += 5
        figures["in"] = n
        time.sleep(0.1)
    try:
        sock.sendall(b"end\n")
    except OSError as e:
        fail(f"client-to-VM stream, at its end: {e}")
    answering.join(120)
    if not answers or answers[-1] != ("final", n):
        fail(f"client-to-VM stream: wrote {n} lines, the guest answered {answers[-1:]}")
    checked = answers[:-1]
    if checked != sorted(set(checked)) or any(a % 20 or a > n for a in checked):
        fail(f"client-to-VM stream: the guest's counts go wrong: {checked[-5:]}")


threads = [threading.Thread(target=f, daemon=True) for f in (vm_to_client, client_to_vm)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failed.is_set():
    sys.exit(1)
print(
    f"STREAM OK out={figures['out']} in={figures['in']} max_gap_ms={figures['gap'] * 1000:.0f}",
    flush=True,
)
