"""The admin API's service layer: the SQL and the privacy arithmetic behind its routes.

One module per resource (:mod:`.clients`, :mod:`.jobs`, :mod:`.adapters`, :mod:`.privacy`, :mod:`.audit`,
:mod:`.metrics`), keyword-only functions on a SQLAlchemy session, callable from a test without FastAPI.
They never raise ``HTTPException``: a missing row is :class:`~.errors.NotFound`, a state that forbids the
change :class:`~.errors.Conflict`, and the API layer maps them to 404 and 409
(:mod:`fedtune.coordinator.api.error_handlers`). They do not write audit records: the route does, in the
same transaction (:func:`fedtune.coordinator.api.request_audit.record_change`).
"""
