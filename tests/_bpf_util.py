"""A small classic-BPF interpreter for tests, written from the kernel's documented semantics.

It runs a program on an Ethernet frame as the kernel presents a *received*
skb to a fanout program: ``skb->data`` at the network header (positive
absolute offsets are relative to it), ``SKF_NET_OFF``/``SKF_LL_OFF`` relative
to the network/MAC header, ancillary loads for protocol/pkttype/ifindex/len.
A load past the end, or a division by X == 0, ends the program with 0.
"""

from __future__ import annotations

from hotplane.shared import bpf as b


class UnsupportedInstruction(Exception):
    """A cBPF instruction this test interpreter does not model (the kernel may still accept it)."""


class _Abort(Exception):
    pass


def _signed32(k: int) -> int:
    return k - (1 << 32) if k & 0x8000_0000 else k


def _load(frame: bytes, off: int, size: int, *, mac_len: int = 14) -> int:
    """Load ``size`` bytes big-endian at a BPF offset (after ancillary handling)."""
    if off >= 0:
        base = mac_len + off  # skb->data is the network header
    elif off >= b.SKF_NET_OFF:
        base = mac_len + (off - b.SKF_NET_OFF)
    elif off >= b.SKF_LL_OFF:
        base = off - b.SKF_LL_OFF
    else:
        raise _Abort
    if base < 0 or base + size > len(frame):
        raise _Abort
    return int.from_bytes(frame[base : base + size], "big")


_SIZES = {b.W: 4, b.H: 2, b.B: 1}


def run(prog, frame: bytes, *, pkttype: int = 0, ifindex: int = 1, mac_len: int = 14) -> int:
    """Return value of ``prog`` (an :class:`bpf.Asm` or (code, jt, jf, k) tuples) on ``frame``."""
    insns = b.program(prog)
    A = X = 0
    M = [0] * 16
    pc = 0
    steps = 0
    try:
        while True:
            steps += 1
            if pc >= len(insns) or steps > 10_000:
                raise AssertionError("program ran off its end")
            code, jt, jf, k = insns[pc]
            pc += 1
            cls = code & 0x07
            if cls == b.LD:
                mode, size = code & 0xE0, code & 0x18
                if mode == b.IMM:
                    A = k
                elif mode == b.MEM:
                    A = M[k]
                elif mode == b.LEN:
                    A = len(frame) - mac_len
                elif mode == b.ABS and b.SKF_AD_OFF <= _signed32(k) < 0:
                    ad = _signed32(k) - b.SKF_AD_OFF
                    if ad == b.SKF_AD_PROTOCOL:
                        A = int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
                    elif ad == b.SKF_AD_PKTTYPE:
                        A = pkttype
                    elif ad == b.SKF_AD_IFINDEX:
                        A = ifindex
                    else:
                        raise UnsupportedInstruction(f"ancillary load {ad}")
                elif mode == b.ABS:
                    A = _load(frame, _signed32(k), _SIZES[size], mac_len=mac_len)
                elif mode == b.IND:
                    A = _load(frame, X + _signed32(k), _SIZES[size], mac_len=mac_len)
                else:
                    raise UnsupportedInstruction(hex(code))
            elif cls == b.LDX:
                mode = code & 0xE0
                if mode == b.IMM:
                    X = k
                elif mode == b.MEM:
                    X = M[k]
                elif mode == b.LEN:
                    X = len(frame) - mac_len
                elif mode == b.MSH:
                    X = (_load(frame, _signed32(k), 1, mac_len=mac_len) & 0xF) * 4
                else:
                    raise UnsupportedInstruction(hex(code))
            elif cls == b.ST:
                M[k] = A
            elif cls == b.STX:
                M[k] = X
            elif cls == b.ALU:
                op = code & 0xF0
                v = X if code & b.X else k
                if op == b.ADD:
                    A = A + v
                elif op == b.SUB:
                    A = A - v
                elif op == b.MUL:
                    A = A * v
                elif op in (b.DIV, b.MOD):
                    if v == 0:
                        raise _Abort
                    A = A // v if op == b.DIV else A % v
                elif op == b.OR:
                    A = A | v
                elif op == b.AND:
                    A = A & v
                elif op == b.LSH:
                    A = A << (v & 31)
                elif op == b.RSH:
                    A = A >> (v & 31)
                elif op == b.NEG:
                    A = -A
                elif op == b.XOR:
                    A = A ^ v
                else:
                    raise UnsupportedInstruction(hex(code))
                A &= 0xFFFF_FFFF
            elif cls == b.JMP:
                op = code & 0xF0
                if op == b.JA:
                    pc += k
                    continue
                v = X if code & b.X else k
                cond = {b.JEQ: A == v, b.JGT: A > v, b.JGE: A >= v, b.JSET: bool(A & v)}[op]
                pc += jt if cond else jf
            elif cls == b.RET:
                return A if code & b.RET_A else k
            elif cls == b.MISC:
                if code & 0xF8 == b.TXA:
                    A = X
                else:
                    X = A
            else:
                raise UnsupportedInstruction(hex(code))
    except _Abort:
        return 0
