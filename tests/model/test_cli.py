"""`fedtune model ...` through the real console script's Typer app."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.model.config import PRESETS

runner = CliRunner()


def test_init_tiny_then_info_reports_counts_and_digest(tmp_path):
    out = tmp_path / "base"
    result = runner.invoke(app, ["model", "init-tiny", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)

    # Hand count for the tiny preset (H=64, V=512, 3 layers, first dense, 8 experts top-2, 1 shared):
    c = PRESETS["tiny"]
    H, V = c.hidden_size, c.vocab_size
    attn = (H * 32 + 32 + 32 * 4 * 24) + (H * 40 + 32 + 32 * 4 * 32) + 4 * 16 * H  # q path, kv path, o_proj
    dense = 3 * H * 128
    expert = 3 * H * 32
    moe = 8 * H + 8 * expert + 1 * expert  # router, routed, shared
    norms = 2 * H
    total = 2 * V * H + H + 3 * (attn + norms) + dense + 2 * moe
    assert info["parameters"] == total
    assert info["active_parameters"] == total - 2 * 6 * expert
    assert info["digest"].startswith("sha256:") and len(info["digest"]) == 71
    assert info["bytes_on_disk"] == (out / "model.safetensors").stat().st_size


def test_same_seed_same_digest_other_seed_other_digest(tmp_path):
    digests = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        runner.invoke(app, ["model", "init-tiny", str(tmp_path / name), "--seed", str(seed)])
        result = runner.invoke(app, ["model", "info", str(tmp_path / name), "--json"])
        digests.append(json.loads(result.output)["digest"])
    assert digests[0] == digests[1] != digests[2]


def test_init_tiny_refuses_to_overwrite_and_unknown_preset(tmp_path):
    runner.invoke(app, ["model", "init-tiny", str(tmp_path)])
    again = runner.invoke(app, ["model", "init-tiny", str(tmp_path)])
    assert again.exit_code != 0 and "already holds a checkpoint" in again.output
    bad = runner.invoke(app, ["model", "init-tiny", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code != 0 and "unknown preset 'huge'" in bad.output


def test_info_on_a_broken_checkpoint_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["model", "info", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_generate_runs(tmp_path):
    runner.invoke(app, ["model", "init-tiny", str(tmp_path)])
    result = runner.invoke(app, ["model", "generate", str(tmp_path), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "new token ids" in result.output


def test_every_command_has_help():
    for args in (["--help"], ["model", "--help"], ["model", "init-tiny", "--help"], ["model", "info", "--help"],
                 ["demo", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_init_std_sets_the_spread_of_the_random_weights(tmp_path):
    from fedtune.model import load_pretrained

    assert runner.invoke(app, ["model", "init-tiny", str(tmp_path / "wide"), "--init-std", "0.1"]).exit_code == 0
    model = load_pretrained(tmp_path / "wide")
    std = float(model.lm_head.weight.std())
    assert 0.09 < std < 0.11  # normal(0, 0.1) over 512 x 64 samples
    assert runner.invoke(app, ["model", "init-tiny", str(tmp_path / "bad"), "--init-std", "0"]).exit_code != 0
