"""The demo's report: ``report.md`` with PNG plots, and the same numbers in ``report.json``, in the run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedtune.cli.demo.evaluate import Metrics
from fedtune.cli.demo.run import (
    ALONE_RECIPE,
    BASE_INIT_STD,
    JOB_DELTA,
    JOB_RECIPE,
    REFERENCE_RECIPE,
    TARGET_MODULES,
    Results,
)

CENTRAL_MARGIN = 0.05  # "close to the centralized reference": within 5 accuracy points


def _plots(res: Results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(res.run_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    versions = sorted(res.per_round)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in res.sites:
        cid = run.site.client_id
        style = "-" if run.site.shares_task else ":"
        axes[0].plot(versions, [res.per_round[v][cid].loss for v in versions], style, marker="o", label=cid)
        axes[1].plot(versions, [res.per_round[v][cid].accuracy for v in versions], style, marker="o", label=cid)
    axes[0].set(title="held-out loss per round (lower is better)", xlabel="adapter version (round)",
                ylabel="nats per token")
    axes[1].set(title="held-out accuracy per round", xlabel="adapter version (round)", ylabel="accuracy",
                ylim=(0, 1))
    for ax in axes:
        ax.set_xticks(versions)
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, "rounds.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in res.sites:
        spent = [0.0, *res.epsilon_rounds.get(run.site.client_id, [])]
        ax.plot(range(len(spent)), spent, marker="o", label=run.site.client_id)
    ax.axhline(res.options.epsilon, color="red", linestyle="--", label="job budget per site")
    ax.set(title="epsilon spent per site (site ledgers, composed by the accountant)", xlabel="round",
           ylabel="epsilon")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "epsilon.png")

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [run.site.client_id for run in res.sites]
    width = 0.2
    base = res.per_round[0]
    bars = (("base", [base[n].accuracy for n in names]),
            ("local-only DP", [res.local[n].accuracy for n in names]),
            ("federated DP", [res.final[n].accuracy for n in names]),
            ("centralized DP (reference)", [res.central[n].accuracy for n in names]))
    for i, (label, values) in enumerate(bars):
        ax.bar([j + (i - 1.5) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), [n if r.site.shares_task else f"{n}\n(own task)"
                                      for n, r in zip(names, res.sites, strict=True)])
    ax.set(title="held-out accuracy per institution, same epsilon", ylabel="accuracy", ylim=(0, 1))
    ax.legend(fontsize=8)
    save(fig, "comparison.png")
    return files


def verdicts(res: Results) -> dict[str, dict[str, bool]]:
    """Per site: does federated DP beat the base (held-out loss), is every epsilon within its budget, and
    (accuracy) is federated DP at least local-only DP and within 5 points of the centralized reference."""
    out = {}
    for run in res.sites:
        cid = run.site.client_id
        eps = res.epsilon[cid]
        fed, local, central = res.final[cid].accuracy, res.local[cid].accuracy, res.central[cid].accuracy
        out[cid] = {"shares_task": run.site.shares_task,
                    "beats_base": res.final[cid].loss < res.per_round[0][cid].loss,
                    "within_budget": (eps["federated"] <= eps["job_budget"] + 1e-9
                                      and eps.get("lifetime_spent", 0.0) <= eps["lifetime"] + 1e-9),
                    "federated_at_least_local": fed >= local,
                    "federated_near_central": fed >= central - CENTRAL_MARGIN}
    return out


def demo_passed(res: Results) -> bool:
    """What the demo's exit status says: every site that shares the task beats the base with the federated
    adapter, every epsilon is within its budget, and the audit trail verifies. (How federated compares with
    local-only and the reference is a finding the report states, not a pass/fail check.)"""
    checks = verdicts(res)
    return (all(c["beats_base"] for c in checks.values() if c["shares_task"])
            and all(c["within_budget"] for c in checks.values()) and bool(res.audit.get("ok")))


def _metrics(m: Metrics) -> dict[str, float]:
    return {"loss": round(m.loss, 4), "accuracy": round(m.accuracy, 4)}


def report_data(res: Results) -> dict:
    """What ``report.json`` holds: the run's settings, and per site its task, whether it shares it, its held-out
    loss and accuracy for every model and the epsilon each spent."""
    opts = res.options
    checks = verdicts(res)
    sites = []
    for run in res.sites:
        cid, site = run.site.client_id, run.site
        eps = res.epsilon[cid]
        sites.append({
            "client_id": cid, "name": site.name, "task": site.task, "shares_task": site.shares_task,
            "label_shares": {label: round(p, 4) for label, p in site.label_shares().items()},
            "train_records": opts.records, "heldout_records": opts.heldout,
            "base": _metrics(res.per_round[0][cid]), "local_only_dp": _metrics(res.local[cid]),
            "federated_dp": _metrics(res.final[cid]), "centralized_dp": _metrics(res.central[cid]),
            "federated_dp_by_round": [_metrics(res.per_round[v][cid]) for v in sorted(res.per_round)],
            "epsilon": {"federated": eps["federated"], "local_only": eps.get("local"),
                        "centralized_reference": res.reference.get("epsilon"), "job_budget": eps["job_budget"],
                        "lifetime_budget": eps["lifetime"], "lifetime_spent": eps.get("lifetime_spent"),
                        "delta": JOB_DELTA},
            "checks": checks[cid]})
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    settings["recipes"] = {"job": JOB_RECIPE, "local_only": ALONE_RECIPE, "centralized_reference": REFERENCE_RECIPE}
    return {"settings": {**settings, "delta": JOB_DELTA, "aggregation": "ffa", "lora_targets": TARGET_MODULES,
                         "base": str(res.base), "base_digest": res.base_digest, "base_built": res.base_built},
            "sites": sites, "centralized_reference": res.reference,
            "audit": {"ok": bool(res.audit.get("ok")), "records": res.audit.get("records")},
            "seconds": {k: round(v, 1) for k, v in res.seconds.items()}, "passed": demo_passed(res)}


def _recipe(recipe: dict) -> str:
    """How a party's optimizer reads in the report: "SGD, lr 0.45, momentum 0.9"."""
    text = f"{'SGD' if recipe['optimizer'] == 'sgd' else 'AdamW'}, lr {recipe['lr']:g}"
    return text + (f", momentum {recipe['momentum']:g}" if recipe["momentum"] else "")


