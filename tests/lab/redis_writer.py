#!/usr/bin/env python3
"""A redis client that records what it was told: one connection to the guest's redis, SETs of
increasing values (key acked:N, value N) one at a time, each acknowledged one logged as
"acked N <wall-clock seconds>" (line-buffered) before the next is sent. Runs until the file
STOP exists, then prints "WRITER OK <last acked> max_gap_ms=<longest wait for an answer>" and
exits 0; a wrong answer, reset or timeout exits 1 at once.

usage: redis_writer.py HOST PORT STOP_FILE
"""
import os
import socket
import sys
import time

host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=10)
sock.settimeout(90)
reader = sock.makefile("rb")
n = 0
max_gap = 0.0
while not os.path.exists(stop):
    n += 1
    key, value = f"acked:{n}".encode(), str(n).encode()
    request = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value)
    sent = time.monotonic()
    try:
        sock.sendall(request)
        answer = reader.readline()
    except OSError as e:
        print(f"FAIL: SET {n}: {e}", flush=True)
        sys.exit(1)
    if answer != b"+OK\r\n":
        print(f"FAIL: SET {n} answered {answer!r}", flush=True)
        sys.exit(1)
    max_gap = max(max_gap, time.monotonic() - sent)
    print(f"acked {n} {time.time():.3f}", flush=True)
print(f"WRITER OK {n} max_gap_ms={max_gap * 1000:.0f}", flush=True)
