"""Errors of a remote cloud backend, mapped to HTTP by `pice.cloud.api.errors` like every
`PiceError`: the upstream failed (502) or did not answer in time (504)."""

from __future__ import annotations

from pice.shared.errors import PiceError


class UpstreamError(PiceError):
    """The upstream server failed: refused connections, answered 5xx after every retry, rejected
    the request, or closed a stream mid-answer."""

    status_code = 502


class UpstreamTimeoutError(PiceError):
    """The upstream server did not answer within the configured timeout."""

    status_code = 504
