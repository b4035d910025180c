"""The data plane of an edge group: stage → next stage over one TCP connection, in a ring (the
last stage's next is the first). No pickle: a fixed little-endian header, fixed-size per-sequence
records, then the raw tensor bytes.

Connection opening (dialler → listener, once):
    HELLO   "<8sHIH"  magic b"PICEGRP1", version u16, epoch u32, token length u16; token bytes
    reply   one byte 0x01 when the listener accepts (token equal to its group token of that
            epoch, compared in constant time); otherwise it closes without a reply.
After that the connection carries frames one way, dialler → listener.

Frame header "<2sBBBBHII" (16 bytes):
    magic b"PG" | version u8 | kind u8 | dtype u8 | reserved u8 | n_seqs u16 | n_tokens u32 |
    width u32
then n_seqs records of the kind's layout, then n_tokens × width elements of dtype (FORWARD only).

    FORWARD (1) record "<QIIHIddq" (46 bytes): seq_id, start (tokens whose K/V every later stage
        already holds), q_len (new tokens in this frame), flags (bit 0: new sequence, drop any
        K/V held for seq_id; bit 1: hold the end, the sequence is under its min_tokens so the
        last stage may not sample an end-of-sequence id), top_k, temperature, top_p (float64:
        exactly the request's values, as the last stage samples with them), seed (-1: none).
        The hidden states of all sequences' new tokens follow, concatenated in record order:
        [n_tokens, width].
    RESULT (2)  record "<QIf" (16 bytes): seq_id, sampled token, its log-probability.
    END (3)     record "<Q" (8 bytes): seq_id, finished: free its K/V (passed along the ring).

dtype codes: 0 float32, 1 float16, 2 bfloat16. Frames over the caps below are refused and the
connection closed."""

from __future__ import annotations

import hmac
import socket
import struct
from dataclasses import dataclass

import torch

from pice.shared.errors import WireFormatError

MAGIC_HELLO = b"PICEGRP1"
MAGIC_FRAME = b"PG"
VERSION = 1
HELLO = struct.Struct("<8sHIH")
HEADER = struct.Struct("<2sBBBBHII")
FORWARD, RESULT, END = 1, 2, 3
RECORDS = {FORWARD: struct.Struct("<QIIHIddq"), RESULT: struct.Struct("<QIf"),
           END: struct.Struct("<Q")}
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
CODES = {v: k for k, v in DTYPES.items()}
MAX_SEQS = 4096
MAX_TOKENS = 1 << 20
MAX_WIDTH = 1 << 16
MAX_PAYLOAD = 1 << 30
MAX_TOKEN_BYTES = 256
NEW_SEQ = 1  # FORWARD flags bit 0
HOLD_END = 2  # FORWARD flags bit 1


@dataclass(frozen=True)
class Fwd:
    """One sequence's part of a FORWARD frame."""

    seq_id: int
    start: int  # tokens already cached on every later stage
    q_len: int  # new tokens carried now
    new: bool = False  # first frame of this sequence (or a replay): drop stale K/V
    top_k: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    hold_end: bool = False  # under min_tokens: the last stage masks its end-of-sequence ids


@dataclass(frozen=True)
class Frame:
    kind: int
    fwd: tuple[Fwd, ...] = ()  # FORWARD
    hidden: torch.Tensor | None = None  # FORWARD: [n_tokens, width]
    results: tuple[tuple[int, int, float], ...] = ()  # RESULT: (seq_id, token, logprob)
    ended: tuple[int, ...] = ()  # END: seq ids


