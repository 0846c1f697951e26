"""Compliance reports from the coordinator's store, as JSON-able dicts (their formats and Markdown:
:mod:`fedtune.compliance.reports`).

* :func:`adapter_lineage`: where an adapter version came from: its parent chain back to version 0
  and the base model, the round that made each version, the clients that contributed, and the
  record-level epsilon each client spent in each of those rounds (from the privacy ledger). Epsilon
  is per client and is never summed across clients; a client's total over the lineage is its rounds'
  mechanisms composed by the accountant at the job's delta (``fedtune.compliance.accounting``).
* :func:`processing_record`: a per-job record of processing: purpose, legal basis, data
  categories, data subjects, parties, recipients, retention and safeguards. What only people can
  say comes from the job config's ``processing`` object; a field it does not set reads
  :data:`~fedtune.compliance.reports.NOT_STATED`. Safeguards are derived from the job's config and
  from what fedtune enforces::

      "processing": {"purpose": "...", "legal_basis": "...", "data_categories": ["..."],
                     "data_subjects": "...", "controller": "...", "recipients": "...",
                     "retention_days": 365, "safeguards": ["extra measures, as text"]}

Reports name clients by their pseudonymous id and organization, never a person.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedtune.compliance.accounting import Mechanism, SpendRow, total_spend
from fedtune.compliance.canonical import format_timestamp
from fedtune.compliance.reports import LINEAGE_FORMAT, NOT_STATED, PROCESSING_FORMAT
from fedtune.coordinator.store import AdapterVersion, AuditEvent, Client, Job, PrivacyLedgerEntry, Round


class ReportNotFound(LookupError):
    """The job or adapter version a report is asked for does not exist."""


def _time(moment: datetime | None) -> str | None:
    return format_timestamp(moment) if moment is not None else None


def adapter_lineage(session: Session, job_id: str, version: int) -> dict[str, Any]:
    """The lineage of adapter ``version`` of ``job_id`` (see the module docstring).

    Returns:
        ``{"report", "job_id", "version", "digest", "base_digest", "generated_at", "versions": [newest
        first: version, digest, parent_version, round, aggregation, contributors, client_level,
        audit_seq, ...], "clients": [client_id, org, rounds, records, epsilon_per_round,
        epsilon_total, delta_total], "notes"}``.

    Raises:
        ReportNotFound: no such job or version.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise ReportNotFound(f"job {job_id!r} does not exist")
    rows = {v.id: v for v in session.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id)).scalars()}
    chain = [v for v in rows.values() if v.version == version]
    if not chain:
        raise ReportNotFound(f"job {job_id!r} has no adapter version {version}")
    while chain[-1].parent_id is not None:
        chain.append(rows[chain[-1].parent_id])
    round_ids = [v.round_id for v in chain if v.round_id is not None]
    rounds = {r.id: r for r in session.execute(select(Round).where(Round.id.in_(round_ids))).scalars()}
    ledger = session.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.round_id.in_(round_ids))).scalars()
    record_level: dict[int, list[PrivacyLedgerEntry]] = defaultdict(list)
    client_level: dict[int, PrivacyLedgerEntry] = {}
    for entry in ledger:
        if entry.kind == "record_level":
            record_level[entry.round_id].append(entry)
        else:
            client_level[entry.round_id] = entry
    audit_seqs = _version_audit_seqs(session, job_id)
    versions = [_version_entry(v, rows, rounds.get(v.round_id), record_level, client_level, audit_seqs)
                for v in chain]
    return {
        "report": LINEAGE_FORMAT, "job_id": job_id, "version": version, "digest": chain[0].digest,
        "base_digest": job.base_digest, "generated_at": format_timestamp(datetime.now(UTC)),
        "versions": versions, "clients": _client_totals(session, versions, _job_delta(job.config)),
        "notes": ["epsilon is record-level DP spent at each client, per round; it is never summed across "
                  "clients. epsilon_total composes the client's rounds of this lineage (sample rate, noise "
                  "multiplier, steps, as the client signed them) with the accountant at delta_total, the job's "
                  "delta; a row without its mechanism adds its own epsilon and delta."],
    }


def _version_audit_seqs(session: Session, job_id: str) -> dict[str, int]:
    rows = session.execute(select(AuditEvent.resource_id, func.min(AuditEvent.seq))
                           .where(AuditEvent.action == "adapter_version.created",
                                  AuditEvent.resource_id.like(f"{job_id}/v%"))
                           .group_by(AuditEvent.resource_id)).all()
    return {resource: seq for resource, seq in rows}


