"""Lookups every resource's services share: a row that must exist, one page of a query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from fedtune.coordinator.api.services.errors import NotFound

Row = TypeVar("Row")


def require(s: Session, model: type[Row], key: Any, *, what: str) -> Row:
    """The row of ``model`` with primary key ``key``.

    Raises:
        NotFound: there is none ("<what> '<key>' does not exist").
    """
    row = s.get(model, key)
    if row is None:
        raise NotFound(f"{what} {key!r} does not exist")
    return row


def page_of(s: Session, query: Select, *, limit: int, offset: int, convert: Callable[[Any], Any]) -> dict[str, Any]:
    """One page of ``query`` (already ordered), each row through ``convert``, with the total and the next offset."""
    total = s.execute(select(func.count()).select_from(query.order_by(None).subquery())).scalar_one()
    rows = s.execute(query.limit(limit).offset(offset)).scalars().all()
    return {"items": [convert(r) for r in rows], "total": total, "limit": limit, "offset": offset,
            "next_offset": offset + limit if offset + limit < total else None}
