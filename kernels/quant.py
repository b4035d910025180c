"""GGUF (ggml) block formats in torch: the reference dequantisation of every format pice keeps
in memory (the kernels in csrc/quant are tested against it), and simple quantizers that write
valid blocks (tests' tiny models, and the `int8` / `int4` weight-only path for safetensors
models). A quantized matrix [N, K] is a uint8 tensor [N, row_bytes(fmt, K)]: each row is K / elems
blocks, laid out exactly as in a GGUF file, so GGUF tensors load with one copy."""

from __future__ import annotations

from enum import IntEnum

import torch


class Fmt(IntEnum):
    """ggml type ids (gguf.GGMLQuantizationType)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q5_0 = 6
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# format -> (elements per block, bytes per block)
BLOCKS: dict[Fmt, tuple[int, int]] = {
    Fmt.F32: (1, 4), Fmt.F16: (1, 2), Fmt.BF16: (1, 2), Fmt.Q4_0: (32, 18), Fmt.Q5_0: (32, 22),
    Fmt.Q8_0: (32, 34), Fmt.Q4_K: (256, 144), Fmt.Q5_K: (256, 176), Fmt.Q6_K: (256, 210),
}


def row_bytes(fmt: Fmt, k: int) -> int:
    elems, size = BLOCKS[fmt]
    if k % elems:
        raise ValueError(f"row length {k} is not a multiple of {fmt.name}'s block of {elems}")
    return k // elems * size


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[nb, 2] uint8 -> [nb, 1] float32 (little-endian fp16)."""
    return b.contiguous().view(torch.float16).float()


def _scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, 12] packed 6-bit (scale, min) pairs -> two [nb, 8] float32 (ggml get_scale_min_k4)."""
    s = s.to(torch.int32)
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), 1).float(), torch.cat((lo_m, hi_m), 1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., 2n] int32: all low nibbles, then all high nibbles."""
    q = qs.to(torch.int32)
    return torch.cat((q & 0xF, q >> 4), -1)


_CHUNK = 1 << 22  # values per piece of a large matrix: bounds the temporaries of (de)quantizing


def dequantize(w: torch.Tensor, fmt: Fmt, k: int) -> torch.Tensor:
    """uint8 [N, row_bytes] -> float32 [N, k]: the torch reference of every format. A large
    matrix goes in pieces of rows into one output, so the peak memory is the output plus the
    temporaries of one piece (an embedding table is 0.5 GB in float32)."""
    n = w.shape[0]
    rows = max(1, _CHUNK // max(k, 1))
    if n > rows:
        out = torch.empty(n, k, dtype=torch.float32)
        for r0 in range(0, n, rows):
            out[r0:r0 + rows] = _dequantize(w[r0:r0 + rows], fmt, k)
        return out
    return _dequantize(w, fmt, k)


def _dequantize(w: torch.Tensor, fmt: Fmt, k: int) -> torch.Tensor:
    n = w.shape[0]
    size = BLOCKS[fmt][1]
    if fmt in (Fmt.F32, Fmt.F16):
        return w.contiguous().view(torch.float32 if fmt == Fmt.F32 else torch.float16).float()
    if fmt == Fmt.BF16:
        return w.contiguous().view(torch.bfloat16).float()
    b = w.reshape(-1, size)  # [blocks, size]
    if fmt == Fmt.Q8_0:
        out = _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()
    elif fmt == Fmt.Q4_0:
        out = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8).float()
    elif fmt == Fmt.Q5_0:
        qh = b[:, 2:6].contiguous().view(torch.int32)  # [blocks, 1]
        bits = (qh >> torch.arange(32, dtype=torch.int32)) & 1  # [blocks, 32]
        out = _f16(b[:, :2]) * ((_nibbles(b[:, 6:]) | (bits << 4)) - 16).float()
    elif fmt in (Fmt.Q4_K, Fmt.Q5_K):
        sc, mn = _scales_k4(b[:, 4:16])  # [blocks, 8]
        five = fmt == Fmt.Q5_K
        qs = b[:, 48:] if five else b[:, 16:]
        q = _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)  # sub-block j = 2c (+1 high)
        if five:
            j = torch.arange(8, dtype=torch.int32)[None, :, None]
            q = q | (((b[:, None, 16:48].to(torch.int32) >> j) & 1) << 4)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [blocks, 1]
        out = ((d * sc)[:, :, None] * q.float() - (dmin * mn)[:, :, None]).reshape(-1, 256)
    elif fmt == Fmt.Q6_K:
        ql = b[:, :128].reshape(-1, 2, 2, 32).to(torch.int32)  # [blocks, half, a/b, 32]
        qh = b[:, 128:192].reshape(-1, 2, 1, 32).to(torch.int32)  # [blocks, half, 1, 32]
        sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [blocks, 16]
        low = torch.cat((ql & 0xF, ql >> 4), 2)  # [blocks, half, 4, 32]: q1 q2 q3 q4
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[None, None, :, None]
        q = (low | (((qh >> shifts) & 3) << 4)) - 32  # [blocks, half, 4, 32]
        scaled = q.float().reshape(-1, 2, 4, 2, 16) * sc.reshape(-1, 2, 4, 2, 1)
        out = _f16(b[:, 208:210]).reshape(-1, 1) * scaled.reshape(-1, 256)
    else:
        raise ValueError(f"no reference for {fmt!r}")
    return out.reshape(n, k)


# ---- quantizers (round to nearest; simpler than llama.cpp's searches, but valid blocks) -----

