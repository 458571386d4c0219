"""A tiny classic-BPF (cBPF) assembler and the two queue-steering programs.

Classic BPF is what ``PACKET_FANOUT_CBPF`` (and ``SO_ATTACH_FILTER``) accept:
an accumulator ``A``, an index register ``X``, 16 scratch words ``M[]``, and
instructions ``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}``. Jumps go
forward only; conditional jumps carry two 8-bit relative offsets.

:class:`Asm` builds a program from readable calls with symbolic labels and
resolves them when the program is packed, so the steering programs below read
like the assembly they are::

    a = Asm()
    a.ld_protocol()
    a.jeq(ETH_P_IP, jf="drop")
    ...
    a.label("drop")
    a.ret(0)
    blob = a.assemble()          # bytes: n * 8-byte sock_filter

The steering programs compute the function in ``docs/CONTRACTS.md``
("Steering") for ``nq`` queues:

* inside:  ``queue = ((src_ip & 0xFFFF) ^ (src_ip >> 16) ^ sport) % nq``
* outside: ``queue = ((dport - port_lo) // block) % nq`` if ``dport >= port_lo``
  else ``dport % nq``

where ``sport``/``dport`` are the TCP/UDP ports, the ICMP echo *request*
identifier (inside) or the ICMP echo *reply* identifier (outside), and 0 for
IPv4 fragments (MF set or offset != 0), other protocols and other ICMP types.
A frame that is not IPv4 (ethertype, or a first byte outside 0x45..0x4F)
goes to queue 0. A frame too short for a field the program reads also goes
to queue 0 (the kernel aborts the program and uses its return value 0); such
frames are malformed and the worker drops them with a reason anyway.

ICMP errors (types 3, 4, 5, 11, 12) are steered by the packet they quote,
which starts 8 bytes into the ICMP message, so that they reach the worker
owning its session: ``dport`` (outside) is the quote's *source* port (the
NAT's translated port) and ``sport`` (inside) is the quote's *destination*
port; for a quoted echo/echo reply both are its identifier. The quote must be
IPv4 (first byte 0x45..0x4F), TCP/UDP with both ports present or ICMP echo
(0/8) with its identifier present; otherwise the port is 0, as before this
rule. The programs compare those lengths with ``skb->len`` before loading, so
a short quote never aborts the program (which would mean queue 0 also for an
inside port, where port 0 still hashes the source address).

All packet loads are relative to the network header (``SKF_NET_OFF``) and the
ethertype comes from ``skb->protocol`` (``SKF_AD_PROTOCOL``), so the programs
give the same answer whether the kernel presents the skb at its MAC header
(egress) or at its network header (ingress, where fanout runs) -- except the
quote length checks of ICMP errors: ``skb->len`` counts the MAC header on
egress, so there a quote short by at most 14 bytes aborts the program (queue 0)
instead of taking port 0. Only frames the host itself sends are seen at egress,
and every queue's socket filter drops those anyway.

:func:`steering_queue` is the same function in plain Python, one frame at a
time: the reference the programs are tested against (the fast numpy version
lives in :mod:`hotplane.shared.steering`).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

# --- instruction encoding (linux/filter.h, linux/bpf_common.h) ---------------
# class
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
# size
W, H, B = 0x00, 0x08, 0x10
# mode
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
# alu / jmp operations
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
# operand source
K, X = 0x00, 0x08
# ret source
RET_A = 0x10
# misc
TAX, TXA = 0x00, 0x80

# Special offsets: ancillary data and header-relative loads (negative k).
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
SKF_NET_OFF = -0x100000
SKF_LL_OFF = -0x200000

BPF_MAXINSNS = 4096
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4  # skb->pkt_type of frames the host itself sends

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHOREPLY, ICMP_ECHO = 0, 8
ICMP_ERRORS = (3, 4, 5, 11, 12)  # unreachable, source quench, redirect, time exceeded, parameter problem

DEFAULT_PORT_LO = 1024


class BpfError(ValueError):
    """A program that cannot be assembled (unknown label, jump too far, too long)."""


def _u32(k: int) -> int:
    """Negative offsets (SKF_*) are stored as their two's complement."""
    return k & 0xFFFF_FFFF


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: int | str = 0  # resolved offset or a label name
    jf: int | str = 0
    ja: str | None = None  # label of an unconditional jump (offset goes in k)


