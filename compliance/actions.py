"""The fixed list of audit actions: every audit record's ``action`` is one of these.

A record with an action outside this list is refused at append time
(:func:`fedtune.coordinator.store.append_audit_event`), so an auditor can rely on the list as the
complete vocabulary of the trail. Add new actions here, with a line saying what they record.

An admin-API route's action is written once, in :data:`API_ROUTE_ACTIONS`, with the roles that may
call it: the API's authorization is derived from that table (``fedtune.coordinator.api.auth``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Round engine (coordinator/rounds.py): federated decisions.
ROUND_ACTIONS = {
    "job.started": "the coordinator started running a job's rounds",
    "job.resumed": "the coordinator resumed a job's rounds after a stop or a crash",
    "job.completed": "a job produced its last adapter version",
    "job.failed": "a job stopped after too many failed rounds",
    "round.completed": "a round produced an adapter version (accepted / rejected / refused / missing clients)",
    "round.failed": "a round ended without a version (quorum lost, no clients, aggregation failed)",
    "update.accepted": "a client's update passed validation and was aggregated",
    "update.rejected": "a reply failed validation (reason code names the check); recorded against the client when "
                       "it signed the reply, else against the node that sent it",
    "update.rejected_beyond_cap": "a node sent more unsigned replies in a round than are recorded one by one (the "
                                  "count)",
    "client.suspended": "the strike policy suspended a client from a job (too many rejected signed updates)",
    "discovery.refused": "a node's hello claimed a client registered to another node, or an ambiguous one",
    "update.refused": "a client agent refused to train (budget, base digest, config)",
    "update.missing": "a selected client did not reply before the round's timeout",
    "adapter_version.created": "a new adapter version was written (digest, parent, contributors)",
    "audit.checkpoint_signed": "the coordinator signed a checkpoint of the audit log (size, Merkle root)",
}

# Job supervisor (coordinator/supervisor.py): what it changes on the Flower SuperLink.
SUPERVISOR_ACTIONS = {
    "supernode.registered": "the coordinator registered a client's SuperNode public key with the SuperLink (node id)",
    "supernode.unregistered": "the coordinator unregistered a rotated-away or revoked client's SuperNode (node id)",
}

# Who may call an admin-API route: the token roles, as plain strings (the store keeps the same names,
# coordinator/store/models.py: TOKEN_ROLES). Operators run the federation; auditors read everything but
# adapter weights and change nothing; only auditors and admins read, export and verify the audit trail.
ADMIN, OPERATOR, AUDITOR = "admin", "operator", "auditor"
EVERY_ROLE = frozenset({ADMIN, OPERATOR, AUDITOR})
RUNS_FEDERATION = frozenset({ADMIN, OPERATOR})
READS_AUDIT = frozenset({ADMIN, AUDITOR})


@dataclass(frozen=True)
class RouteAction:
    """An admin-API route's action: what its audit record says, and which roles may call it.

    Attributes:
        description: what a record of this action records (the audit vocabulary's line).
        roles: the token roles allowed; every other role is refused (403) and audited.
    """

    description: str
    roles: frozenset[str]


# Admin API routes (coordinator/api/routes): one record per request, allowed or denied. THE table of the
# API's actions: a route's ``name=`` is its key, the API enforces ``roles`` (coordinator/api/auth.py
# derives its permissions from here) and tests/coordinator/test_route_table.py checks both ways.
API_ROUTE_ACTIONS: dict[str, RouteAction] = {
    "client.register": RouteAction("register a client agent with its Ed25519 public key (and optional SuperNode "
                                   "key)", RUNS_FEDERATION),
    "client.list": RouteAction("list registered clients", EVERY_ROLE),
    "client.get": RouteAction("read one client", EVERY_ROLE),
    "client.revoke": RouteAction("revoke a client (its replies are rejected from then on)", RUNS_FEDERATION),
    "client.rotate_keys": RouteAction("replace an active client's receipt key and / or SuperNode key (old and new "
                                      "public keys)", RUNS_FEDERATION),
    "job.create": RouteAction("create a job (base digest, LoRA / FFA / DP / aggregation config, client list)",
                              RUNS_FEDERATION),
    "job.list": RouteAction("list jobs", EVERY_ROLE),
    "job.get": RouteAction("read one job", EVERY_ROLE),
    "job.start": RouteAction("start a job's rounds", RUNS_FEDERATION),
    "job.pause": RouteAction("pause a job after its current round", RUNS_FEDERATION),
    "job.resume": RouteAction("resume a paused job", RUNS_FEDERATION),
    "job.abort": RouteAction("abort a job", RUNS_FEDERATION),
    "round.list": RouteAction("list a job's rounds", EVERY_ROLE),
    "suspension.list": RouteAction("list the clients the strike policy suspended from a job", EVERY_ROLE),
    "suspension.lift": RouteAction("lift a client's suspension from a job (it is selected again)", RUNS_FEDERATION),
    "adapter.list": RouteAction("list a job's adapter versions", EVERY_ROLE),
    "adapter.get": RouteAction("read one adapter version's metadata", EVERY_ROLE),
    "adapter.lineage": RouteAction("read an adapter version's lineage", EVERY_ROLE),
    "adapter.download": RouteAction("download an adapter version (decrypted, peft format)", RUNS_FEDERATION),
    "adapter.promote": RouteAction("promote an adapter version", RUNS_FEDERATION),
    "adapter.rollback": RouteAction("roll a job's promoted adapter back to an earlier version", RUNS_FEDERATION),
    "privacy.ledger": RouteAction("read a client's privacy ledger", EVERY_ROLE),
    "privacy.budget": RouteAction("read a client's remaining privacy budget", EVERY_ROLE),
    "audit.query": RouteAction("query audit records", READS_AUDIT),
    "audit.export": RouteAction("export the audit trail", READS_AUDIT),
    "audit.verify": RouteAction("verify the audit trail", READS_AUDIT),
    "audit.checkpoints": RouteAction("list signed audit checkpoints", READS_AUDIT),
    "report.processing": RouteAction("read a job's record of processing", READS_AUDIT),
    "metrics.read": RouteAction("read the Prometheus metrics", RUNS_FEDERATION),
}

# The admin API's other records: the CLI's token commands, requests no route matches, the web console's
# own routes (coordinator/console/routes.py writes these itself) and the per-origin refusal bursts.
API_ACTIONS = {
    "token.create": "create an admin-API token (CLI)",
    "token.revoke": "revoke an admin-API token (CLI)",
    "api.unknown": "a request to a path or method the API does not have",
    "console.sign_in": "sign in to the web console with an admin-API token, exchanged for a session cookie (the "
                       "token is not kept); refused: a bad token or a forged form",
    "console.sign_out": "sign out of the web console (its session ends)",
    "console.session": "a console page read its session (role, allowed actions, CSRF token); refused once the session "
                       "ended",
    "request.refused_burst": "refused requests (401 / 403) from one origin beyond its limit in one window, each "
                             "answered 429: their count, first and last time, statuses, reasons, paths",
}

ACTIONS: dict[str, str] = {**ROUND_ACTIONS, **SUPERVISOR_ACTIONS,
                           **{name: entry.description for name, entry in API_ROUTE_ACTIONS.items()},
                           **API_ACTIONS}


def check_action(action: str) -> str:
    """Return ``action`` if it is in :data:`ACTIONS`; raise ValueError naming it otherwise."""
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r} is not in fedtune.compliance.actions.ACTIONS; add it there "
                         f"with a description before recording it")
    return action
