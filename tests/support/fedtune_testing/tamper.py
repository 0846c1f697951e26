"""What someone with the database's superuser rights can do to the audit tables (tests of the audit trail)."""

from __future__ import annotations

from fedtune.coordinator.store import create_session_factory


class DatabaseTamperer:
    """What someone with the database's superuser rights can do: drop the append-only triggers,
    edit rows, re-chain the hashes after an edit, delete the stored checkpoints. They cannot sign."""

    def __init__(self, engine):
        self.engine = engine

    def drop_triggers(self):
        with self.engine.begin() as conn:
            for table in ("audit_events", "audit_checkpoints"):
                if self.engine.dialect.name == "sqlite":
                    conn.exec_driver_sql(f"DROP TRIGGER {table}_no_update")
                    conn.exec_driver_sql(f"DROP TRIGGER {table}_no_delete")
                else:
                    conn.exec_driver_sql(f"DROP TRIGGER {table}_append_only ON {table}")
                    conn.exec_driver_sql(f"DROP TRIGGER {table}_no_truncate ON {table}")

    def execute(self, sql, **params):
        from sqlalchemy import text

        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def restate_checkpoint_records(self):
        """Rewrite the roots the audit.checkpoint_signed records state to what the edited records give."""
        from sqlalchemy import select, update

        from fedtune.compliance.canonical import canonical_record
        from fedtune.compliance.merkle import merkle_root
        from fedtune.coordinator.store import AuditEvent
        from fedtune.coordinator.store.audit import audit_record

        sessions = create_session_factory(self.engine)
        with sessions.begin() as s:
            records = [audit_record(e) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()]
            for record in records:
                if record["action"] == "audit.checkpoint_signed":
                    size = record["context"]["tree_size"]
                    record["context"] = {**record["context"],
                                         "root_hash": merkle_root(canonical_record(r) for r in records[:size]).hex()}
                    s.execute(update(AuditEvent).where(AuditEvent.seq == record["seq"])
                              .values(context=record["context"]))
        self.rechain()

    def rechain(self):
        """Recompute every prev_hash / record_hash, so that the chain holds over the edited rows."""
        from sqlalchemy import select, update

        from fedtune.compliance.canonical import GENESIS_HASH, canonical_record, chain_hash
        from fedtune.coordinator.store import AuditEvent
        from fedtune.coordinator.store.audit import audit_record

        sessions = create_session_factory(self.engine)
        with sessions.begin() as s:
            prev = GENESIS_HASH
            for event in s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all():
                record_hash = chain_hash(prev, canonical_record(audit_record(event)))
                s.execute(update(AuditEvent).where(AuditEvent.seq == event.seq)
                          .values(prev_hash=prev, record_hash=record_hash))
                prev = record_hash