class Asm:
    """Build a classic BPF program with labels; :meth:`assemble` packs it."""

    def __init__(self) -> None:
        self.insns: list[_Insn] = []
        self.labels: dict[str, int] = {}

    # -- plumbing ----------------------------------------------------------
    def emit(self, code: int, k: int = 0, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        """Append a raw instruction (``k`` may be negative: stored as u32)."""
        self.insns.append(_Insn(code, _u32(k), jt, jf))
        return self

    def label(self, name: str) -> "Asm":
        """Mark the position of the next instruction as ``name``."""
        if name in self.labels:
            raise BpfError(f"label {name!r} defined twice")
        self.labels[name] = len(self.insns)
        return self

    # -- loads -------------------------------------------------------------
    def ld_abs(self, off: int, size: int = W) -> "Asm":
        """A = packet[off] (big-endian, ``size`` W/H/B)."""
        return self.emit(LD | size | ABS, off)

    def ld_ind(self, off: int, size: int = W) -> "Asm":
        """A = packet[X + off]."""
        return self.emit(LD | size | IND, off)

    def ld_net(self, off: int, size: int = W) -> "Asm":
        """A = network_header[off]."""
        return self.ld_abs(SKF_NET_OFF + off, size)

    def ld_net_ind(self, off: int, size: int = W) -> "Asm":
        """A = network_header[X + off]."""
        return self.ld_ind(SKF_NET_OFF + off, size)

    def ldx_net_ihl(self, off: int = 0) -> "Asm":
        """X = 4 * (network_header[off] & 0xF): the IPv4 header length."""
        return self.emit(LDX | B | MSH, SKF_NET_OFF + off)

    def ld_protocol(self) -> "Asm":
        """A = skb->protocol (the ethertype, host order)."""
        return self.emit(LD | W | ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)

    def ld_pkttype(self) -> "Asm":
        """A = skb->pkt_type (PACKET_HOST, ... PACKET_OUTGOING)."""
        return self.emit(LD | W | ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)

    def ld_imm(self, k: int) -> "Asm":
        return self.emit(LD | IMM, k)

    def ld_mem(self, slot: int) -> "Asm":
        return self.emit(LD | MEM, slot)

    def st(self, slot: int) -> "Asm":
        """M[slot] = A."""
        return self.emit(ST, slot)

    def ldx_len(self) -> "Asm":
        """X = skb->len (from the network header on ingress, where fanout runs)."""
        return self.emit(LDX | W | LEN)

    def ldx_mem(self, slot: int) -> "Asm":
        """X = M[slot]."""
        return self.emit(LDX | MEM, slot)

    def tax(self) -> "Asm":
        return self.emit(MISC | TAX)

    def txa(self) -> "Asm":
        return self.emit(MISC | TXA)

    # -- arithmetic (A op= k, or A op= X with x=True) -----------------------
    def alu(self, op: int, k: int = 0, *, x: bool = False) -> "Asm":
        if not x and op in (DIV, MOD) and k == 0:
            raise BpfError("division by constant zero")
        return self.emit(ALU | op | (X if x else K), k)

    def add(self, k: int) -> "Asm":
        return self.alu(ADD, k)

    def sub(self, k: int) -> "Asm":
        return self.alu(SUB, k)

    def div(self, k: int) -> "Asm":
        return self.alu(DIV, k)

    def mod(self, k: int) -> "Asm":
        return self.alu(MOD, k)

    def and_(self, k: int) -> "Asm":
        return self.alu(AND, k)

    def lsh(self, k: int) -> "Asm":
        return self.alu(LSH, k)

    def add_x(self) -> "Asm":
        return self.alu(ADD, x=True)

    def xor_x(self) -> "Asm":
        return self.alu(XOR, x=True)

    # -- jumps: jt/jf are label names, or 0 for "fall through" -------------
    def jmp(self, label: str) -> "Asm":
        self.insns.append(_Insn(JMP | JA, ja=label))
        return self

    def jeq(self, k: int, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        return self.emit(JMP | JEQ | K, k, jt, jf)

    def jgt(self, k: int, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        return self.emit(JMP | JGT | K, k, jt, jf)

    def jge(self, k: int, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        return self.emit(JMP | JGE | K, k, jt, jf)

    def jset(self, k: int, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        return self.emit(JMP | JSET | K, k, jt, jf)

    def jgt_x(self, jt: int | str = 0, jf: int | str = 0) -> "Asm":
        """Jump if A > X."""
        return self.emit(JMP | JGT | X, 0, jt, jf)

    # -- return --------------------------------------------------------------
    def ret(self, k: int) -> "Asm":
        return self.emit(RET | K, k)

    def ret_a(self) -> "Asm":
        return self.emit(RET | RET_A)

    # -- output ---------------------------------------------------------------
    def resolve(self) -> list[tuple[int, int, int, int]]:
        """The program as ``(code, jt, jf, k)`` tuples with every label resolved."""
        out = []
        for i, ins in enumerate(self.insns):
            jt, jf, k = self._target(i, ins.jt), self._target(i, ins.jf), ins.k
            if ins.ja is not None:
                k = self._offset(i, ins.ja)
            out.append((ins.code, jt, jf, k))
        if not out:
            raise BpfError("empty program")
        if len(out) > BPF_MAXINSNS:
            raise BpfError(f"program has {len(out)} instructions, the kernel takes at most {BPF_MAXINSNS}")
        if out[-1][0] & 0x07 != RET:
            raise BpfError("program must end with a ret")
        return out

    def _offset(self, i: int, label: str) -> int:
        if label not in self.labels:
            raise BpfError(f"undefined label {label!r} (instruction {i})")
        off = self.labels[label] - (i + 1)
        if off < 0:
            raise BpfError(f"jump from {i} to {label!r} goes backwards: cBPF jumps only forward")
        return off

    def _target(self, i: int, t: int | str) -> int:
        off = t if isinstance(t, int) else self._offset(i, t)
        if not 0 <= off <= 255:
            raise BpfError(f"conditional jump at {i} spans {off} instructions (limit 255): add a `ja`")
        return off

    def assemble(self) -> bytes:
        """Pack as an array of ``struct sock_filter`` (native byte order)."""
        return b"".join(struct.pack("=HBBI", *ins) for ins in self.resolve())


def program(insns: list[tuple[int, int, int, int]] | Asm) -> list[tuple[int, int, int, int]]:
    """Normalise an :class:`Asm` or a tuple list to ``(code, jt, jf, k)`` tuples."""
    return insns.resolve() if isinstance(insns, Asm) else list(insns)


class SockFprog:
    """A ``struct sock_fprog`` kept alive with its instruction buffer.

    ``bytes(fprog)`` is what ``setsockopt`` takes for SO_ATTACH_FILTER and
    PACKET_FANOUT_DATA: ``{u16 len; (pad); struct sock_filter *filter}``.
    """

    def __init__(self, blob: bytes) -> None:
        if len(blob) % 8 or not blob:
            raise BpfError("a cBPF program is a non-empty multiple of 8 bytes")
        self.count = len(blob) // 8
        self._buf = ctypes.create_string_buffer(blob, len(blob))

    def __bytes__(self) -> bytes:
        return struct.pack("@HP", self.count, ctypes.addressof(self._buf))


def setsockopt_program(sock, level: int, option: int, prog: "Asm") -> None:
    """``setsockopt`` a program (SO_ATTACH_FILTER, PACKET_FANOUT_DATA).

    The ``sock_fprog`` only points at the instructions, so the buffer must stay
    alive until the kernel has copied it: keep the reference across the call.
    """
    fprog = SockFprog(prog.assemble())
    sock.setsockopt(level, option, bytes(fprog))
    del fprog


# --- the steering programs -----------------------------------------------------


def default_block(nq: int, port_lo: int = DEFAULT_PORT_LO) -> int:
    """The per-queue port block of the NAT defaults: ``(65536 - port_lo) // nq``."""
    return (65536 - port_lo) // nq


def _check_steer_args(nq: int, port_lo: int, block: int | None) -> int:
    if not 1 <= nq <= 0xFFFF:
        raise BpfError(f"nq must be 1..65535, got {nq}")
    if not 0 <= port_lo <= 0xFFFF:
        raise BpfError(f"port_lo must be 0..65535, got {port_lo}")
    block = default_block(nq, port_lo) if block is None else block
    if block < 1:
        raise BpfError(f"block must be >= 1, got {block}")
    return block


def _ipv4_prologue(a: Asm, not_ip: str) -> None:
    """Jump to ``not_ip`` unless the frame is IPv4 with a sane header length."""
    a.ld_protocol()
    a.jeq(ETH_P_IP, jf=not_ip)
    a.ld_net(0, B)  # version/IHL byte: 0x45..0x4F
    a.jge(0x45, jf=not_ip)
    a.jgt(0x4F, jt=not_ip)


def _port_or_id(a: Asm, port_off: int, icmp_type: int, emb_off: int, no_port: str, have: str) -> None:
    """A = the 16-bit port at ``port_off`` of TCP/UDP, the ICMP identifier of
    ``icmp_type`` messages, or for an ICMP error the port at ``emb_off`` of the
    packet it quotes (see :func:`_embedded_port`); jump to ``have``. Anything
    else: to ``no_port``.
    """
    a.ld_net(6, H)  # flags + fragment offset
    a.jset(0x3FFF, jt=no_port)  # MF or offset != 0: a fragment
    a.ld_net(9, B)  # protocol
    a.jeq(IPPROTO_TCP, jt="l4")
    a.jeq(IPPROTO_UDP, jt="l4")
    a.jeq(IPPROTO_ICMP, jf=no_port)
    a.ldx_net_ihl()
    a.ld_net_ind(0, B)  # ICMP type
    a.jeq(icmp_type, jt="echo")
    a.jeq(11, jt="icmp_error")  # time exceeded
    a.jeq(12, jt="icmp_error")  # parameter problem
    a.jge(3, jf=no_port)  # 3..5: unreachable, source quench, redirect
    a.jgt(5, jt=no_port)
    a.label("icmp_error")
    _embedded_port(a, emb_off, no_port, have)
    a.label("echo")
    a.ld_net_ind(4, H)  # echo identifier
    a.jmp(have)
    a.label("l4")
    a.ldx_net_ihl()
    a.ld_net_ind(port_off, H)
    a.jmp(have)


def _embedded_port(a: Asm, emb_off: int, no_port: str, have: str) -> None:
    """With X = the outer header length: A = the port at ``emb_off`` (0: source,
    2: destination) of the TCP/UDP packet an ICMP error quotes, or the
    identifier of a quoted echo/echo reply; jump to ``have``. A quote that is
    not IPv4 (first byte 0x45..0x4F), of another protocol or type, or too short
    for what is read, jumps to ``no_port``.

    Every length is checked against ``skb->len`` *before* the load, so a short
    quote takes the ``no_port`` path (an inside port still hashes the address)
    instead of aborting the program with queue 0. Uses M[1] and M[2].
    """
    a.txa()
    a.add(8)  # the quote starts after the 8-byte ICMP header
    a.st(1)  # M[1] = e
    a.add(20 + 4)  # the shortest useful quote: a 20-byte header and 4 L4 bytes
    a.ldx_len()
    a.jgt_x(jt=no_port)
    a.ldx_mem(1)  # X = e
    a.ld_net_ind(0, B)  # quoted version/IHL
    a.jge(0x45, jf=no_port)
    a.jgt(0x4F, jt=no_port)
    a.and_(0xF)
    a.lsh(2)
    a.add_x()
    a.st(2)  # M[2] = el4, the quoted L4 header
    a.ld_net_ind(9, B)  # quoted protocol
    a.jeq(IPPROTO_TCP, jt="e_ports")
    a.jeq(IPPROTO_UDP, jt="e_ports")
    a.jeq(IPPROTO_ICMP, jf=no_port)
    a.ld_mem(2)
    a.add(6)  # type .. identifier
    a.ldx_len()
    a.jgt_x(jt=no_port)
    a.ldx_mem(2)
    a.ld_net_ind(0, B)  # quoted ICMP type
    a.jeq(ICMP_ECHOREPLY, jt="e_id")
    a.jeq(ICMP_ECHO, jf=no_port)
    a.label("e_id")
    a.ld_net_ind(4, H)
    a.jmp(have)
    a.label("e_ports")
    a.ld_mem(2)
    a.add(4)  # both ports
    a.ldx_len()
    a.jgt_x(jt=no_port)
    a.ldx_mem(2)
    a.ld_net_ind(emb_off, H)
    a.jmp(have)


def inside_program(nq: int) -> Asm:
    """Steer by ``(src_ip & 0xFFFF) ^ (src_ip >> 16) ^ sport`` modulo ``nq``."""
    _check_steer_args(nq, 0, 1)
    a = Asm()
    _ipv4_prologue(a, "queue0")
    a.ld_net(12, H)  # src_ip >> 16
    a.tax()
    a.ld_net(14, H)  # src_ip & 0xFFFF
    a.xor_x()
    a.st(0)  # M[0] = address half of the hash
    _port_or_id(a, 0, ICMP_ECHO, 2, no_port="hash_done", have="mix")
    a.label("mix")
    a.tax()  # X = sport
    a.ld_mem(0)
    a.xor_x()
    a.mod(nq)
    a.ret_a()
    a.label("hash_done")  # sport = 0
    a.ld_mem(0)
    a.mod(nq)
    a.ret_a()
    a.label("queue0")
    a.ret(0)
    return a


def outside_program(nq: int, port_lo: int = DEFAULT_PORT_LO, block: int | None = None) -> Asm:
    """Steer by the destination port's block: ``((dport - port_lo) // block) % nq``."""
    block = _check_steer_args(nq, port_lo, block)
    a = Asm()
    _ipv4_prologue(a, "queue0")
    _port_or_id(a, 2, ICMP_ECHOREPLY, 0, no_port="queue0", have="dport")
    a.label("dport")  # A = dport
    a.jge(port_lo, jt="in_range")
    a.mod(nq)  # below the NAT range: dport % nq
    a.ret_a()
    a.label("in_range")
    a.sub(port_lo)
    a.div(block)
    a.mod(nq)
    a.ret_a()
    a.label("queue0")
    a.ret(0)
    return a


def steering_program(mode: str, nq: int, port_lo: int = DEFAULT_PORT_LO, block: int | None = None) -> Asm:
    """The fanout program for an ``inside`` or ``outside`` port."""
    if mode == "inside":
        return inside_program(nq)
    if mode == "outside":
        return outside_program(nq, port_lo, block)
    raise BpfError(f"steering mode must be 'inside' or 'outside', got {mode!r}")


def drop_all_program() -> Asm:
    """Accept nothing: a socket filter that keeps a socket silent while it is set up."""
    return Asm().ret(0)


def drop_outgoing_program() -> Asm:
    """Accept everything except frames this host sends (skb->pkt_type == PACKET_OUTGOING)."""
    a = Asm()
    a.ld_pkttype()
    a.jeq(PACKET_OUTGOING, jt="drop")
    a.ret(0xFFFF_FFFF)
    a.label("drop")
    a.ret(0)
    return a


# --- the reference: the same function in plain Python ----------------------------


def steering_queue(
    frame: bytes, mode: str, nq: int, port_lo: int = DEFAULT_PORT_LO, block: int | None = None
) -> int:
    """Queue for one Ethernet frame (untagged, 14-byte header), exactly as the programs compute it.

    Slow path and tests only: the hot path steers bursts with numpy.
    """
    block = _check_steer_args(nq, port_lo, block)
    if mode not in ("inside", "outside"):
        raise BpfError(f"steering mode must be 'inside' or 'outside', got {mode!r}")
    net = memoryview(frame)[14:]
    try:
        if len(frame) < 14 or frame[12] << 8 | frame[13] != ETH_P_IP or not 0x45 <= net[0] <= 0x4F:
            return 0
        addr_hash = 0
        if mode == "inside":
            src_ip = struct.unpack_from("!I", net, 12)[0]
            addr_hash = (src_ip & 0xFFFF) ^ (src_ip >> 16)
        port = 0
        frag = struct.unpack_from("!H", net, 6)[0] & 0x3FFF
        proto = net[9]
        ihl = (net[0] & 0xF) * 4
        if not frag:
            if proto in (IPPROTO_TCP, IPPROTO_UDP):
                port = struct.unpack_from("!H", net, ihl + (0 if mode == "inside" else 2))[0]
            elif proto == IPPROTO_ICMP:
                want = ICMP_ECHO if mode == "inside" else ICMP_ECHOREPLY
                if net[ihl] == want:
                    port = struct.unpack_from("!H", net, ihl + 4)[0]
                elif net[ihl] in ICMP_ERRORS:
                    port = _quoted_port(net, ihl + 8, "dst" if mode == "inside" else "src")
    except (IndexError, struct.error):
        return 0  # the kernel aborts a program that reads past the end: return value 0
    if mode == "inside":
        return (addr_hash ^ port) % nq
    if port >= port_lo:
        return ((port - port_lo) // block) % nq
    return port % nq


def _quoted_port(net: memoryview, e: int, which: str) -> int:
    """The ``which`` ("src"/"dst") port of the TCP/UDP packet quoted at ``net[e:]`` by an
    ICMP error, or the identifier of a quoted echo/echo reply; 0 when the quote is not
    IPv4, of another protocol or type, or too short for the bytes read (never an abort)."""
    n = len(net)
    if n < e + 24 or not 0x45 <= net[e] <= 0x4F:
        return 0
    el4 = e + (net[e] & 0xF) * 4
    if net[e + 9] in (IPPROTO_TCP, IPPROTO_UDP):
        if n < el4 + 4:
            return 0
        return struct.unpack_from("!H", net, el4 + (0 if which == "src" else 2))[0]
    if net[e + 9] == IPPROTO_ICMP:
        if n < el4 + 6 or net[el4] not in (ICMP_ECHOREPLY, ICMP_ECHO):
            return 0
        return struct.unpack_from("!H", net, el4 + 4)[0]
    return 0