def _version_entry(v: AdapterVersion, rows: Mapping[int, AdapterVersion], rnd: Round | None,
                   record_level: Mapping[int, list[PrivacyLedgerEntry]], client_level: Mapping[int, PrivacyLedgerEntry],
                   audit_seqs: Mapping[str, int]) -> dict[str, Any]:
    ledger = ({e.client_id: e for e in record_level.get(v.round_id, []) if e.status == "committed"}
              if v.round_id is not None else {})
    contributors = []
    for c in v.contributors:
        entry = ledger.get(c.get("client_id"))
        contributors.append({
            "client_id": c.get("client_id"), "records": c.get("records"), "update_digest": c.get("digest"),
            "epsilon": entry.epsilon if entry else c.get("epsilon"), "delta": entry.delta if entry else c.get("delta"),
            "noise_multiplier": entry.noise_multiplier if entry else None,
            "sample_rate": entry.sample_rate if entry else None, "steps": entry.steps if entry else None,
            "accountant": entry.accountant if entry else None,
        })
    central = client_level.get(v.round_id) if v.round_id is not None else None
    return {
        "version": v.version, "digest": v.digest, "created_at": _time(v.created_at), "promoted": v.promoted,
        "parent_version": rows[v.parent_id].version if v.parent_id is not None else None,
        "round": rnd.number if rnd else None, "round_started_at": _time(rnd.started_at) if rnd else None,
        "round_finished_at": _time(rnd.finished_at) if rnd else None, "aggregation": v.aggregation,
        "contributors": contributors,
        "client_level_dp": {"epsilon": central.epsilon, "delta": central.delta,
                            "noise_multiplier": central.noise_multiplier} if central else None,
        "audit_seq": audit_seqs.get(f"{v.job_id}/v{v.version}"),
    }


def _job_delta(config: Mapping[str, Any] | None) -> float:
    """The record-level delta a job's spend is composed at: its DP config's (default 1e-5)."""
    privacy = ((config or {}).get("train") or {}).get("privacy") or {}
    return float(privacy.get("delta", 1e-5))


def _spend_row(epsilon: float, delta: float | None, sample_rate: float | None, noise_multiplier: float | None,
               steps: int | None, accountant: str | None) -> SpendRow:
    """A ledger value as the accountant sees it (its mechanism when fully recorded and valid)."""
    mechanism = None
    if None not in (sample_rate, noise_multiplier, steps, accountant):
        try:
            mechanism = Mechanism(sample_rate, noise_multiplier, steps)
        except ValueError:
            mechanism = None
    return SpendRow(mechanism, epsilon, delta or 0.0, accountant)


def _client_totals(session: Session, versions: list[dict[str, Any]], delta: float) -> list[dict[str, Any]]:
    per_client: dict[str, dict[str, Any]] = {}
    spend: dict[str, list[SpendRow]] = defaultdict(list)
    for v in reversed(versions):  # oldest first
        for c in v["contributors"]:
            totals = per_client.setdefault(c["client_id"], {"client_id": c["client_id"], "rounds": [], "records": 0,
                                                            "epsilon_per_round": []})
            totals["rounds"].append(v["round"])
            totals["records"] += c["records"] or 0
            totals["epsilon_per_round"].append({"round": v["round"], "epsilon": c["epsilon"], "delta": c["delta"]})
            if c["epsilon"] is not None:
                spend[c["client_id"]].append(_spend_row(c["epsilon"], c["delta"], c["sample_rate"],
                                                        c["noise_multiplier"], c["steps"], c.get("accountant")))
    orgs = dict(session.execute(select(Client.id, Client.org).where(Client.id.in_(per_client))).all())
    out = []
    for client_id, totals in sorted(per_client.items()):
        rows = spend.get(client_id)
        epsilon, delta_total = total_spend(rows, delta) if rows else (None, None)
        out.append({**totals, "org": orgs.get(client_id), "epsilon_total": epsilon, "delta_total": delta_total})
    return out


