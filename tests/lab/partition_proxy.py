#!/usr/bin/env python3
"""A TCP relay that can be partitioned: connections to 127.0.0.1:LISTEN_PORT are relayed to
TARGET_PORT on 127.0.0.1, both ways, until the file CUT exists; from then on nothing more is
read or written on either side and no connection is closed (the packets are dropped, as on a
link that went dark: no reset, no end of stream). New connections wait, unanswered.

usage: partition_proxy.py LISTEN_PORT TARGET_PORT CUT_FILE
"""
import os
import selectors
import socket
import sys
import time

listen_port, target_port, cut = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen()
server.setblocking(False)
events = selectors.DefaultSelector()
events.register(server, selectors.EVENT_READ)
peers = {}
print("PROXY READY", flush=True)
# The cut file is looked for four times a second, and after any traffic: polled every 20 ms,
# an idle relay took 0.9 % of a CPU natively, several times that under the lab's emulation, and
# a 12-round failover_paths leaves 17 of them alive.
while not os.path.exists(cut):
    for key, _ in events.select(timeout=0.25):
        sock = key.fileobj
        if sock is server:
            inbound, _ = server.accept()
            outbound = socket.create_connection(("127.0.0.1", target_port))
            for s in (inbound, outbound):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                events.register(s, selectors.EVENT_READ)
            peers[inbound], peers[outbound] = outbound, inbound
            continue
        if sock not in peers:
            continue
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if data:
            peers[sock].sendall(data)
            continue
        other = peers.pop(sock)
        peers.pop(other, None)
        for s in (sock, other):
            events.unregister(s)
            s.close()
print("PROXY CUT", flush=True)
# Partitioned: hold every socket open, read nothing.
while True:
    time.sleep(3600)
