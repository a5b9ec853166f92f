"""Domain errors of the coordinator; the API layer maps them to HTTP status codes."""

from __future__ import annotations

__all__ = [
    "BadRequest", "CoordinatorError", "Forbidden", "NotFound", "PayloadTooLarge",
    "StaleUpdate", "Unauthorized",
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
