"""The edge-group data plane: frames round-trip bit for bit in every dtype, malformed or oversized
frames are refused with a message naming the problem, and a listener refuses a dialler without
the group token of the current plan (real sockets on loopback)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch

from pice.edge.group import wire
from pice.edge.group.node import StageConfig, StageNode
from pice.shared.errors import WireFormatError


def roundtrip(data: bytes, width: int | None = None) -> wire.Frame:
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=a.sendall, args=(data,), daemon=True).start()
        return wire.read_frame(b, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_frame_roundtrips_exactly(dtype: torch.dtype) -> None:
    fwd = (wire.Fwd(7, 0, 3, True, 100_000, 0.7, 0.9, 123, hold_end=True),
           wire.Fwd(2**40, 17, 1), wire.Fwd(3, 5, 1, hold_end=True))
    hidden = torch.randn(5, 64).to(dtype)  # [n_tokens, width]
    got = roundtrip(wire.encode(wire.Frame(wire.FORWARD, fwd=fwd, hidden=hidden)), 64)
    assert got.fwd == fwd
    assert got.hidden is not None and got.hidden.dtype == dtype
    assert torch.equal(got.hidden.view(torch.uint8), hidden.view(torch.uint8))  # bit for bit


def test_result_and_end_frames_roundtrip() -> None:
    res = ((1, 42, -0.5), (9, 0, -3.25))
    assert roundtrip(wire.encode(wire.Frame(wire.RESULT, results=res))).results == res
    assert roundtrip(wire.encode(wire.Frame(wire.END, ended=(3, 4)))).ended == (3, 4)


def test_bytes_per_token_step_are_the_hidden_state_plus_a_small_header() -> None:
    frame = wire.Frame(wire.FORWARD, fwd=(wire.Fwd(1, 10, 1),), hidden=torch.zeros(1, 896))
    assert len(wire.encode(frame)) == wire.HEADER.size + 46 + 896 * 4


@pytest.mark.parametrize(("patch", "message"), [
    (lambda h: b"XX" + h[2:], "magic"),
    (lambda h: h[:3] + bytes([9]) + h[4:], "unknown frame kind"),
    (lambda h: h[:4] + bytes([7]) + h[5:], "unknown dtype"),
    (lambda h: h[:6] + struct.pack("<H", 5000) + h[8:], "over the caps"),
])
def test_malformed_frames_are_refused(patch: object, message: str) -> None:
    frame = wire.encode(wire.Frame(wire.FORWARD, fwd=(wire.Fwd(1, 0, 2),),
                                   hidden=torch.zeros(2, 8)))
    bad = patch(frame[:wire.HEADER.size]) + frame[wire.HEADER.size:]  # type: ignore[operator]
    with pytest.raises(WireFormatError, match=message):
        roundtrip(bad + bytes(4096), 8)


def test_width_mismatch_is_refused() -> None:
    frame = wire.encode(wire.Frame(wire.FORWARD, fwd=(wire.Fwd(1, 0, 1),),
                                   hidden=torch.zeros(1, 8)))
    with pytest.raises(WireFormatError, match="width 8"):
        roundtrip(frame, 16)


def test_listener_refuses_a_wrong_token_and_accepts_the_right_one(tmp_path: object) -> None:
    node = StageNode()
    try:
        # a plan whose model cannot load: the token check needs only the plan itself
        cfg = StageConfig(group="g", epoch=3, model="/nonexistent", index=1, n_stages=2,
                          start=0, end=1, next_addr=None, token="s3cret", num_blocks=4)
        node.configure(cfg)
        host, port = node.addr.rsplit(":", 1)
        for token, epoch, accepted in (("wrong", 3, False), ("s3cret", 2, False),
                                       ("s3cret", 3, True)):
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(wire.hello(epoch, token))
                assert (s.recv(1) == b"\x01") is accepted, (token, epoch)
        assert node.wait_ready(3, timeout=60) is not None  # and the bad model is reported
    finally:
        node.close()