def processing_record(session: Session, job_id: str) -> dict[str, Any]:
    """The record of processing of ``job_id`` (see the module docstring).

    Raises:
        ReportNotFound: no such job.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise ReportNotFound(f"job {job_id!r} does not exist")
    config = job.config or {}
    stated = config.get("processing") if isinstance(config.get("processing"), dict) else {}
    statuses = dict(session.execute(select(Round.status, func.count()).where(Round.job_id == job_id)
                                    .group_by(Round.status)).all())
    entries = session.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.job_id == job_id,
                                                               PrivacyLedgerEntry.kind == "record_level")
                              .order_by(PrivacyLedgerEntry.id)).scalars().all()
    by_client: dict[str, list[PrivacyLedgerEntry]] = defaultdict(list)
    for e in entries:
        by_client[e.client_id].append(e)
    delta = _job_delta(config)
    # every attempt the client signed for, composed; rounds: the ones its update was aggregated in
    contributed = {client_id: (total_spend([_spend_row(e.epsilon, e.delta, e.sample_rate, e.noise_multiplier,
                                                       e.steps, e.accountant) for e in rows], delta)[0],
                               sum(1 for e in rows if e.status == "committed"))
                   for client_id, rows in by_client.items()}
    listed = list(config.get("clients") or [])
    client_ids = sorted(set(listed) | set(contributed))
    clients = {c.id: c for c in session.execute(select(Client).where(Client.id.in_(client_ids))).scalars()}
    retention_days = stated.get("retention_days")
    versions = session.execute(select(func.count()).select_from(AdapterVersion)
                               .where(AdapterVersion.job_id == job_id)).scalar_one()
    return {
        "report": PROCESSING_FORMAT, "job_id": job_id, "generated_at": format_timestamp(datetime.now(UTC)),
        "status": job.status, "created_at": _time(job.created_at), "finished_at": _time(job.finished_at),
        "purpose": stated.get("purpose") or NOT_STATED,
        "legal_basis": stated.get("legal_basis") or NOT_STATED,
        "data_categories": stated.get("data_categories") or NOT_STATED,
        "data_subjects": stated.get("data_subjects") or NOT_STATED,
        "controller": stated.get("controller") or NOT_STATED,
        "recipients": stated.get("recipients") or NOT_STATED,
        "retention": f"{retention_days} days" if isinstance(retention_days, int) else NOT_STATED,
        "retention_days": retention_days if isinstance(retention_days, int) else None,
        "parties": [{"client_id": cid, "org": clients[cid].org if cid in clients else None,
                     "status": clients[cid].status if cid in clients else "unknown",
                     "listed_in_job": cid in listed, "rounds_contributed": contributed.get(cid, (0.0, 0))[1],
                     "epsilon_spent": contributed[cid][0] if cid in contributed else 0.0}
                    for cid in client_ids],
        "data_leaving_sites": "LoRA adapter updates trained with record-level DP, with signed receipts (epsilon, "
                              "delta, digests); raw records and per-example gradients stay at each client",
        "base_model_digest": job.base_digest,
        "rounds": {"completed": statuses.get("completed", 0), "failed": statuses.get("failed", 0)},
        "adapter_versions": versions,
        "safeguards": _safeguards(config, stated),
    }


def _safeguards(config: Mapping[str, Any], stated: Mapping[str, Any]) -> list[str]:
    privacy = (config.get("train") or {}).get("privacy") or {}
    aggregation = config.get("aggregation") or {}
    out = []
    if privacy.get("target_epsilon") is not None:
        out.append(f"record-level differential privacy at each client (DP-SGD): target epsilon "
                   f"{privacy['target_epsilon']}, delta {privacy.get('delta', NOT_STATED)} for the whole job (every "
                   f"round's noise calibrated so that all rounds together stay within it)")
    else:
        out.append("record-level differential privacy: no target epsilon in the job config")
    if config.get("max_client_epsilon") is not None:
        out.append(f"per-client budget for this job: epsilon <= {config['max_client_epsilon']} (every signed "
                   f"attempt composed by the accountant); each agent also enforces its own lifetime budget")
    if aggregation.get("noise_multiplier"):
        out.append(f"client-level differential privacy on the coordinator ({aggregation.get('method')}, noise "
                   f"multiplier {aggregation['noise_multiplier']}, clip norm {aggregation.get('clip_norm')})")
    if config.get("norm_bound") is not None:
        out.append(f"updates with an L2 norm above {config['norm_bound']} are rejected")
    elif config.get("norm_bound_opt_out"):
        out.append("no bound on update norms: the job's creator chose \"none\" explicitly (audited at creation)")
    out += [
        "only adapter updates leave a client; each is signed (Ed25519) and bound to job, round, nonce and base model",
        "adapter versions encrypted at rest (AES-256-GCM), SHA-256 digests in the store",
        "append-only audit log: hash-chained canonical records, RFC 6962 Merkle tree, Ed25519-signed checkpoints",
        "admin API: bearer tokens stored hashed, roles admin / operator / auditor, every request audited",
    ]
    extra = stated.get("safeguards")
    if isinstance(extra, list):
        out += [str(s) for s in extra]
    return out