def _points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.0f} points"


def findings(res: Results) -> list[str]:
    """Plain sentences: where federation wins and where it does not."""
    shared = [r.site.client_id for r in res.sites if r.site.shares_task]
    alone = [r.site.client_id for r in res.sites if not r.site.shares_task]
    fed, loc, cen = res.final, res.local, res.central
    wins = [c for c in shared if fed[c].accuracy >= loc[c].accuracy]
    losses = [c for c in shared if c not in wins]
    near = [c for c in shared if fed[c].accuracy >= cen[c].accuracy - CENTRAL_MARGIN]
    out = []
    if wins:
        out.append(f"**Federation wins** for {', '.join(wins)}: at the same epsilon the federated adapter's held-out "
                   "accuracy is at least what the site reaches alone ("
                   + ", ".join(f"{c}: {fed[c].accuracy:.0%} vs {loc[c].accuracy:.0%}, "
                               f"{_points(fed[c].accuracy, loc[c].accuracy)}" for c in wins) + ").")
    if losses:
        out.append(f"**Federation does not win** for {', '.join(losses)}: alone it reaches more ("
                   + ", ".join(f"{c}: {fed[c].accuracy:.0%} vs {loc[c].accuracy:.0%}" for c in losses) + ").")
    out.append(f"Next to the centralized DP reference (every record pooled, the same epsilon per record: what no "
               f"consortium can run), the federated adapter is within {100 * CENTRAL_MARGIN:.0f} points at "
               f"{len(near)} of {len(shared)} sites that share the task ("
               + ", ".join(f"{c}: {fed[c].accuracy:.0%} vs {cen[c].accuracy:.0%}" for c in shared) + ").")
    for c in alone:
        verdict = "does better alone" if loc[c].accuracy > fed[c].accuracy else "does no worse in the federation"
        out.append(f"{c} shares its task with no other site and {verdict}: federated {fed[c].accuracy:.0%}, "
                   f"local-only {loc[c].accuracy:.0%}. The shared adapter is mostly the other sites' task; a site "
                   "whose task nobody shares gains nothing from their records, and its own update is averaged "
                   "with theirs.")
    return out


