"""The demo's report: ``report.md`` and PNG plots in the run directory."""

from __future__ import annotations

from pathlib import Path

from fedtune.cli.demo.run import BASE_INIT_STD, TARGET_MODULES, Results


def _plots(res: Results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    versions = sorted(res.per_round)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in res.sites:
        cid = run.site.client_id
        axes[0].plot(versions, [res.per_round[v][cid].loss for v in versions], marker="o", label=cid)
        axes[1].plot(versions, [res.per_round[v][cid].accuracy for v in versions], marker="o", label=cid)
    axes[0].set(title="held-out loss per round (lower is better)", xlabel="adapter version (round)",
                ylabel="nats per token")
    axes[1].set(title="held-out accuracy per round", xlabel="adapter version (round)", ylabel="accuracy",
                ylim=(0, 1))
    for ax in axes:
        ax.set_xticks(versions)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(res.run_dir / "rounds.png", dpi=110)
    plt.close(fig)
    files.append("rounds.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in res.sites:
        spent = [0.0, *res.epsilon_rounds.get(run.site.client_id, [])]
        ax.plot(range(len(spent)), spent, marker="o", label=run.site.client_id)
    ax.axhline(res.options.epsilon, color="red", linestyle="--", label="job budget per site")
    ax.set(title="epsilon spent per site (site ledgers, composed by the accountant)", xlabel="round",
           ylabel="epsilon")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(res.run_dir / "epsilon.png", dpi=110)
    plt.close(fig)
    files.append("epsilon.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [run.site.client_id for run in res.sites]
    width = 0.27
    base = res.per_round[0]
    for i, (label, values) in enumerate((("base", [base[n].accuracy for n in names]),
                                         ("local-only DP", [res.local[n].accuracy for n in names]),
                                         ("federated DP", [res.final[n].accuracy for n in names]))):
        ax.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="held-out accuracy per institution", ylabel="accuracy", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(res.run_dir / "comparison.png", dpi=110)
    plt.close(fig)
    files.append("comparison.png")
    return files


def verdicts(res: Results) -> dict[str, dict[str, bool]]:
    """Per site: federated DP beats the base (held-out loss), each epsilon is within its budget."""
    out = {}
    for run in res.sites:
        cid = run.site.client_id
        eps = res.epsilon[cid]
        total = eps["federated"] + eps.get("local", 0.0)
        out[cid] = {"beats_base": res.final[cid].loss < res.per_round[0][cid].loss,
                    "within_budget": eps["federated"] <= eps["job_budget"] + 1e-9 and total <= eps["lifetime"] + 1e-9}
    return out


def write_report(res: Results) -> Path:
    """Write ``report.md`` (and its PNGs) into the run directory; returns its path."""
    opts = res.options
    _plots(res)
    checks = verdicts(res)
    lines = [
        "# fedtune demo report", "",
        f"Run directory: `{res.run_dir}`. Whole demo: {res.seconds.get('total', 0):.0f} s "
        f"(setup {res.seconds.get('setup', 0):.0f} s, federated job {res.seconds.get('federated', 0):.0f} s, "
        f"local-only baselines {res.seconds.get('local', 0):.0f} s).", "",
        "## What ran", "",
        f"- **Base**: `{res.base}` (digest `{res.base_digest}`). "
        + (f"A *randomly initialised* DeepSeek-style MoE (`tiny` preset, weights drawn with std {BASE_INIT_STD}), "
           "quantized to int4. It knows nothing about the world: everything it gets right below was learned "
           "from the sites' data by the LoRA adapters." if opts.base is None else "Given with --base."),
        f"- **Sites**: {', '.join(f'{r.site.client_id} ({r.site.task})' for r in res.sites)}; "
        f"{opts.records} training and {opts.heldout} held-out records each, generated into each site's own "
        "directory. The held-out split never leaves its site; in the demo one process plays every site's "
        "evaluator.",
        "- **Processes** on 127.0.0.1: `fedtune coordinator serve --config coordinator.toml` (admin API, "
        "fleet gateway, Flower SuperLink, job supervisor, SQLite store) and one `fedtune agent run --config "
        "agent.toml` per site (agent daemon + Flower SuperNode); TLS from a private CA, Flower node "
        "authentication, each site with its own Ed25519 receipt key and node key, registered through the admin API.",
        f"- **Job**: {opts.rounds} rounds of FFA-LoRA (rank {opts.rank}, {', '.join(TARGET_MODULES)}), "
        f"{opts.steps} DP-SGD steps per round at each site (Poisson batches of {opts.batch_size}, clip 1.0, "
        f"noise calibrated by the RDP accountant, secure mode), epsilon {opts.epsilon / opts.rounds:g} per round, "
        f"delta 1e-5; job budget epsilon {opts.epsilon:g} per site.",
        f"- **Local-only baseline**: `fedtune agent train-local` at each site on its own data alone, "
        f"{opts.rounds * opts.steps} steps, same LoRA and optimiser, DP calibrated to the epsilon that site spent "
        "in the federated job.", "",
        "## Held-out results per institution", "",
        "Loss: mean completion cross-entropy (nats per token; lower is better). Accuracy: the site's label the "
        "model finds most likely is the true one.", "",
        "| site | task | base loss | local-only DP loss | federated DP loss | base acc. | local-only DP acc. "
        "| federated DP acc. | federated beats base |",
        "|---|---|---|---|---|---|---|---|---|"]
    for run in res.sites:
        cid = run.site.client_id
        b, loc, fed = res.per_round[0][cid], res.local[cid], res.final[cid]
        lines.append(f"| {cid} | {run.site.task} | {b.loss:.3f} | {loc.loss:.3f} | {fed.loss:.3f} | "
                     f"{b.accuracy:.0%} | {loc.accuracy:.0%} | {fed.accuracy:.0%} | "
                     f"{'yes' if checks[cid]['beats_base'] else '**NO**'} |")
    lines += ["", "Reading the columns: the federated job's epsilon is what all its rounds spend together (each "
              "site's agent calibrates every round's noise so that the rounds compose to it), and the local-only "
              "run spends the same epsilon over the same number of steps, so both add the same noise per step. "
              "FedAvg averages every site's update with the others', so a site whose task no other site shares "
              "gets only its share of the step.", "",
              "![held-out accuracy per institution](comparison.png)", "",
              "## Loss and epsilon per round", "", "![held-out loss and accuracy per round](rounds.png)", "",
              "![epsilon per site](epsilon.png)", "",
              "| site | federated epsilon (coordinator ledger) | local-only epsilon | job budget | lifetime budget "
              "| within budget |", "|---|---|---|---|---|---|"]
    for run in res.sites:
        cid = run.site.client_id
        e = res.epsilon[cid]
        lines.append(f"| {cid} | {e['federated']:.4g} | {e.get('local', 0):.4g} | {e['job_budget']:g} | "
                     f"{e['lifetime']:g} | {'yes' if checks[cid]['within_budget'] else '**NO**'} |")
    lines += ["", "Epsilon is per site and never summed across sites. The agents' own ledgers "
              "(`sites/*/state/privacy_ledger.db`) hold the same runs and refuse any round past the lifetime budget.",
              "", "## Rounds", "", "| round | status | version | accepted | rejected |", "|---|---|---|---|---|"]
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
    ok = all(c["beats_base"] and c["within_budget"] for c in checks.values()) and audit.get("ok")
    lines += ["## Verdict", "",
              ("Every institution's held-out loss is lower with the federated DP adapter than with the base, every "
               "epsilon is within its budget, and the audit trail verifies." if ok else
               "**Not every check passed**: see the tables above."), ""]
    path = res.run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
