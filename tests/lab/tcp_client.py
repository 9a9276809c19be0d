#!/usr/bin/env python3
"""A long-lived TCP client for the lab scenarios: one connection to a line-echo server in the
guest (which answers "N <uptime>"), a numbered request every 50 ms, each answer checked: same
number, guest uptime never going backwards. Runs until the file STOP exists, then prints a
summary and exits 0; any wrong answer, reset or timeout exits 1 at once.

usage: tcp_client.py HOST PORT STOP_FILE
"""
import os
import socket
import sys
import time

host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=10)
sock.settimeout(90)  # a snapshot restore or a migration may take a while in the lab
reader = sock.makefile("r")
n = 0
last_uptime = 0.0
longest_gap = 0.0
while not os.path.exists(stop):
    n += 1
    t0 = time.monotonic()
    try:
        sock.sendall(f"{n}\n".encode())
        line = reader.readline()
    except OSError as e:
        print(f"FAIL: request {n}: {e}", flush=True)
        sys.exit(1)
    gap = time.monotonic() - t0
    longest_gap = max(longest_gap, gap)
    parts = line.split()
    if len(parts) != 2 or parts[0] != str(n):
        print(f"FAIL: request {n} got {line!r}", flush=True)
        sys.exit(1)
    uptime = float(parts[1])
    if uptime < last_uptime:
        print(f"FAIL: guest uptime went back from {last_uptime} to {uptime}", flush=True)
        sys.exit(1)
    last_uptime = uptime
    print(f"reply {n} uptime {uptime} rtt {gap:.3f}", flush=True)
    time.sleep(0.05)
print(f"CLIENT OK requests={n} longest_gap_s={longest_gap:.2f} guest_uptime={last_uptime}", flush=True)
sock.close()
