"""`fedtune agent ...`: what runs inside an institution's network.

`keygen` makes a site's two key pairs (receipt signing, SuperNode authentication) and prints what
the coordinator operator registers. `run` runs the site's agent for a federation: the daemon
(base, data, privacy ledger) and its Flower SuperNode, from an `agent.toml` (`config.py`), until
Ctrl-C or SIGTERM.

`train-local` fine-tunes alone (one institution, no coordinator; also the local-only baseline):
it checks the dataset's lifetime privacy budget in the agent's ledger before touching the
data, trains DP-LoRA with a progress bar, and writes the adapter (peft format) and a report.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedtune.client_agent.config import THREADS_ENV, AgentConfig, AgentConfigError
from fedtune.client_agent.ledger import LEDGER_FILE, BudgetExceeded, PlannedRun, PrivacyLedger
from fedtune.compliance.signing import encode_public_key, generate_signing_key, save_private_key

if TYPE_CHECKING:
    from fedtune.client_agent.supernode import AgentProcesses
    from fedtune.model.adapters import LoraSettings

app = typer.Typer(help="The on-premise agent: keys, the federation agent, local DP-LoRA training and its "
                  "privacy ledger.",
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


RECEIPT_KEY, NODE_KEY = "receipt.pem", "node-key"
KEYGEN_FILES = (RECEIPT_KEY, "receipt.pub", NODE_KEY, "node-key.pub")


@app.command("keygen")
def keygen(
    key_dir: Annotated[Path, typer.Option("--dir", help="Directory for the key files (created, mode 0700).")],
    client_id: Annotated[str | None, typer.Option(help="This site's client id, for the registration body.")] = None,
    org: Annotated[str | None, typer.Option(help="Organisation code, for the registration body.")] = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: the client id).")] = None,
) -> None:
    """Make this site's receipt-signing key (Ed25519) and SuperNode key (ECDSA P-384); print what to register."""
    try:
        public_key, node_public_key = write_site_keys(key_dir)
    except FileExistsError as e:
        raise _fail(f"{e.filename} exists; keys are never overwritten (choose another --dir, or move the old keys "
                    "away if you really mean to replace this site's identity)") from e
    body = {"id": client_id or "<client-id>", "org": org or "<org>", "name": name or client_id or "<name>",
            "public_key": public_key, "node_public_key": node_public_key}
    console.print(f"wrote {escape(str(key_dir))}/: {RECEIPT_KEY} and {NODE_KEY} (private, mode 0600), "
                  "receipt.pub and node-key.pub (public)", highlight=False, soft_wrap=True)
    console.print(f"receipt public key:   {public_key}", highlight=False, soft_wrap=True)
    console.print(f"SuperNode public key: {escape(node_public_key)}", highlight=False, soft_wrap=True)
    console.print(f"The private files ({RECEIPT_KEY}, {NODE_KEY}) never leave this site. Give the coordinator "
                  "operator the public values; they register the site with POST /api/v1/clients and this body"
                  + ("" if client_id and org else " (fill in the <...> fields)") + ":", highlight=False, soft_wrap=True)
    print(json.dumps(body, indent=2))


def write_site_keys(key_dir: Path) -> tuple[str, str]:
    """Write a site's key files into ``key_dir`` (mode 0700): ``receipt.pem`` / ``receipt.pub`` (Ed25519) and
    ``node-key`` / ``node-key.pub`` (SuperNode, ECDSA P-384); returns the two public values to register.

    Raises:
        FileExistsError: one of the files exists (nothing is written then).
    """
    from fedtune.client_agent.supernode import write_supernode_auth_key  # imports flwr: only when needed

    for file in KEYGEN_FILES:
        if (key_dir / file).exists():
            raise FileExistsError(errno.EEXIST, "exists", str(key_dir / file))
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    receipt = generate_signing_key()
    save_private_key(key_dir / RECEIPT_KEY, receipt)
    public_key = encode_public_key(receipt)
    _write_new(key_dir / "receipt.pub", public_key + "\n")
    return public_key, write_supernode_auth_key(key_dir / NODE_KEY).read_text().strip()


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class _StopRequested(Exception):
    """SIGINT, SIGTERM or SIGHUP reached `agent run`."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SUPERNODE_ID = re.compile(r"SuperNode ID: (\d+)")


def _request_stop(signum: int, _frame: object) -> None:
    for sig in _STOP_SIGNALS:  # the stop is bounded (grace, then SIGKILL): do not interrupt it
        signal.signal(sig, signal.SIG_IGN)
    raise _StopRequested(signal.Signals(signum).name)


@app.command("run")
def run(config: Annotated[Path, typer.Option("--config", help="The site's agent.toml.")]) -> None:
    """Run this site's agent (daemon + Flower SuperNode) for the federation until Ctrl-C or SIGTERM."""
    try:
        cfg = AgentConfig.from_toml(config)
    except AgentConfigError as e:
        raise _fail(str(e)) from e
    for warning in cfg.key_warnings():
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    previous = {sig: signal.signal(sig, _request_stop) for sig in _STOP_SIGNALS}
    try:
        code = _run_agent(cfg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)


