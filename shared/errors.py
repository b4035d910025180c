"""Typed errors. Bad input raises a subclass of `PiceError`; the API maps them to HTTP codes in
exactly one place (`pice.cloud.api.errors`)."""

from __future__ import annotations


class PiceError(Exception):
    """Base class of every error pice raises on purpose."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the request field at fault, when there is one


class BadRequestError(PiceError):
    """The request is malformed or a value is out of range."""

    status_code = 400


class ContextLengthError(BadRequestError):
    """Prompt (plus requested new tokens) does not fit the model's context window."""


class NotFoundError(PiceError):
    """A named resource (model, adapter) does not exist or is not visible to the caller."""

    status_code = 404


class ModelNotFoundError(NotFoundError):
    """A model spec resolves to nothing: no alias, no local path, no hub id that can be fetched."""


class ChecksumMismatchError(PiceError):
    """An assembled or downloaded file does not match its published sha256; it is never used."""

    status_code = 500


class UnsupportedModelError(BadRequestError):
    """The model's architecture or file format is not supported."""


class NotReadyError(PiceError):
    """Models are still loading."""

    status_code = 503


class AuthenticationError(PiceError):
    """API keys are configured and the request's key is missing or unknown."""

    status_code = 401


class ForbiddenError(PiceError):
    """The caller may see the resource but not change it (e.g. another tenant's public adapter)."""

    status_code = 403


class ConflictError(PiceError):
    """The resource already exists (e.g. an adapter name taken by the same tenant)."""

    status_code = 409


class PayloadTooLargeError(PiceError):
    """An uploaded file is over the configured size limit."""

    status_code = 413


class InvalidAdapterError(BadRequestError):
    """A LoRA adapter is malformed or does not fit the engine's model (named in the message)."""


class WireFormatError(BadRequestError):
    """An edge-agent frame is over the size cap or does not match its message schema."""
