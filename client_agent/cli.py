"""`fedtune agent ...`: what runs inside an institution's network.

`train-local` fine-tunes alone (one institution, no coordinator; also the local-only baseline):
it checks the dataset's lifetime privacy budget in the agent's ledger before touching the
data, trains DP-LoRA with a progress bar, and writes the adapter (peft format) and a report.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedtune.client_agent.data import DataError, data_digest, load_records
from fedtune.client_agent.ledger import BudgetExceeded, PlannedRun, PrivacyLedger
from fedtune.client_agent.lora import LoraSettings, attach_lora, detach_lora, load_adapter_state, save_adapter
from fedtune.client_agent.privacy import PrivacyConfig, PrivacyError
from fedtune.client_agent.training import TrainConfig, plan_training, train_dp_lora
from fedtune.model import CheckpointError, load_pretrained
from fedtune.model.tokenizer import load_tokenizer

app = typer.Typer(help="The on-premise agent: local DP-LoRA training and its privacy ledger.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
budget_app = typer.Typer(help="Lifetime privacy budgets of local datasets.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
console = Console()
err = Console(stderr=True, soft_wrap=True)

DEFAULT_STATE_DIR = Path(".fedtune/agent")
StateDir = Annotated[Path, typer.Option(help="The agent's state directory (holds the privacy ledger).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=code)


@budget_app.command("set")
def budget_set(
    dataset: Annotated[str, typer.Option(help="Dataset id (the name the budget is kept under).")],
    epsilon: Annotated[float, typer.Option(help="Lifetime epsilon the dataset may spend in total.")],
    delta: Annotated[float, typer.Option(help="Lifetime delta.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Set (or lower) a dataset's lifetime privacy budget."""
    with PrivacyLedger(state_dir / "ledger.db") as ledger:
        try:
            ledger.set_budget(dataset, epsilon, delta)
        except ValueError as e:
            raise _fail(str(e)) from e
    console.print(f"budget of {dataset!r}: epsilon={epsilon}, delta={delta}")


@budget_app.command("show")
def budget_show(dataset: Annotated[str, typer.Option(help="Dataset id.")], state_dir: StateDir = DEFAULT_STATE_DIR,
                ) -> None:
    """Print a dataset's budget, what its runs spent, and what is left (JSON)."""
    with PrivacyLedger(state_dir / "ledger.db") as ledger:
        budget = ledger.budget(dataset)
        if budget is None:
            raise _fail(f"dataset {dataset!r} has no budget in {state_dir / 'ledger.db'}")
        spent, left = ledger.spent(dataset), ledger.remaining(dataset)
        print(json.dumps({"dataset": dataset, "budget": vars(budget), "spent": vars(spent), "remaining": vars(left),
                          "runs": ledger.runs(dataset)}, indent=2))


@app.command("train-local")
def train_local(
    base: Annotated[Path, typer.Option(help="Base checkpoint directory (float or quantized).")],
    data: Annotated[Path, typer.Option(help="JSONL file, one {\"prompt\": ..., \"completion\": ...} per line.")],
    out: Annotated[Path, typer.Option(help="Directory for the adapter (peft format) and report.json.")],
    epsilon: Annotated[float, typer.Option(help="Epsilon this run may spend (noise is calibrated to it).")] = 8.0,
    delta: Annotated[float, typer.Option(help="Delta of this run.")] = 1e-5,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs instead of steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Expected (Poisson) batch size.")] = 16,
    physical_batch_size: Annotated[int, typer.Option(help="Records per forward/backward (memory).")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    max_len: Annotated[int, typer.Option(help="Tokens per record.")] = 256,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    expert_lora: Annotated[bool, typer.Option(help="Also adapt the routed experts (per-expert LoRA).")] = False,
    ffa: Annotated[bool, typer.Option(help="FFA-LoRA: A fixed from the seed, only B trained.")] = False,
    seed: Annotated[int, typer.Option(help="Adapter initialisation seed.")] = 0,
    max_grad_norm: Annotated[float, typer.Option(help="Per-record clipping bound.")] = 1.0,
    accountant: Annotated[str, typer.Option(help="Privacy accountant: rdp or prv.")] = "rdp",
    secure_mode: Annotated[bool, typer.Option(help="Cryptographically secure sampling and noise.")] = True,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="--no-dp trains without privacy (baselines only; "
                                     "the ledger is not involved).")] = True,
    dataset_id: Annotated[str | None, typer.Option(help="Budget name of the data (default: the data file's "
                                                   "absolute path).")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fine-tune LoRA adapters alone, with differential privacy, within the dataset's lifetime budget."""
    if out.exists() and any(out.iterdir()):
        raise _fail(f"{out} is not empty; choose a new directory for the adapter")
    try:
        records = load_records(data)
        train_cfg = TrainConfig(batch_size=batch_size, physical_batch_size=physical_batch_size, steps=steps,
                                epochs=epochs, lr=lr, max_len=max_len, seed=seed, device=device)
        privacy_cfg = PrivacyConfig(target_epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm,
                                    accountant=accountant, secure_mode=secure_mode, enabled=dp)
        settings = LoraSettings(rank=rank, alpha=2.0 * rank, expert_lora=expert_lora, ffa=ffa, seed=seed)
        plan = plan_training(len(records), train_cfg, privacy_cfg)
    except (DataError, PrivacyError, ValueError) as e:
        raise _fail(str(e)) from e

    dataset_id = dataset_id or str(data.resolve())
    with PrivacyLedger(state_dir / "ledger.db") as ledger:
        run_id = None
        if plan is not None:
            try:
                run_id = ledger.reserve(dataset_id, data_digest(data), "local", PlannedRun(
                    plan.epsilon, plan.delta, plan.sample_rate, plan.noise_multiplier, plan.steps, plan.accountant))
            except BudgetExceeded as e:
                raise _fail(str(e), code=3) from e
            console.print(f"privacy plan: epsilon={plan.epsilon:.4g} (target {epsilon}), delta={delta}, "
                          f"sigma={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}, {plan.steps} steps")
        try:
            model = load_pretrained(base, device=device)
            tokenizer = load_tokenizer(base)
            columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
            with Progress(*columns, console=console) as bar:
                task = bar.add_task("train", total=plan.steps if plan else train_cfg.planned_steps(len(records)),
                                    loss="-")

                def progress(step: int, total: int, loss: float | None) -> None:
                    bar.update(task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-")

                state, report = train_dp_lora(model, None, records, train_cfg, privacy_cfg if dp else None, settings,
                                              tokenizer=tokenizer, plan=plan, progress=progress)
            _write_outputs(model, settings, state, report.to_dict(), out)
        except BaseException as e:
            if run_id is not None:
                ledger.fail(run_id)  # nothing left the agent: release the reservation
            if isinstance(e, (CheckpointError, DataError, PrivacyError, ValueError)):
                raise _fail(str(e)) from e
            raise
        if run_id is not None:
            ledger.settle(run_id, report.epsilon, report.steps)
    spent = f"epsilon={report.epsilon:.4g}, delta={report.delta}" if report.private else "no DP (baseline)"
    console.print(f"wrote {out}: {report.steps} steps in {report.seconds:.1f} s, {spent}")


def _write_outputs(base, settings: LoraSettings, state, report: dict, out: Path) -> None:
    """Adapter (peft format) + report.json, written to a temporary directory and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = attach_lora(base, settings)
        try:
            load_adapter_state(model, state)
            save_adapter(model, tmp)
        finally:
            detach_lora(model)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
