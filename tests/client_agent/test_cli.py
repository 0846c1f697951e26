"""`fedtune agent train-local` and `fedtune agent budget`: the lifetime budget gates training."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.client_agent.ledger import PrivacyLedger
from fedtune.client_agent.privacy import epsilon_for
from fedtune.model import DeepseekForCausalLM, init_weights, save_pretrained
from fedtune.model.config import PRESETS
from fedtune_testing.accounting import reference_epsilon

runner = CliRunner()


@pytest.fixture
def setup(tmp_path):
    model = DeepseekForCausalLM(PRESETS["tiny"])
    init_weights(model, 0)
    save_pretrained(model, tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"memo {i} ->", "completion": " food"}) + "\n" for i in range(40)))
    state = tmp_path / "state"
    assert runner.invoke(app, ["agent", "budget", "set", "--dataset", "memos", "--epsilon", "5", "--delta", "1e-4",
                               "--state-dir", str(state)]).exit_code == 0
    return tmp_path, data, state


def _train(tmp_path, data, state, out, epsilon, *extra):
    return runner.invoke(app, ["agent", "train-local", "--base", str(tmp_path / "base"), "--data", str(data),
                               "--out", str(out), "--epsilon", str(epsilon), "--delta", "1e-5", "--steps", "2",
                               "--batch-size", "8", "--max-len", "32", "--dataset-id", "memos",
                               "--state-dir", str(state), "--no-secure-mode", *extra])


@pytest.mark.slow
def test_train_local_writes_peft_adapter_and_report_and_settles_the_ledger(setup):
    tmp_path, data, state = setup
    result = _train(tmp_path, data, state, tmp_path / "out", 3.0)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # The reported epsilon is Opacus' accountant for the (q, sigma, steps) used, and within the target.
    assert report["epsilon"] == pytest.approx(epsilon_for(8 / 40, report["noise_multiplier"], 2, 1e-5, "rdp"))
    assert report["epsilon"] <= 3.0 and report["steps"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with PrivacyLedger(state / "privacy_ledger.db") as ledger:
        (run,) = ledger.runs("memos")
        assert run["status"] == "completed" and run["epsilon"] == pytest.approx(report["epsilon"])

    # A second run of 3 fits the lifetime budget of 5 (delta 1e-4): the ledger composes the two runs
    # (about 3.0 together), where summing them (6) would have refused it.
    first = (8 / 40, report["noise_multiplier"], 2)
    second = _train(tmp_path, data, state, tmp_path / "out2", 3.0)
    assert second.exit_code == 0, second.output
    report2 = json.loads((tmp_path / "out2" / "report.json").read_text())
    both = reference_epsilon([first, (8 / 40, report2["noise_multiplier"], 2)], 1e-4)
    assert both <= 5.0 < report["epsilon"] + report2["epsilon"]
    with PrivacyLedger(state / "privacy_ledger.db") as ledger:
        assert ledger.spent("memos").epsilon == pytest.approx(both, rel=1e-9)

    # A third run of 8 would pass it: refused before anything trains, with the composed numbers.
    refused = _train(tmp_path, data, state, tmp_path / "out3", 8.0)
    assert refused.exit_code == 3
    assert "refusing to train" in refused.output and f"remaining epsilon={5.0 - both:.4g}" in refused.output
    assert not (tmp_path / "out3").exists()
    with PrivacyLedger(state / "privacy_ledger.db") as ledger:
        assert len(ledger.runs("memos")) == 2


def test_bad_data_line_is_named_and_nothing_is_spent(setup):
    tmp_path, data, state = setup
    data.write_text(data.read_text() + '{"prompt": "x"}\n')
    result = _train(tmp_path, data, state, tmp_path / "out", 1.0)
    assert result.exit_code == 2 and ":41" in result.output.replace("line ", ":")
    with PrivacyLedger(state / "privacy_ledger.db") as ledger:  # the reservation was released
        assert [r["status"] for r in ledger.runs("memos")] == ["failed"]
        assert ledger.spent("memos").epsilon == 0.0


def test_a_run_past_the_lifetime_budget_is_refused_before_any_record_is_read(setup):
    """The budget check comes first: with records that would fail validation, the refusal is the budget's."""
    tmp_path, data, state = setup
    data.write_text(data.read_text() + '{"prompt": "x"}\n')
    result = _train(tmp_path, data, state, tmp_path / "out", 20.0)  # the budget is 5
    assert result.exit_code == 3 and "refusing to train" in result.output and ":41" not in result.output
    with PrivacyLedger(state / "privacy_ledger.db") as ledger:
        assert ledger.runs("memos") == []


def test_no_budget_refuses(setup):
    tmp_path, data, state = setup
    result = runner.invoke(app, ["agent", "train-local", "--base", str(tmp_path / "base"), "--data", str(data),
                                 "--out", str(tmp_path / "o"), "--steps", "1", "--batch-size", "8",
                                 "--state-dir", str(state)])
    assert result.exit_code == 3 and "has no privacy budget" in result.output
    assert not (tmp_path / "o").exists()
