#!/usr/bin/env python3
"""Test middlebox: an NFQUEUE program for the router namespace that mangles forwarded TCP.

Run inside r (the caller's `iptables -A FORWARD -p tcp -j NFQUEUE --queue-num N` sends it forwarded
TCP). Modes:

- `shuffle`: from a seed, at random points, reorder (hold a packet with a deferred verdict and
  release it after the next one, or after `--hold-ms`), duplicate (accept it and send a copy through a
  raw socket) and re-segment (split one segment's payload into 2-3 segments with correct sequence
  numbers and checksums: the first rides the verdict, the rest go through the raw socket).
- `tamper`: flip one bit in the middle of one data segment from the server port to the client after
  `--after` bytes of its stream (past the handshake and Init2), fixing the TCP checksum. Once.

IPv4 only. Raw-socket sends leave r through its OUTPUT hook, so they are never queued again. Prints
"ready" once bound; on SIGTERM/SIGINT it releases what it holds and prints one JSON line of counts.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

from netfilterqueue import NetfilterQueue

FIN, SYN, RST, PSH = 0x01, 0x02, 0x04, 0x08


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def build(ip_header: bytes, tcp_header: bytes, payload: bytes, seq: int, flags: int, ident: int) -> bytes:
    """One IPv4/TCP packet from templates: new seq, flags, IP id, lengths and both checksums."""
    ip = bytearray(ip_header)
    tcp = bytearray(tcp_header)
    struct.pack_into("!H", ip, 2, len(ip) + len(tcp) + len(payload))
    struct.pack_into("!H", ip, 4, ident & 0xFFFF)
    struct.pack_into("!H", ip, 10, 0)
    struct.pack_into("!H", ip, 10, 0xFFFF - _fold(_sum16(bytes(ip))))
    struct.pack_into("!I", tcp, 4, seq & 0xFFFFFFFF)
    tcp[13] = flags
    struct.pack_into("!H", tcp, 16, 0)
    segment = bytes(tcp) + payload
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    struct.pack_into("!H", tcp, 16, 0xFFFF - _fold(_sum16(bytes(pseudo) + segment)))
    return bytes(ip) + bytes(tcp) + payload


def split(packet: bytes) -> tuple[bytes, bytes, bytes]:
    """(IP header, TCP header, payload) of an IPv4/TCP packet."""
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    doff = (packet[ihl + 12] >> 4) * 4
    return packet[:ihl], packet[ihl : ihl + doff], packet[ihl + doff : total]


class Middlebox:
    """The queue callback and its deferred verdicts; counts what it did."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.held: list[tuple[Any, float]] = []
        self.counts = {"packets": 0, "reordered": 0, "duplicated": 0, "resegmented": 0,
                       "extra_segments": 0, "tampered": 0}  # fmt: skip
        self.server_isn: dict[tuple[bytes, int, bytes, int], int] = {}

    def send(self, packet: bytes) -> None:
        self.raw.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    def release(self, all_: bool = False, now: float | None = None) -> None:
        """Accept held packets: all of them, or those held longer than --hold-ms."""
        keep = []
        for pkt, since in self.held:
            if all_ or now is None or now - since >= self.args.hold_ms / 1000:
                pkt.accept()
            else:
                keep.append((pkt, since))
        self.held = keep

    def callback(self, pkt: Any) -> None:
        self.counts["packets"] += 1
        try:
            data = pkt.get_payload()
            if self.args.mode == "tamper":
                self._tamper(pkt, data)
            else:
                self._shuffle(pkt, data)
        except Exception:
            pkt.accept()
            raise

    def _tamper(self, pkt: Any, data: bytes) -> None:
        ip, tcp, payload = split(data)
        sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
        flags = tcp[13]
        key = (ip[12:16], sport, ip[16:20], dport)
        if sport == self.args.port and flags & SYN:
            self.server_isn[key] = seq
        isn = self.server_isn.get(key)
        offset = (seq - isn - 1) % (1 << 32) if isn is not None else -1
        if (
            not self.counts["tampered"]
            and sport == self.args.port
            and isn is not None
            and self.args.after <= offset < 1 << 30
            and len(payload) >= 64
        ):
            flipped = bytearray(payload)
            flipped[len(flipped) // 2] ^= 0x10
            self.counts["tampered"] += 1
            self.counts["tampered_offset"] = offset + len(payload) // 2
            ident = struct.unpack_from("!H", ip, 4)[0]
            pkt.set_payload(build(ip, tcp, bytes(flipped), seq, flags, ident))
        pkt.accept()

    def _shuffle(self, pkt: Any, data: bytes) -> None:
        rng, args = self.rng, self.args
        ip, tcp, payload = split(data)
        flags = tcp[13]
        roll = rng.random()
        if flags & (SYN | RST):
            pkt.accept()
            self.release(all_=True)
            return
        if roll < args.reorder:
            # Hold this one; it goes out after the next packet (or after --hold-ms).
            self.counts["reordered"] += 1
            self.held.append((pkt, time.monotonic()))
            return
        if roll < args.reorder + args.resegment and len(payload) >= 3:
            self.counts["resegmented"] += 1
            pieces = rng.randint(2, 3)
            cuts = sorted(rng.sample(range(1, len(payload)), pieces - 1))
            bounds = [0, *cuts, len(payload)]
            seq = struct.unpack_from("!I", tcp, 4)[0]
            ident = struct.unpack_from("!H", ip, 4)[0]
            out = []
            for i in range(pieces):
                last = i == pieces - 1
                piece_flags = flags if last else flags & ~(FIN | PSH)
                chunk = payload[bounds[i] : bounds[i + 1]]
                out.append(build(ip, tcp, chunk, seq + bounds[i], piece_flags, ident + i))
            if rng.random() < 0.5:
                out.reverse()  # the pieces themselves out of order too
            pkt.set_payload(out[0])
            pkt.accept()
            for extra in out[1:]:
                self.send(extra)
                self.counts["extra_segments"] += 1
        elif roll < args.reorder + args.resegment + args.duplicate:
            self.counts["duplicated"] += 1
            pkt.accept()
            self.send(data)
        else:
            pkt.accept()
        self.release(all_=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--mode", choices=("shuffle", "tamper"), default="shuffle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reorder", type=float, default=0.03)
    parser.add_argument("--duplicate", type=float, default=0.03)
    parser.add_argument("--resegment", type=float, default=0.05)
    parser.add_argument("--hold-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8080, help="server port (tamper mode)")
    parser.add_argument("--after", type=int, default=65536, help="tamper past this stream offset")
    args = parser.parse_args()
    box = Middlebox(args)
    queue = NetfilterQueue()
    queue.bind(args.queue, box.callback, max_len=4096, sock_len=4 * 1024 * 1024)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    fd = queue.get_fd()
    print("ready", flush=True)
    try:
        while not stop:
            timeout = args.hold_ms / 1000 if box.held else 0.5
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                queue.run(block=False)
            if box.held:
                box.release(now=time.monotonic())
    finally:
        box.release(all_=True)
        queue.unbind()
        print(json.dumps(box.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
