"""Admin-API tokens and who may do what.

Tokens are ``ftk_`` + 32 random bytes (URL-safe base64), shown once when created; the store keeps
only their SHA-256 (a token has 256 bits of entropy, so a plain hash cannot be brute-forced and
lookups stay constant-time by hash). Who may do what is not written here: :data:`PERMISSIONS` is
derived from :data:`fedtune.compliance.actions.API_ROUTE_ACTIONS`, the one table of the API's actions
(description and roles). Deny by default: an action missing from it is allowed to nobody.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.compliance.actions import API_ROUTE_ACTIONS
from fedtune.coordinator.store import ApiToken, append_audit_event
from fedtune.coordinator.store.models import TOKEN_ROLES

TOKEN_PREFIX = "ftk_"

# action -> roles allowed, from the one table of the API's actions (its description is there too).
PERMISSIONS: dict[str, frozenset[str]] = {action: entry.roles for action, entry in API_ROUTE_ACTIONS.items()}


@dataclass(frozen=True)
class Actor:
    """Who made a request: ``token:<id>`` with its role, or anonymous."""

    actor_type: str
    actor_id: str
    role: str | None

    @classmethod
    def anonymous(cls) -> Actor:
        return cls("anonymous", "-", None)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, *, name: str, role: str, actor_id: str = "cli") -> tuple[ApiToken, str]:
    """Create a token inside ``session``'s transaction (audited); returns (row, the token text).

    Raises:
        ValueError: unknown role or empty name.
    """
    if role not in TOKEN_ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    if not name.strip() or len(name) > 200:
        raise ValueError(f"token name {name!r:.40} must be 1-200 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, role=role, token_hash=hash_token(token))
    session.add(row)
    session.flush()
    append_audit_event(session, action="token.create", actor_type="cli", actor_id=actor_id,
                       resource_type="api_token", resource_id=str(row.id), outcome="success",
                       context={"role": role})
    return row, token


def revoke_token(session: Session, token_id: int, *, actor_id: str = "cli") -> ApiToken:
    """Revoke a token (audited). Raises LookupError if there is no such token."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise LookupError(f"no API token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    append_audit_event(session, action="token.revoke", actor_type="cli", actor_id=actor_id,
                       resource_type="api_token", resource_id=str(token_id), outcome="success",
                       context={"role": row.role})
    return row


def authenticate(session: Session, authorization: str | None) -> tuple[Actor | None, str | None]:
    """(actor, None) for a valid bearer token, else (None, reason code)."""
    if not authorization:
        return None, "missing_token"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None, "invalid_token"
    row = session.execute(select(ApiToken).where(ApiToken.token_hash == hash_token(token.strip()))).scalar_one_or_none()
    return _valid_actor(row)


def authenticate_token_id(session: Session, token_id: int) -> tuple[Actor | None, str | None]:
    """(actor, None) while the token a console session was opened with is still valid, else (None, reason)."""
    return _valid_actor(session.get(ApiToken, token_id))


def _valid_actor(row: ApiToken | None) -> tuple[Actor | None, str | None]:
    """The token row's actor while it is valid, else (None, reason)."""
    if row is None:
        return None, "invalid_token"
    if row.revoked_at is not None:
        return None, "revoked_token"
    return Actor("token", f"token:{row.id}", row.role), None


def allowed(action: str, role: str | None) -> bool:
    return role is not None and role in PERMISSIONS.get(action, frozenset())
