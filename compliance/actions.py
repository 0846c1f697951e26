"""The fixed list of audit actions: every audit record's ``action`` is one of these.

A record with an action outside this list is refused at append time
(:func:`fedtune.coordinator.store.append_audit_event`), so an auditor can rely on the list as the
complete vocabulary of the trail. Add new actions here, with a line saying what they record.
"""

from __future__ import annotations

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

# Admin API (coordinator/api): one record per request, allowed or denied.
API_ACTIONS = {
    "client.register": "register a client agent with its Ed25519 public key (and optional SuperNode key)",
    "client.list": "list registered clients",
    "client.get": "read one client",
    "client.revoke": "revoke a client (its replies are rejected from then on)",
    "client.rotate_keys": "replace an active client's receipt key and / or SuperNode key (old and new public keys)",
    "job.create": "create a job (base digest, LoRA / FFA / DP / aggregation config, client list)",
    "job.list": "list jobs",
    "job.get": "read one job",
    "job.start": "start a job's rounds",
    "job.pause": "pause a job after its current round",
    "job.resume": "resume a paused job",
    "job.abort": "abort a job",
    "round.list": "list a job's rounds",
    "suspension.list": "list the clients the strike policy suspended from a job",
    "suspension.lift": "lift a client's suspension from a job (it is selected again)",
    "adapter.list": "list a job's adapter versions",
    "adapter.get": "read one adapter version's metadata",
    "adapter.lineage": "read an adapter version's lineage",
    "adapter.download": "download an adapter version (decrypted, peft format)",
    "adapter.promote": "promote an adapter version",
    "adapter.rollback": "roll a job's promoted adapter back to an earlier version",
    "privacy.ledger": "read a client's privacy ledger",
    "privacy.budget": "read a client's remaining privacy budget",
    "audit.query": "query audit records",
    "audit.export": "export the audit trail",
    "audit.verify": "verify the audit trail",
    "audit.checkpoints": "list signed audit checkpoints",
    "report.processing": "read a job's record of processing",
    "metrics.read": "read the Prometheus metrics",
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

ACTIONS: dict[str, str] = {**ROUND_ACTIONS, **SUPERVISOR_ACTIONS, **API_ACTIONS}


def check_action(action: str) -> str:
    """Return ``action`` if it is in :data:`ACTIONS`; raise ValueError naming it otherwise."""
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r} is not in fedtune.compliance.actions.ACTIONS; add it there "
                         f"with a description before recording it")
    return action
