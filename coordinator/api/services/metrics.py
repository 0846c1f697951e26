"""The Prometheus text exposition of ``/metrics``: the store's gauges and this process's request counters."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedtune.coordinator.store import AdapterVersion, AuditEvent, Client, Job, Round, Update

Samples = list[tuple[dict[str, str], float]]


def prometheus_text(s: Session, *, requests: Counter) -> str:
    """Jobs, rounds, updates and clients by status, adapter versions, audit records, and ``requests``
    ((action, outcome) -> count) as API requests served, in the text format version 0.0.4."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    def grouped(column) -> Samples:
        rows = s.execute(select(column, func.count()).group_by(column)).all()
        return [({"status": str(k)}, float(n)) for k, n in rows]

    family("fedtune_jobs", "gauge", "Jobs by status.", grouped(Job.status))
    family("fedtune_rounds", "gauge", "Rounds by status.", grouped(Round.status))
    family("fedtune_updates", "gauge", "Client updates by status.", grouped(Update.status))
    family("fedtune_clients", "gauge", "Registered clients by status.", grouped(Client.status))
    family("fedtune_adapter_versions", "gauge", "Adapter versions stored.",
           [({}, float(s.execute(select(func.count()).select_from(AdapterVersion)).scalar_one()))])
    family("fedtune_audit_events", "gauge", "Audit records in the trail.",
           [({}, float(s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()))])
    family("fedtune_api_requests_total", "counter", "Admin API requests served by this process.",
           [({"action": a, "outcome": o}, float(n)) for (a, o), n in sorted(requests.items())])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
