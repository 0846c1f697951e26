"""The errors the admin API's services raise; the API layer maps each to its HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the store's state refuses; the message says what and is shown to the caller as it is."""


class NotFound(ServiceError, LookupError):
    """What the request names does not exist (HTTP 404)."""


class Conflict(ServiceError):
    """The request does not fit the current state: the id or a key is taken, the job's status forbids the
    change, the coordinator lacks what it needs (HTTP 409)."""
