"""Domain errors of the coordinator; the API layer maps them to HTTP status codes."""

from __future__ import annotations

__all__ = [
    "BadRequest", "CoordinatorError", "FederationFailed", "Forbidden", "NotFound", "PayloadTooLarge",
    "RequestTimeout", "StaleUpdate", "TooManyRequests", "Unauthorized", "Unavailable",
]


class CoordinatorError(Exception):
    status_code = 500


class BadRequest(CoordinatorError):
    """Input that can never be accepted (malformed update, bad config)."""

    status_code = 422


class Unauthorized(CoordinatorError):
    status_code = 401


class Forbidden(CoordinatorError):
    status_code = 403


class NotFound(CoordinatorError):
    status_code = 404


class StaleUpdate(CoordinatorError):
    """An upload for a round that is closed, past its deadline, or not this agent's."""

    status_code = 409


class PayloadTooLarge(CoordinatorError):
    status_code = 413


class TooManyRequests(CoordinatorError):
    status_code = 429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(CoordinatorError):
    """Storage or database trouble (disk full, I/O error, database down): retry later.
    Nothing was accepted."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FederationFailed(CoordinatorError):
    """A round of this federation cannot be closed (the reason is in the message)."""

    status_code = 409


class RequestTimeout(CoordinatorError):
    """The request body did not arrive in time."""

    status_code = 408
