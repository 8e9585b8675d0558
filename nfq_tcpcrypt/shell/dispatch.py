"""Which worker gets a packet: a symmetric hash of the TCP 4-tuple, as a classic BPF match (README: Workers).

With `--workers N` each worker has its own queue pair, and both directions of a connection must reach
the same one. NFQUEUE's `--queue-balance` hashes the addresses only (every flow between two hosts
would share a worker), and HMARK would overwrite the packet mark other rules may rely on, so the
rules choose the queue with `-m bpf --bytecode`: a classic BPF program (the xt_bpf match, run on the
packet from its IP header) that computes

    h = ((saddr ^ daddr ^ sport ^ dport) * 0x9E3779B1 mod 2**32) >> 16

(IPv6: the XOR of the low 64 bits of both addresses, as four 32-bit words: xt_bpf takes at most 64
instructions)
and matches when `h % N == k`. XOR makes it the same for both directions. An ICMP error is hashed
on the TCP header it quotes (inner IP header after the 8-byte ICMP header), so a "fragmentation
needed" or "packet too big" reaches the worker that holds its connection. Any other packet hashes
to 0. `worker_of` is the same function in Python (tests compare the two).
"""

from __future__ import annotations

import ipaddress

GOLDEN = 0x9E3779B1

# <linux/filter.h> classic BPF opcodes
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_IMM, _ABS, _IND, _MEM, _MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
_ADD, _MUL, _AND, _LSH, _RSH, _MOD, _XOR = 0x00, 0x20, 0x50, 0x60, 0x70, 0x90, 0xA0
_K, _X = 0x00, 0x08
_JEQ = 0x10
_TAX = 0x00


class _Program:
    """A list of (code, jt, jf, k) with labels for forward jumps."""

    def __init__(self) -> None:
        self.ins: list[list[int]] = []
        self.fixups: list[tuple[int, str, str]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self.ins.append([code, 0, 0, k & 0xFFFFFFFF])

    def jeq(self, k: int, true: str, false: str) -> None:
        self.fixups.append((len(self.ins), true, false))
        self.ins.append([_JMP | _JEQ | _K, 0, 0, k])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def text(self) -> str:
        for index, true, false in self.fixups:
            for slot, name in ((1, true), (2, false)):
                offset = self.labels[name] - index - 1
                if not 0 <= offset <= 255:
                    raise ValueError(f"jump to {name} out of range")
                self.ins[index][slot] = offset
        body = ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in self.ins)
        return f"{len(self.ins)},{body}"


def _xor_ports_then_mix(prog: _Program) -> None:
    """A = the TCP header's source port ^ destination port (X: its offset); on to "mix"."""
    prog.op(_LD | _H | _IND, 0)
    prog.op(_ST, 1)
    prog.op(_LD | _H | _IND, 2)
    prog.op(_LDX | _MEM, 1)
    prog.op(_ALU | _XOR | _X)
    prog.jeq(0, "mix", "mix")


def program(family: str, workers: int, worker: int) -> str:
    """The `--bytecode` text that matches the packets of `worker` (0-based) out of `workers`."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of 0..{workers - 1}")
    prog = _Program()
    if family == "ipv4":
        prog.op(_LD | _B | _ABS, 9)  # protocol
        prog.jeq(6, "tcp", "not_tcp")
        prog.label("not_tcp")
        prog.jeq(1, "icmp", "zero")
        prog.label("tcp")
        prog.op(_LD | _W | _ABS, 12)
        prog.op(_ST, 0)
        prog.op(_LD | _W | _ABS, 16)
        prog.op(_LDX | _MEM, 0)
        prog.op(_ALU | _XOR | _X)
        prog.op(_ST, 0)  # M[0] = saddr ^ daddr
        prog.op(_LDX | _B | _MSH, 0)  # X = 4 * IHL
        _xor_ports_then_mix(prog)
        prog.label("icmp")
        # inner header at X + 8: addresses at X + 20 and X + 24, ports after the inner IHL
        prog.op(_LDX | _B | _MSH, 0)
        prog.op(_LD | _W | _IND, 20)
        prog.op(_ST, 0)
        prog.op(_LD | _W | _IND, 24)
        prog.op(_ST, 2)
        prog.op(_LDX | _MEM, 0)
        prog.op(_LD | _MEM, 2)
        prog.op(_ALU | _XOR | _X)
        prog.op(_ST, 0)  # M[0] = inner saddr ^ daddr
        prog.op(_LDX | _B | _MSH, 0)
        prog.op(_LD | _B | _IND, 8)  # inner version/IHL
        prog.op(_ALU | _AND | _K, 0x0F)
        prog.op(_ALU | _LSH | _K, 2)
        prog.op(_ST, 3)
        prog.op(_MISC | 0x80)  # TXA: A = outer 4 * IHL
        prog.op(_ALU | _ADD | _K, 8)
        prog.op(_LDX | _MEM, 3)
        prog.op(_ALU | _ADD | _X)
        prog.op(_MISC | _TAX)  # X = offset of the inner TCP header
        _xor_ports_then_mix(prog)
    elif family == "ipv6":
        prog.op(_LD | _B | _ABS, 6)  # next header (extension headers: hashed as "other")
        prog.jeq(6, "tcp", "not_tcp")
        prog.label("not_tcp")
        prog.jeq(58, "icmp", "zero")
        for name, base in (("tcp", 0), ("icmp", 48)):
            # the low 64 bits of both addresses (xt_bpf takes at most 64 instructions), X accumulates
            prog.label(name)
            prog.op(_LD | _W | _ABS, base + 16)
            prog.op(_MISC | _TAX)
            for offset in (base + 20, base + 32, base + 36):
                prog.op(_LD | _W | _ABS, offset)
                prog.op(_ALU | _XOR | _X)
                prog.op(_MISC | _TAX)
            prog.op(_LD | _H | _ABS, base + 40)
            prog.op(_ALU | _XOR | _X)
            prog.op(_MISC | _TAX)
            prog.op(_LD | _H | _ABS, base + 42)
            prog.op(_ALU | _XOR | _X)
            prog.op(_ST, 0)
            prog.op(_LD | _IMM, 0)
            prog.jeq(0, "mix", "mix")
    else:
        raise ValueError(f"unknown family {family!r}")
    prog.label("mix")
    # A = ports XOR; M[0] = addresses XOR
    prog.op(_LDX | _MEM, 0)
    prog.op(_ALU | _XOR | _X)
    prog.op(_ALU | _MUL | _K, GOLDEN)
    prog.op(_ALU | _RSH | _K, 16)
    prog.op(_ALU | _MOD | _K, workers)
    prog.jeq(worker, "match", "no")
    prog.label("zero")
    prog.op(_RET | _K, 1 if worker == 0 else 0)
    prog.label("match")
    prog.op(_RET | _K, 1)
    prog.label("no")
    prog.op(_RET | _K, 0)
    return prog.text()


def worker_of(src: str, sport: int, dst: str, dport: int, workers: int) -> int:
    """The worker the rules send a TCP packet src:sport -> dst:dport to (either direction)."""
    h = sport ^ dport
    for address in (src, dst):
        ip = ipaddress.ip_address(address)
        packed = ip.packed[-8:] if ip.version == 6 else ip.packed
        for i in range(0, len(packed), 4):
            h ^= int.from_bytes(packed[i : i + 4], "big")
    return (((h * GOLDEN) & 0xFFFFFFFF) >> 16) % workers