def _to_f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[nb] float -> [nb, 2] uint8."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 2n] int (0..15) -> [..., n] uint8: value i low nibble, value i + n high nibble."""
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def quantize(w: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    """float [N, K] -> uint8 [N, row_bytes(fmt, K)], a large matrix in pieces of rows (the
    temporaries of one piece at a time)."""
    n, k = w.shape
    rb = row_bytes(fmt, k)  # validates the block size
    rows = max(1, _CHUNK // max(k, 1))
    if n > rows:
        out = torch.empty(n, rb, dtype=torch.uint8)
        for r0 in range(0, n, rows):
            out[r0:r0 + rows] = _quantize(w[r0:r0 + rows], fmt)
        return out
    return _quantize(w, fmt)


def _quantize(w: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    n = w.shape[0]
    x = w.detach().float().reshape(-1, BLOCKS[fmt][0])  # [blocks, elems]
    if fmt in (Fmt.F32, Fmt.F16, Fmt.BF16):
        dt = {Fmt.F32: torch.float32, Fmt.F16: torch.float16, Fmt.BF16: torch.bfloat16}[fmt]
        return w.detach().to(dt).contiguous().view(torch.uint8).reshape(n, -1)
    if fmt == Fmt.Q8_0:
        d = x.abs().amax(1) / 127
        d16 = d.to(torch.float16).float()
        q = torch.where(d16[:, None] > 0, x / d16[:, None], 0).round().clamp(-127, 127)
        out = torch.cat((_to_f16_bytes(d), q.to(torch.int8).view(torch.uint8)), 1)
    elif fmt in (Fmt.Q4_0, Fmt.Q5_0):
        levels = 8 if fmt == Fmt.Q4_0 else 16
        idx = x.abs().argmax(1, keepdim=True)
        d = (x.gather(1, idx) / -levels).squeeze(1)
        d16 = d.to(torch.float16).float()
        q = (torch.where(d16[:, None] != 0, x / d16[:, None], 0).round() + levels)
        q = q.clamp(0, 2 * levels - 1).to(torch.int32)
        parts = [_to_f16_bytes(d)]
        if fmt == Fmt.Q5_0:
            bits = ((q >> 4) & 1) << torch.arange(32, dtype=torch.int32)
            parts.append(bits.sum(1, dtype=torch.int32).view(torch.uint8).reshape(-1, 4))
        parts.append(_pack_nibbles(q & 0xF))
        out = torch.cat(parts, 1)
    elif fmt in (Fmt.Q4_K, Fmt.Q5_K):
        out = _quantize_q45k(x, five=fmt == Fmt.Q5_K)
    elif fmt == Fmt.Q6_K:
        out = _quantize_q6k(x)
    else:
        raise ValueError(f"no quantizer for {fmt!r}")
    return out.reshape(n, -1).contiguous()


def _quantize_q45k(x: torch.Tensor, five: bool) -> torch.Tensor:
    top = 31 if five else 15
    sub = x.reshape(-1, 8, 32)  # [blocks, 8, 32]
    mins = (-sub.amin(2)).clamp(min=0)  # stored positive: value = d*sc*q - dmin*m
    scales = (sub.amax(2) + mins) / top
    d = scales.amax(1) / 63
    dmin = mins.amax(1) / 63
    d16, dmin16 = d.to(torch.float16).float(), dmin.to(torch.float16).float()
    sc = torch.where(d16[:, None] > 0, scales / d16[:, None], 0).round().clamp(0, 63)
    mn = torch.where(dmin16[:, None] > 0, mins / dmin16[:, None], 0).round().clamp(0, 63)
    step, off = (d16[:, None] * sc)[:, :, None], (dmin16[:, None] * mn)[:, :, None]
    q = torch.where(step > 0, (sub + off) / step, 0).round().clamp(0, top).to(torch.int32)
    sc_i, mn_i = sc.to(torch.int32), mn.to(torch.int32)
    packed = torch.cat((
        sc_i[:, :4] | ((sc_i[:, 4:] >> 4) << 6),
        mn_i[:, :4] | ((mn_i[:, 4:] >> 4) << 6),
        (sc_i[:, 4:] & 0xF) | ((mn_i[:, 4:] & 0xF) << 4)), 1).to(torch.uint8)  # [blocks, 12]
    pairs = q.reshape(-1, 4, 2, 32)  # chunk c holds sub-blocks 2c (low) and 2c + 1 (high)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).to(torch.uint8).reshape(-1, 128)
    parts = [_to_f16_bytes(d), _to_f16_bytes(dmin), packed]
    if five:
        j = torch.arange(8, dtype=torch.int32)[None, :, None]
        parts.append((((q >> 4) & 1) << j).sum(1).to(torch.uint8))  # [blocks, 32]
    parts.append(qs)
    return torch.cat(parts, 1)


def _quantize_q6k(x: torch.Tensor) -> torch.Tensor:
    groups = x.reshape(-1, 16, 16)  # [blocks, 16 groups, 16]
    idx = groups.abs().argmax(2, keepdim=True)
    scales = groups.gather(2, idx).squeeze(2) / -32  # [blocks, 16]
    big = scales.abs().argmax(1, keepdim=True)
    d = (scales.gather(1, big) / -128).squeeze(1)
    d16 = d.to(torch.float16).float()
    sc = torch.where(d16[:, None] != 0, scales / d16[:, None], 0).round().clamp(-128, 127)
    step = (d16[:, None] * sc)[:, :, None]
    q = (torch.where(step != 0, groups / step, 0).round() + 32).clamp(0, 63).to(torch.int32)
    q = q.reshape(-1, 2, 4, 32)  # [blocks, half, q1..q4, 32]
    low, high = q & 0xF, q >> 4
    ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), 2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat((ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8),
                      sc.to(torch.int8).view(torch.uint8), _to_f16_bytes(d)), 1)
