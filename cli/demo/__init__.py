"""`fedtune demo`: the whole system on one machine, what the README's first command runs.

Builds a small base once, generates private data for two banks and a hospital, starts the
coordinator and one agent per site as real processes on 127.0.0.1 (TLS, Flower node
authentication, SQLite), registers the sites and runs a federated DP job through the admin API,
trains local-only DP baselines at the same epsilon, exports and verifies the audit trail, and
writes a report (Markdown + PNG plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def demo(
    clients: Annotated[int, typer.Option(help="Number of institutions (2-8): bank-a, bank-b, hospital-c, ...")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 4,
    base: Annotated[Path | None, typer.Option(help="A base checkpoint to use instead of building the demo base "
                                                   "(its own tokenizer is used).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the base (built once) and each run's files and report.")]
    = Path("out/demo"),
    records: Annotated[int, typer.Option(help="Training records per institution.")] = 512,
    heldout: Annotated[int, typer.Option(help="Held-out records per institution.")] = 128,
    epsilon: Annotated[float, typer.Option(help="Epsilon each institution spends on the whole federated job.")] = 8.0,
    steps: Annotated[int, typer.Option(help="DP-SGD steps per round at each institution.")] = 20,
) -> None:
    """Run a federated, differentially private fine-tuning job on one machine and write a report."""
    from fedtune.cli.demo.run import DemoOptions, console

    problems = [f"{name} {value} (need {need})" for name, value, ok, need in (
        ("--clients", clients, 2 <= clients <= 8, "2 to 8: a federation needs two sites"),
        ("--rounds", rounds, rounds >= 1, ">= 1"), ("--steps", steps, steps >= 1, ">= 1"),
        ("--records", records, records >= 64, ">= 64, one Poisson batch"), ("--heldout", heldout, heldout >= 8, ">= 8"),
        ("--epsilon", epsilon, 0 < epsilon <= 100, "in (0, 100]")) if not ok]
    if problems:
        console.print(f"[red]error:[/red] {escape('; '.join(problems))}")
        raise typer.Exit(2)
    from fedtune.cli.demo.report import verdicts, write_report  # heavy imports (torch, peft): only when running
    from fedtune.cli.demo.run import run_demo

    opts = DemoOptions(out=out, clients=clients, rounds=rounds, base=base, records=records, heldout=heldout,
                       epsilon=epsilon, steps=steps)
    try:
        res = run_demo(opts)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]: every child process was stopped; the coordinator's store "
                      "keeps the rounds that completed (a round in flight is never half-written).")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    report = write_report(res)
    checks = verdicts(res)
    ok = all(c["beats_base"] and c["within_budget"] for c in checks.values()) and res.audit.get("ok")
    console.rule("[bold]done")
    for run in res.sites:
        cid = run.site.client_id
        console.print(f"{cid}: held-out loss base {res.per_round[0][cid].loss:.3f} -> federated DP "
                      f"{res.final[cid].loss:.3f} (local-only DP {res.local[cid].loss:.3f}); accuracy "
                      f"{res.per_round[0][cid].accuracy:.0%} -> {res.final[cid].accuracy:.0%} "
                      f"(local-only {res.local[cid].accuracy:.0%}); epsilon {res.epsilon[cid]['federated']:.3g}")
    console.print(f"audit verification: {'passed' if res.audit.get('ok') else 'FAILED'}")
    console.print(f"report: {report.resolve()}  ({res.seconds['total']:.0f} s)")
    if not ok:
        raise typer.Exit(1)
