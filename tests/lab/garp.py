#!/usr/bin/env python3
"""Waits on interface IFACE for a gratuitous ARP from IP (sender and target address both IP),
as a guest sends when its virtio-net driver announces it (VIRTIO_NET_S_ANNOUNCE). Prints
"GARP <sender MAC> <IP>" and exits 0 on the first one; exits 1 after TIMEOUT seconds.

usage: garp.py IFACE IP TIMEOUT
"""
import socket
import sys
import time

iface, ip, timeout = sys.argv[1], socket.inet_aton(sys.argv[2]), float(sys.argv[3])
ETH_P_ARP = 0x0806
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
sock.bind((iface, 0))
print("LISTENING", flush=True)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        frame = sock.recv(2048)
    except socket.timeout:
        break
    arp = frame[14:42]
    if len(arp) < 28:
        continue
    sender_mac, sender_ip, target_ip = arp[8:14], arp[14:18], arp[24:28]
    if sender_ip == ip and target_ip == ip:
        print(f"GARP {sender_mac.hex(':')} {sys.argv[2]}", flush=True)
        sys.exit(0)
print("no gratuitous ARP", flush=True)
sys.exit(1)
