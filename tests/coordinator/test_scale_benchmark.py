"""benchmarks/coordinator_scale.py's core at a tiny size, so that it cannot rot: 3 clients of a rank-4
LoRA on the tiny preset, really signed, streamed through the round engine's two rounds on a real store."""

from __future__ import annotations

import pytest

from fedtune_testing.benchmarks import load_benchmark


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_the_scale_benchmark_measures_a_tiny_round(tmp_path, database_url, strategy):
    bench = load_benchmark("coordinator_scale")
    bench.write_replies(tmp_path, bench.initial_adapter("tiny", 4, ffa=strategy == "ffa"), 3)
    rows = bench.measure_cell(tmp_path, url=database_url, strategy=strategy, n=3, rank=4)
    assert [(r["strategy"], r["clients"], r["round"]) for r in rows] == [(strategy, 3, 1), (strategy, 3, 2)]
    for row in rows:
        assert all(v > 0 for v in row["ms_per_update"].values()), row
        assert row["total_ms_per_update"] == pytest.approx(
            sum(row["ms_per_update"][k] for k in ("validate", "aggregate", "persist")))
        assert row["peak_mb"] > 0 and row["round_mb"] is not None and row["key_check_ms"] > 0
