"""The demo's parts that run without processes: its sites and data, its held-out metrics, its job body,
its report, its options."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.cli.demo.evaluate import Metrics, evaluate, evaluate_records
from fedtune.cli.demo.report import demo_passed, findings, verdicts, write_report
from fedtune.cli.demo.run import JOB_RECIPE, DemoOptions, Results, SiteRun, _job_body, _train_local_args
from fedtune.cli.demo.sites import MERCHANT_CATEGORY, TRIAGE_LEVEL, Site, demo_sites, write_site_data
from fedtune.client_agent.data import load_records
from fedtune.coordinator.api.schemas import JobIn
from fedtune.model import DeepseekForCausalLM, init_weights
from fedtune.model.config import PRESETS
from fedtune.model.tokenizer import ByteTokenizer


def test_hospitals_share_the_triage_task_with_their_own_case_mix_and_a_bank_has_its_own():
    sites = demo_sites(3)
    assert [s.client_id for s in sites] == ["hospital-a", "hospital-b", "hospital-c", "bank-d"]
    assert [s.shares_task for s in sites] == [True, True, True, False]
    assert all(s.table is TRIAGE_LEVEL for s in sites[:3]) and sites[3].table is MERCHANT_CATEGORY
    assert len({s.label_mix for s in sites[:3]}) == 3  # the same task, different case mixes
    assert [s.client_id for s in demo_sites(2, own_task_site=False)] == ["hospital-a", "hospital-b"]
    assert demo_sites(5)[3].label_mix == sites[0].label_mix  # the mixes repeat in turn
    for bad in (1, 9):
        with pytest.raises(ValueError, match="between 2 and 8"):
            demo_sites(bad)


def test_every_answer_of_a_task_has_the_same_number_of_tokens():
    # The accuracy compares the answers' total likelihoods: a shorter answer would be favoured by the base.
    tok = ByteTokenizer()
    for table in (TRIAGE_LEVEL, MERCHANT_CATEGORY):
        assert len({len(tok.encode(f" {label}")) for label in table.values()}) == 1


def test_site_records_follow_the_table_and_the_case_mix(tmp_path):
    site = demo_sites(3)[2]  # the community clinic: levels 1, 2, 3 at 10%, 25%, 65%
    assert site.label_shares() == pytest.approx({"1": 0.1, "2": 0.25, "3": 0.65})
    train, heldout = write_site_data(site, tmp_path / "c", records=4000, heldout=50)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 4000 and len(heldout.read_text().splitlines()) == 50
    for row in rows:  # the completion is the table's answer for the prompt's key phrase
        key = row["prompt"].split(": ", 1)[1]
        assert row["completion"] == " " + TRIAGE_LEVEL[key]
    levels = Counter(row["completion"].strip() for row in rows)
    for level, share in (("1", 0.1), ("2", 0.25), ("3", 0.65)):
        # binomial standard deviation sqrt(p (1 - p) / 4000) <= 0.0079: 4 of them
        assert abs(levels[level] / 4000 - share) < 0.032, levels
    keys = Counter(row["prompt"].split(": ", 1)[1] for row in rows)
    # within a level, each key phrase equally often: level 3 has three of them, ~65% / 3 each
    for key in ("mild rash", "checkup", "dry cough"):
        assert abs(keys[key] / 4000 - 0.65 / 3) < 0.03, keys
    again, _ = write_site_data(site, tmp_path / "d", records=4000, heldout=50)
    assert again.read_text() == train.read_text()  # reproducible


def test_a_site_without_a_mix_draws_every_key_equally_often_and_a_bad_mix_is_refused():
    bank = demo_sites(2)[2]
    assert bank.label_mix is None
    # 8 merchants: food and trip have 2, rent and bill 1, meds 2
    assert bank.label_shares() == pytest.approx({"bill": 1 / 8, "food": 2 / 8, "meds": 2 / 8, "rent": 1 / 8,
                                                 "trip": 2 / 8})
    with pytest.raises(ValueError, match="label_mix"):
        Site("x", "o", "X", "t", TRIAGE_LEVEL, "{n} {key}", label_mix=(1.0, 2.0))


def test_held_out_metrics_match_a_direct_computation(tmp_path):
    site = demo_sites(3)[0]
    _, heldout = write_site_data(site, tmp_path, records=64, heldout=12)
    model = DeepseekForCausalLM(PRESETS["tiny"])
    init_weights(model, 1)
    tok = ByteTokenizer()
    got = evaluate(model, tok, site, heldout)

    losses, correct = [], 0
    with torch.no_grad():
        def nll(prompt: str, completion: str) -> tuple[float, int]:
            ids = [tok.bos_token_id, *tok.encode(prompt)]
            target = [*tok.encode(completion), tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids + target])).logits[0].float(), -1)
            return -sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(target)), len(target)

        for line in heldout.read_text().splitlines():
            row = json.loads(line)
            total, n = nll(row["prompt"], row["completion"])
            losses.append(total / n)
            scores = {label: nll(row["prompt"], " " + label)[0] for label in site.labels}
            correct += min(scores, key=scores.get) == row["completion"].strip()
    assert math.isclose(got.loss, sum(losses) / len(losses), rel_tol=1e-4)
    assert math.isclose(got.accuracy, correct / len(losses), rel_tol=1e-6)
    assert evaluate_records(model, tok, load_records(heldout), site.labels) == got


def _sites(tmp_path: Path) -> list[SiteRun]:
    return [SiteRun(s, tmp_path / s.client_id, tmp_path / s.client_id / "train.jsonl",
                    tmp_path / s.client_id / "heldout.jsonl", tmp_path / s.client_id / "keys")
            for s in demo_sites(2)]


def test_the_job_asks_for_the_whole_jobs_epsilon_and_the_api_accepts_it(tmp_path):
    opts = DemoOptions(out=tmp_path, clients=2, rounds=5, epsilon=6.0, records=200)
    body = _job_body(opts, "0" * 64, _sites(tmp_path))
    assert body["privacy"]["target_epsilon"] == 6.0  # all rounds together: not divided by the 5 rounds
    assert body["max_client_epsilon"] == 6.0
    assert body["clients"] == ["hospital-a", "hospital-b", "bank-c"]
    assert body["declared_records"] == {"hospital-a": 200, "hospital-b": 200, "bank-c": 200}
    job = JobIn.model_validate(body)  # what the admin API validates the body with
    assert job.aggregation.method == "ffa" and job.lora.ffa


def test_local_only_and_the_reference_train_as_long_as_the_job_each_with_its_own_optimizer(tmp_path):
    opts = DemoOptions(out=tmp_path, clients=2, rounds=3, steps=7, batch_size=16, rank=4)
    res = Results(opts, tmp_path / "base", "d", False, _sites(tmp_path), tmp_path)
    recipe = {"optimizer": "sgd", "lr": 0.3, "momentum": 0.5}
    args = _train_local_args(res, data=tmp_path / "pooled.jsonl", out=tmp_path / "o", epsilon=2.5,
                             batch_size=3 * 16, dataset_id="pooled", state_dir=tmp_path / "s", recipe=recipe)
    flags = dict(zip(args[3::2], args[4::2], strict=False))
    assert args[1:3] == ["agent", "train-local"]
    assert flags["--steps"] == "21" and flags["--batch-size"] == "48" and flags["--epsilon"] == "2.500000"
    assert flags["--rank"] == "4" and "--ffa" in args
    assert (flags["--optimizer"], flags["--lr"], flags["--momentum"]) == ("sgd", "0.3", "0.5")


def test_the_jobs_sites_train_with_the_job_recipe(tmp_path):
    opts = DemoOptions(out=tmp_path, clients=2)
    train = JobIn.model_validate(_job_body(opts, "0" * 64, _sites(tmp_path))).train
    assert (train.optimizer, train.lr, train.momentum) == (JOB_RECIPE["optimizer"], JOB_RECIPE["lr"],
                                                           JOB_RECIPE["momentum"])


def _results(tmp_path: Path) -> Results:
    """Two hospitals and a bank with numbers chosen by hand."""
    opts = DemoOptions(out=tmp_path, clients=2, rounds=1, epsilon=4.0, records=100, heldout=10)
    res = Results(opts, tmp_path / "base", "sha256:b", True, _sites(tmp_path), tmp_path)
    res.per_round = {0: {"hospital-a": Metrics(3.0, 0.2), "hospital-b": Metrics(3.0, 0.3), "bank-c": Metrics(3.0, 0.2)},
                     1: {"hospital-a": Metrics(1.0, 0.8), "hospital-b": Metrics(1.5, 0.5), "bank-c": Metrics(2.9, 0.3)}}
    res.final = res.per_round[1]
    res.local = {"hospital-a": Metrics(1.5, 0.6), "hospital-b": Metrics(1.2, 0.7), "bank-c": Metrics(1.0, 0.6)}
    res.central = {"hospital-a": Metrics(0.9, 0.82), "hospital-b": Metrics(0.9, 0.9), "bank-c": Metrics(0.8, 0.7)}
    res.epsilon = {cid: {"federated": 3.9, "local": 3.9, "job_budget": 4.0, "lifetime": 10.0, "lifetime_spent": 5.1}
                   for cid in ("hospital-a", "hospital-b", "bank-c")}
    res.reference = {"records": 300, "batch_size": 192, "epsilon": 3.95}
    res.audit = {"ok": True, "output": "ok", "export": "e", "pubkey": "p", "records": 12}
    res.seconds = {"total": 100.0}
    return res


def test_the_verdicts_findings_and_report_json_say_where_federation_wins(tmp_path):
    res = _results(tmp_path)
    checks = verdicts(res)
    assert checks["hospital-a"] == {"shares_task": True, "beats_base": True, "within_budget": True,
                                    "federated_at_least_local": True, "federated_near_central": True}  # 0.8 vs 0.82
    assert not checks["hospital-b"]["federated_at_least_local"] and not checks["hospital-b"]["federated_near_central"]
    assert checks["bank-c"]["shares_task"] is False
    assert demo_passed(res)  # the bank's loss barely moves, but it does not share the task
    text = "\n".join(findings(res))
    assert "**Federation wins** for hospital-a" in text and "+20 points" in text
    assert "**Federation does not win** for hospital-b" in text
    assert "within 5 points at 1 of 2 sites" in text
    assert "bank-c shares its task with no other site and does better alone" in text

    write_report(res)
    data = json.loads((tmp_path / "report.json").read_text())
    a, bank = data["sites"][0], data["sites"][2]
    assert (a["client_id"], a["shares_task"], bank["shares_task"]) == ("hospital-a", True, False)
    assert a["task"] == "triage note -> triage level" and a["label_shares"] == {"1": 0.5, "2": 0.35, "3": 0.15}
    assert a["base"] == {"loss": 3.0, "accuracy": 0.2} and a["federated_dp"] == {"loss": 1.0, "accuracy": 0.8}
    assert a["local_only_dp"]["accuracy"] == 0.6 and a["centralized_dp"]["accuracy"] == 0.82
    assert a["epsilon"]["federated"] == 3.9 and a["epsilon"]["centralized_reference"] == 3.95
    assert data["settings"]["epsilon"] == 4.0 and data["settings"]["records"] == 100 and data["passed"]
    report = (tmp_path / "report.md").read_text()
    assert "own task, not shared" in report and "**80%**" in report
    for png in ("rounds.png", "epsilon.png", "comparison.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_site_sharing_the_task_that_does_not_beat_the_base_fails_the_demo(tmp_path):
    res = _results(tmp_path)
    res.per_round[1]["hospital-b"] = Metrics(3.2, 0.5)
    assert not demo_passed(res)
    res = _results(tmp_path)
    res.epsilon["bank-c"]["lifetime_spent"] = 10.5
    assert not demo_passed(res)


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--clients", "1", "--rounds", "0", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "--clients 1" in result.output and "--rounds 0" in result.output
    assert not (tmp_path / "d").exists()
