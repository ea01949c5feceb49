"""The runtime's exceptions: one hierarchy, each carrying the HTTP status it maps to.

Library code raises these; only the HTTP layer turns them into `{"error": ...}` responses
and only `serve.main` turns start-up errors into exit codes.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: something the runtime cannot do, with the HTTP status to answer with."""

    status = 500


class ConfigError(ServingError, ValueError):
    """A server option is invalid (raised before anything starts)."""


class BadRequest(ServingError):
    """The request is malformed: the message says what was expected and what arrived."""

    status = 400


class NotFound(ServingError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class ServiceUnavailable(ServingError):
    """Overloaded, draining, or not enough workers answered; retry later."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(ServingError):
    """The request's own deadline (parameter `timeout_ms`) passed before it was answered."""

    status = 504


class BodyTimeout(ServingError):
    """The request body did not arrive within --read-timeout-s (e.g. a lying Content-Length)."""

    status = 408


class ClientDisconnected(ServingError):
    """The client closed the connection before its request was read or answered; nobody
    is left to answer, so this is counted, not logged as a server error."""

    status = 499  # nginx's "client closed request"; never reaches the client


class WorkerError(Exception):
    """A worker call did not produce a result; the scheduler counts it as an erasure."""

    reason = "error"


class WorkerDead(WorkerError):
    """The worker died (or was killed by fault injection) and awaits its restart."""

    reason = "dead"


class WorkerOverdue(WorkerError):
    """The worker missed its per-call deadline."""

    reason = "overdue"


class InjectedFailure(WorkerError):
    """A call failed on purpose (`--fault-fail-prob`)."""

    reason = "injected"


class EngineUnavailable(ServingError):
    """The requested inference engine (TensorRT, torch, CUDA) cannot be used here."""
