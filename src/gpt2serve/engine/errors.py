"""Typed engine errors; the API maps each class to one HTTP status."""

from __future__ import annotations


class GPT2ServeError(Exception):
    """Base class of every error gpt2serve raises on purpose."""


class InvalidParameterError(GPT2ServeError, ValueError):
    """A request parameter is out of range; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class ModelLoadError(GPT2ServeError):
    """A model could not be found or read."""


class EngineOverloadedError(GPT2ServeError):
    """The request queue is full; the caller should retry later."""


class RequestTimeoutError(GPT2ServeError):
    """A request ran past its deadline."""


class EngineStoppedError(GPT2ServeError):
    """The engine is not running (still loading, or shutting down)."""


class NonFiniteLogitsError(GPT2ServeError):
    """A row's logits became NaN or infinite (a broken checkpoint); only its request fails."""
