"""Helpers the tests (and benchmarks/round.py) share, under a name no installed package has.

pytest puts tests/support on sys.path (``pythonpath`` in pyproject.toml), never the repository root,
whose folders would shadow installed packages: ``fedtune_testing.api`` (the admin-API tests),
``fedtune_testing.rounds`` (the round engine with agents as functions), ``fedtune_testing.federation``
(a whole federation as real processes)."""