def encode(frame: Frame) -> bytes:
    if frame.kind == FORWARD:
        assert frame.hidden is not None
        h = frame.hidden.contiguous()  # [n_tokens, width]
        n, width = h.shape
        assert n == sum(f.q_len for f in frame.fwd), (n, frame.fwd)
        rec = RECORDS[FORWARD]
        body = b"".join(rec.pack(f.seq_id, f.start, f.q_len,
                                 (NEW_SEQ if f.new else 0) | (HOLD_END if f.hold_end else 0),
                                 f.top_k, f.temperature, f.top_p, -1 if f.seed is None else f.seed)
                        for f in frame.fwd)
        payload = h.view(torch.uint8).numpy().tobytes()
        return HEADER.pack(MAGIC_FRAME, VERSION, FORWARD, CODES[h.dtype], 0, len(frame.fwd),
                           n, width) + body + payload
    if frame.kind == RESULT:
        body = b"".join(RECORDS[RESULT].pack(*r) for r in frame.results)
        return HEADER.pack(MAGIC_FRAME, VERSION, RESULT, 0, 0, len(frame.results), 0, 0) + body
    body = b"".join(RECORDS[END].pack(s) for s in frame.ended)
    return HEADER.pack(MAGIC_FRAME, VERSION, END, 0, 0, len(frame.ended), 0, 0) + body


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def read_frame(sock: socket.socket, width: int | None = None) -> Frame:
    """The next frame; WireFormatError (naming the field) for anything malformed or over a cap.
    `width`: the hidden size this stage expects."""
    magic, version, kind, code, _, n_seqs, n_tokens, w = HEADER.unpack(
        recv_exact(sock, HEADER.size))
    if magic != MAGIC_FRAME or version != VERSION:
        raise WireFormatError(f"bad frame magic/version {magic!r}/{version}")
    if kind not in RECORDS:
        raise WireFormatError(f"unknown frame kind {kind}")
    if n_seqs > MAX_SEQS or n_tokens > MAX_TOKENS or w > MAX_WIDTH:
        raise WireFormatError(f"frame over the caps: n_seqs={n_seqs} n_tokens={n_tokens} "
                              f"width={w}")
    rec = RECORDS[kind]
    raw = recv_exact(sock, rec.size * n_seqs)
    rows = [rec.unpack_from(raw, i * rec.size) for i in range(n_seqs)]
    if kind == RESULT:
        return Frame(RESULT, results=tuple((int(s), int(t), float(lp)) for s, t, lp in rows))
    if kind == END:
        return Frame(END, ended=tuple(int(r[0]) for r in rows))
    if code not in DTYPES:
        raise WireFormatError(f"unknown dtype code {code}")
    if width is not None and w != width:
        raise WireFormatError(f"width {w} does not match the model's hidden size {width}")
    fwd = tuple(Fwd(s, start, q, bool(flags & NEW_SEQ), top_k, temp, top_p,
                    None if seed < 0 else seed, bool(flags & HOLD_END))
                for s, start, q, flags, top_k, temp, top_p, seed in rows)
    if sum(f.q_len for f in fwd) != n_tokens:
        raise WireFormatError(f"n_tokens {n_tokens} != the records' q_len sum")
    dtype = DTYPES[code]
    size = n_tokens * w * dtype.itemsize
    if size > MAX_PAYLOAD:
        raise WireFormatError(f"payload of {size} bytes over the {MAX_PAYLOAD}-byte cap")
    payload = recv_exact(sock, size)
    hidden = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(n_tokens, w) \
        if size else torch.empty(n_tokens, w, dtype=dtype)
    return Frame(FORWARD, fwd=fwd, hidden=hidden)


def hello(epoch: int, token: str) -> bytes:
    raw = token.encode()
    assert len(raw) <= MAX_TOKEN_BYTES
    return HELLO.pack(MAGIC_HELLO, VERSION, epoch, len(raw)) + raw


def read_hello(sock: socket.socket) -> tuple[int, bytes]:
    """(epoch, token bytes) of a dialler's HELLO."""
    magic, version, epoch, n = HELLO.unpack(recv_exact(sock, HELLO.size))
    if magic != MAGIC_HELLO or version != VERSION:
        raise WireFormatError(f"bad hello magic/version {magic!r}/{version}")
    if n > MAX_TOKEN_BYTES:
        raise WireFormatError(f"token of {n} bytes over the {MAX_TOKEN_BYTES}-byte cap")
    return epoch, bytes(recv_exact(sock, n))


def token_ok(got: bytes, expected: str) -> bool:
    return hmac.compare_digest(got, expected.encode())