def _run_agent(cfg: AgentConfig) -> int:
    """Start the daemon, then the SuperNode; supervise both. Returns the exit code."""
    from fedtune.client_agent.supernode import attach_supernode, start_agent  # imports flwr: only when needed

    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    supernode_log = cfg.state_dir / "supernode.log"
    log_offset = supernode_log.stat().st_size if supernode_log.exists() else 0
    agent: AgentProcesses | None = None
    try:
        t = time.monotonic()
        threads = cfg.threads or int(os.environ.get(THREADS_ENV, 0)) or os.cpu_count() or 1
        os.environ[THREADS_ENV] = str(threads)  # the daemon's torch threads (it inherits the environment)
        agent = start_agent(client_id=cfg.client_id, base=cfg.base, key=cfg.signing_key, data=cfg.data,
                            state_dir=cfg.state_dir, budget_epsilon=cfg.budget_epsilon,
                            budget_delta=cfg.budget_delta, dataset_id=cfg.dataset, device=cfg.device, wait=False)
        _say(f"agent {cfg.client_id}: loading base {cfg.base} on {cfg.device} (daemon pid {agent.daemon.pid}, "
             f"log {cfg.state_dir / 'daemon.log'})")
        attach_supernode(agent, superlink_address=cfg.superlink, root_cert=cfg.root_cert,
                         auth_private_key=cfg.node_auth_key, clientappio_port=cfg.clientappio_port,
                         pull_interval_s=cfg.pull_interval_s,
                         ready_timeout_s=math.inf)  # a large base may take long; the daemon dying ends the wait
        tls = "insecure (loopback)" if cfg.insecure else "TLS"
        auth = ", node auth" if cfg.node_auth_key else ""
        _say(f"daemon ready in {time.monotonic() - t:.1f} s; dataset {cfg.dataset!r}, lifetime budget "
             f"epsilon={cfg.budget_epsilon:g}, delta={cfg.budget_delta:g}")
        _say(f"SuperNode started (pid {agent.supernode.pid}, {tls}{auth}), connecting to {cfg.superlink}; "
             "Ctrl-C stops the agent")
        return _supervise(agent, cfg.superlink, supernode_log, log_offset)
    except _StopRequested as stop:
        _say(f"{stop}: stopping the SuperNode, then the daemon")
        if agent is not None:
            agent.stop()
        _say("stopped")
        return 0
    except RuntimeError as e:  # the daemon exited while loading (attach_supernode stopped the agent)
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 1
    finally:
        if agent is not None:
            agent.stop()  # no-op when already stopped


def _supervise(agent: AgentProcesses, superlink: str, supernode_log: Path, log_offset: int) -> int:
    """Watch both children until one exits on its own (-> 1); report when the SuperNode connects."""
    assert agent.supernode is not None
    connected = retry_reported = False
    while True:
        for name, proc in (("SuperNode", agent.supernode), ("daemon", agent.daemon)):
            if proc.poll() is not None:
                err.print(f"[red]error:[/red] the {name} exited on its own (code {proc.returncode}); "
                          "stopping the agent", highlight=False)
                agent.stop()
                err.print(escape(agent.log_tail()), highlight=False)
                return 1
        if not connected:
            text = _read_from(supernode_log, log_offset)
            if match := _SUPERNODE_ID.search(text):
                _say(f"connected to {superlink} (SuperNode id {match.group(1)})")
                connected = True
            elif "Connection attempt failed" in text and not retry_reported:
                _say(f"SuperLink {superlink} not reachable yet; the SuperNode keeps retrying")
                retry_reported = True
        time.sleep(0.5)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _say(message: str) -> None:
    console.print(escape(message), highlight=False, soft_wrap=True)


