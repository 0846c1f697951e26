"""The demo's parts that run without processes: its sites and data, its held-out metrics, its options."""

from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.cli.demo.evaluate import evaluate
from fedtune.cli.demo.sites import MERCHANT_CATEGORY, SYMPTOM_TRIAGE, demo_sites, write_site_data
from fedtune.model import DeepseekForCausalLM, init_weights
from fedtune.model.config import PRESETS
from fedtune.model.tokenizer import ByteTokenizer


def test_two_banks_and_a_hospital_with_their_own_mix(tmp_path):
    sites = demo_sites(3)
    assert [s.client_id for s in sites] == ["bank-a", "bank-b", "hospital-c"]
    assert sites[0].table is MERCHANT_CATEGORY and sites[2].table is SYMPTOM_TRIAGE
    assert sites[0].weights != sites[1].weights  # same task, different customers
    train, heldout = write_site_data(sites[0], tmp_path / "a", records=400, heldout=50)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 400 and len(heldout.read_text().splitlines()) == 50
    for row in rows:  # the completion is the table's answer for the prompt's key phrase
        key = row["prompt"].split(": ", 1)[1]
        assert row["completion"] == " " + MERCHANT_CATEGORY[key]
    counts = {k: sum(r["prompt"].endswith(k) for r in rows) for k in sorted(MERCHANT_CATEGORY)}
    favoured = [k for k, w in zip(sorted(MERCHANT_CATEGORY), sites[0].weights, strict=True) if w > 1]
    assert min(counts[k] for k in favoured) > max(c for k, c in counts.items() if k not in favoured)
    again, _ = write_site_data(sites[0], tmp_path / "b", records=400, heldout=50)
    assert again.read_text() == train.read_text()  # reproducible


def test_held_out_metrics_match_a_direct_computation(tmp_path):
    site = demo_sites(3)[2]
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


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--clients", "1", "--rounds", "0", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "--clients 1" in result.output and "--rounds 0" in result.output
    assert not (tmp_path / "d").exists()