def write_report(res: Results) -> Path:
    """Write ``report.md`` (and its PNGs) and ``report.json`` into the run directory; returns the Markdown's path."""
    opts = res.options
    _plots(res)
    checks = verdicts(res)
    shared = [r for r in res.sites if r.site.shares_task]
    others = [r for r in res.sites if not r.site.shares_task]
    sec = res.seconds
    lines = [
        "# fedtune demo report", "",
        f"Run directory: `{res.run_dir}`. Whole demo: {sec.get('total', 0):.0f} s (setup {sec.get('setup', 0):.0f} s, "
        f"federated job {sec.get('federated', 0):.0f} s, comparisons and audit {sec.get('comparisons', 0):.0f} s).",
        "", "## Findings", "", *[f"- {line}" for line in findings(res)], "",
        "## What ran", "",
        f"- **Base**: `{res.base}` (digest `{res.base_digest}`). "
        + (f"A *randomly initialised* DeepSeek-style MoE (`tiny` preset, weights drawn with std {BASE_INIT_STD}), "
           "quantized to int4. It knows nothing about the world: everything it gets right below was learned "
           "from the sites' records by the LoRA adapters." if opts.base is None else "Given with --base."),
        f"- **Sites sharing a task**: {', '.join(f'{r.site.client_id} ({r.site.name})' for r in shared)}: "
        f"{shared[0].site.task if shared else ''}, each with its own case mix (below) and only {opts.records} "
        "training records.",
        *([f"- **Sites with a task of their own** (not shared, shown for what federation does to them): "
           f"{', '.join(f'{r.site.client_id} ({r.site.task})' for r in others)}, {opts.records} records."]
          if others else []),
        f"- Every site also has {opts.heldout} held-out records from its own mix, generated into its own "
        "directory; they never leave it (in the demo one process plays every site's evaluator).",
        "- **Processes** on 127.0.0.1: `fedtune coordinator serve --config coordinator.toml` (admin API, "
        "fleet gateway, Flower SuperLink, job supervisor, SQLite store) and one `fedtune agent run --config "
        "agent.toml` per site (agent daemon + Flower SuperNode); TLS from a private CA, Flower node "
        "authentication, each site with its own Ed25519 receipt key and node key, registered through the admin API.",
        f"- **Federated DP job**: {opts.rounds} rounds of FFA-LoRA (rank {opts.rank}, {', '.join(TARGET_MODULES)}), "
        f"{opts.steps} DP-SGD steps per round at each site (Poisson batches of {opts.batch_size}, clip 1.0, "
        f"{_recipe(JOB_RECIPE)}, secure mode), the coordinator averaging the sites' updates (FFA: B only). The job's "
        f"epsilon, {opts.epsilon:g} per site at delta {JOB_DELTA:g}, is for all its rounds: each agent calibrates "
        "every round's noise so that the rounds compose to it (RDP accountant).",
        f"- **Local-only DP**: `fedtune agent train-local` at each site on its own records alone, "
        f"{opts.rounds * opts.steps} steps, the same LoRA and batch, {_recipe(ALONE_RECIPE)}, at the epsilon that "
        "site spent on the job: the same sample rate, steps and epsilon, so the same noise per step. Each party "
        "trains with the optimizer measured best for it (`JOB_RECIPE`, `ALONE_RECIPE` and `REFERENCE_RECIPE` in "
        "`fedtune/cli/demo/run.py` say what was measured).",
        f"- **Centralized DP (reference)**: `train-local` on every site's training records pooled "
        f"({res.reference.get('records')} records, in `reference/`, with a state directory of its own) at the job's "
        f"epsilon per record, the same steps and a batch of {res.reference.get('batch_size')} (the same sample rate), "
        f"{_recipe(REFERENCE_RECIPE)}. "
        "Only this demo, which plays every site on one machine, can pool the records: it is the upper reference for "
        "what DP can learn from everyone's records, not something a consortium can run.", "",
        "## Held-out results per institution", "",
        "Loss: mean completion cross-entropy (nats per token; lower is better). Accuracy: the site's label the "
        "model finds most likely is the true one. Case mix: the share of each label in the site's records.", "",
        "| site | task (shared?) | case mix | base acc. | local-only DP acc. | federated DP acc. | centralized DP acc. "
        "| base loss | local-only DP loss | federated DP loss | centralized DP loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in res.sites:
        cid = run.site.client_id
        b, loc, fed, cen = res.per_round[0][cid], res.local[cid], res.final[cid], res.central[cid]
        mix = ", ".join(f"{label}: {p:.0%}" for label, p in run.site.label_shares().items())
        shared_text = "shared" if run.site.shares_task else "**own task, not shared**"
        lines.append(f"| {cid} | {run.site.task} ({shared_text}) | {mix} | {b.accuracy:.0%} | {loc.accuracy:.0%} | "
                     f"**{fed.accuracy:.0%}** | {cen.accuracy:.0%} | {b.loss:.3f} | {loc.loss:.3f} | {fed.loss:.3f} | "
                     f"{cen.loss:.3f} |")
    lines += ["", "Why federation can win at the same epsilon: every site spends its epsilon over the same steps "
              "with the same noise per step whether it trains alone or in the job, but the coordinator averages the "
              "sites' noisy updates, so the noise in the shared adapter shrinks with the number of sites while the "
              "signal of the shared task adds up. The centralized reference does better still: one batch of everyone's "
              "records carries the noise of one site. A site whose task no other site shares gets only its share of "
              "each averaged step.", "",
              "![held-out accuracy per institution](comparison.png)", "",
              "## Loss and epsilon per round", "", "![held-out loss and accuracy per round](rounds.png)", "",
              "![epsilon per site](epsilon.png)", "",
              "| site | federated job epsilon (coordinator ledger, composed) | local-only epsilon | job budget "
              "| lifetime spent (site ledger, composed) | lifetime budget | within budget |",
              "|---|---|---|---|---|---|---|"]
    for run in res.sites:
        cid = run.site.client_id
        e = res.epsilon[cid]
        lines.append(f"| {cid} | {e['federated']:.4g} | {e.get('local', 0):.4g} | {e['job_budget']:g} | "
                     f"{e.get('lifetime_spent', 0):.4g} | {e['lifetime']:g} | "
                     f"{'yes' if checks[cid]['within_budget'] else '**NO**'} |")
    lines += ["", f"The centralized reference spent epsilon {res.reference.get('epsilon', 0):.4g} per record of the "
              "pooled file. Epsilon is per site and never summed across sites; a site's lifetime spend composes the "
              "job's rounds and its local-only run (its own ledger, `sites/*/state/privacy_ledger.db`, which refuses "
              "any run past the lifetime budget).", "",
              "## Rounds", "", "| round | status | version | accepted | rejected |", "|---|---|---|---|---|"]
    for r in res.rounds:
        lines.append(f"| {r['number']} | {r['status']} | {r['version']} | {', '.join(sorted(r['accepted']))} | "
                     f"{len(r['rejected'])} |")
    lines += ["", "## Adapter versions", "", "| version | parent | digest (SHA-256) | contributors |",
              "|---|---|---|---|"]
    for v in res.versions:
        contributors = v.get("contributors") or []
        lines.append(f"| {v['version']} | {v.get('parent_version')} | `{v['digest']}` | "
                     f"{', '.join(sorted(str(c.get('client_id', c)) for c in contributors)) or '-'} |")
    audit = res.audit
    lines += ["", "## Audit trail", "",
              f"Exported through the admin API (auditor token) into `{audit.get('export')}` and verified offline "
              f"with `fedtune audit verify {audit.get('export')} --pubkey {audit.get('pubkey')}`: "
              f"**{'PASSED' if audit.get('ok') else 'FAILED'}**.", "", "```", audit.get("output", ""), "```", ""]
    passed = demo_passed(res)
    lines += ["## Verdict", "",
              ("Every site that shares the task has a lower held-out loss with the federated DP adapter than with the "
               "base, every epsilon is within its budget, and the audit trail verifies." if passed else
               "**Not every check passed**: see the tables above."), "", "Numbers: `report.json`.", ""]
    path = res.run_dir / "report.md"
    path.write_text("\n".join(lines))
    (res.run_dir / "report.json").write_text(json.dumps(report_data(res), indent=2) + "\n")
    return path