@budget_app.command("set")
def budget_set(
    dataset: Annotated[str, typer.Option(help="Dataset id (the name the budget is kept under).")],
    epsilon: Annotated[float, typer.Option(help="Lifetime epsilon the dataset may spend in total.")],
    delta: Annotated[float, typer.Option(help="Lifetime delta.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Set (or lower) a dataset's lifetime privacy budget."""
    with PrivacyLedger(state_dir / LEDGER_FILE) as ledger:
        try:
            ledger.set_budget(dataset, epsilon, delta)
        except ValueError as e:
            raise _fail(str(e)) from e
    console.print(f"budget of {dataset!r}: epsilon={epsilon}, delta={delta}")


@budget_app.command("show")
def budget_show(dataset: Annotated[str, typer.Option(help="Dataset id.")], state_dir: StateDir = DEFAULT_STATE_DIR,
                ) -> None:
    """Print a dataset's budget, what its runs spent, and what is left (JSON)."""
    with PrivacyLedger(state_dir / LEDGER_FILE) as ledger:
        budget = ledger.budget(dataset)
        if budget is None:
            raise _fail(f"dataset {dataset!r} has no budget in {state_dir / LEDGER_FILE}")
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
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (a federated job's sites use what the job names).")
                         ] = "adamw",
    momentum: Annotated[float, typer.Option(help="SGD momentum in [0, 1) (--optimizer sgd only).")] = 0.0,
    max_len: Annotated[int, typer.Option(help="Tokens per record.")] = 256,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    target_modules: Annotated[str | None, typer.Option(help="Comma-separated projections to adapt (default: all "
                                                       "attention and dense-MLP projections).")] = None,
    expert_lora: Annotated[bool, typer.Option(help="Also adapt the routed experts (per-expert LoRA).")] = False,
    ffa: Annotated[bool, typer.Option(help="FFA-LoRA: A fixed from the seed, only B trained.")] = False,
    seed: Annotated[int, typer.Option(help="Adapter initialisation seed.")] = 0,
    max_grad_norm: Annotated[float, typer.Option(help="Per-record clipping bound.")] = 1.0,
    accountant: Annotated[str, typer.Option(help="Privacy accountant: rdp or prv.")] = "rdp",
    secure_mode: Annotated[bool, typer.Option(help="Cryptographically secure sampling and noise.")] = True,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="--no-dp trains without privacy (baselines only; "
                                     "the ledger is not involved).")] = True,
    dataset_id: Annotated[str | None, typer.Option(help="Budget name of the data (default: the data file's "
                                                   "name without extension, as `agent run` names it).")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fine-tune LoRA adapters alone, with differential privacy, within the dataset's lifetime budget."""
    # torch, peft and Opacus load here, not when any `fedtune` command starts
    from fedtune.client_agent.data import DataError, count_records, data_digest, load_records
    from fedtune.client_agent.privacy import PrivacyConfig, PrivacyError
    from fedtune.client_agent.training import TrainConfig, plan_training, train_dp_lora
    from fedtune.model import CheckpointError, load_pretrained
    from fedtune.model.adapters import LoraSettings
    from fedtune.model.tokenizer import load_tokenizer

    if out.exists() and any(out.iterdir()):
        raise _fail(f"{out} is not empty; choose a new directory for the adapter")
    try:
        num_records = count_records(data)  # the budget is checked before any record is read
        train_cfg = TrainConfig(batch_size=batch_size, physical_batch_size=physical_batch_size, steps=steps,
                                epochs=epochs, lr=lr, max_len=max_len, seed=seed, device=device,
                                optimizer=optimizer, momentum=momentum)
        privacy_cfg = PrivacyConfig(target_epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm,
                                    accountant=accountant, secure_mode=secure_mode, enabled=dp)
        targets = {"target_modules": tuple(t.strip() for t in target_modules.split(",") if t.strip())} \
            if target_modules else {}
        settings = LoraSettings(rank=rank, alpha=2.0 * rank, expert_lora=expert_lora, ffa=ffa, seed=seed, **targets)
        plan = plan_training(num_records, train_cfg, privacy_cfg)
    except (DataError, PrivacyError, ValueError) as e:
        raise _fail(str(e)) from e

    dataset_id = dataset_id or data.stem
    with PrivacyLedger(state_dir / LEDGER_FILE) as ledger:
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
            records = load_records(data)
            model = load_pretrained(base, device=device)
            tokenizer = load_tokenizer(base)
            columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
            with Progress(*columns, console=console) as bar:
                task = bar.add_task("train", total=plan.steps if plan else train_cfg.planned_steps(num_records),
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
    from fedtune.model.adapters import attach_lora, detach_lora, load_adapter_state, save_adapter

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
