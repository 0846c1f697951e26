"""`fedtune demo`: the whole system on one machine, what the README's first command runs.

Builds a small base once, generates private data for hospitals that share a task (triage notes ->
triage level, each hospital with its own case mix and few records), with ``--own-task-site`` also a
bank with a task of its own,
starts the coordinator and one agent per site as real processes on 127.0.0.1 (TLS, Flower node
authentication, SQLite), registers the sites and runs a federated DP job through the admin API,
then compares, at the same epsilon, each site alone (local-only DP) and the centralized DP reference
on the pooled records (which only a demo can run), exports and verifies the audit trail, and writes
a report (Markdown + PNG plots + report.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def demo(
    clients: Annotated[int, typer.Option(help="Hospitals that share the triage task (2-8): hospital-a, hospital-b, "
                                              "... each with its own case mix.")] = 3,
    own_task_site: Annotated[bool, typer.Option(help="Also a bank whose task (memo -> spending category) no other "
                                                     "site shares, in the same job, to show what federation does for "
                                                     "it and to the others (it pulls the shared adapter its own way).")
                             ] = False,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 16,
    base: Annotated[Path | None, typer.Option(help="A base checkpoint to use instead of building the demo base "
                                                   "(its own tokenizer is used).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the base (built once) and each run's files and report.")]
    = Path("out/demo"),
    records: Annotated[int, typer.Option(help="Training records per site (scarce on purpose).")] = 256,
    heldout: Annotated[int, typer.Option(help="Held-out records per site.")] = 128,
    epsilon: Annotated[float, typer.Option(help="Epsilon each site spends on the whole federated job (all rounds "
                                                "together); local-only and the reference spend the same.")] = 8.0,
    steps: Annotated[int, typer.Option(help="DP-SGD steps per round at each site (local-only and the reference "
                                            "take rounds x steps).")] = 5,
) -> None:
    """Run a federated, differentially private fine-tuning job on one machine and write a report."""
    from fedtune.cli.demo.run import DemoOptions, console

    problems = [f"{name} {value} (need {need})" for name, value, ok, need in (
        ("--clients", clients, 2 <= clients <= 8, "2 to 8 hospitals: a shared task needs two sites"),
        ("--rounds", rounds, rounds >= 1, ">= 1"), ("--steps", steps, steps >= 1, ">= 1"),
        ("--records", records, records >= 64, ">= 64, one Poisson batch"), ("--heldout", heldout, heldout >= 8, ">= 8"),
        ("--epsilon", epsilon, 0 < epsilon <= 100, "in (0, 100]")) if not ok]
    if problems:
        console.print(f"[red]error:[/red] {escape('; '.join(problems))}")
        raise typer.Exit(2)
    from fedtune.cli.demo.report import demo_passed, write_report  # heavy imports (torch, peft): only when running
    from fedtune.cli.demo.run import run_demo

    opts = DemoOptions(out=out, clients=clients, own_task_site=own_task_site, rounds=rounds, base=base,
                       records=records, heldout=heldout, epsilon=epsilon, steps=steps)
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
    console.rule("[bold]done")
    for run in res.sites:
        cid = run.site.client_id
        label = "" if run.site.shares_task else " (own task, not shared)"
        console.print(f"{cid}{label}: held-out accuracy base {res.per_round[0][cid].accuracy:.0%}, local-only DP "
                      f"{res.local[cid].accuracy:.0%}, federated DP {res.final[cid].accuracy:.0%}, centralized DP "
                      f"reference {res.central[cid].accuracy:.0%}; epsilon {res.epsilon[cid]['federated']:.3g}")
    console.print(f"audit verification: {'passed' if res.audit.get('ok') else 'FAILED'}")
    console.print(f"report: {report.resolve()}  ({res.seconds['total']:.0f} s)")
    if not demo_passed(res):
        raise typer.Exit(1)
