"""What ``fedtune demo`` does, step by step (see ``__init__.py`` for the command).

1. the base (built once); 2. the coordinator; 3. the sites (data, keys, registration, agents);
4. the federated DP job through the admin API, every version evaluated on every site's held-out
records; 5. the comparisons, in parallel: each site alone (`fedtune agent train-local` on its own
records and ledger, at the epsilon it spent on the job) and the centralized DP reference
(`train-local` on every site's records pooled, in a state directory of its own: what a consortium
that could pool its records would get; a real one cannot); 6. the audit trail, exported and
verified offline. The report (``report.py``) is written from what this returns.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedtune.cli.demo.evaluate import Metrics, evaluate
from fedtune.cli.demo.sites import Site, demo_sites, write_site_data
from fedtune.cli.demo.stack import Child, Stack, fedtune_bin, healthy, wait_until, write_toml
from fedtune.client_agent.config import THREADS_ENV
from fedtune.coordinator.superlink import free_port

console = Console()
JOB_ID = "demo-job"
DATASET_ID = "train"  # each site's budget name: its data file's stem, as agent run names it
# Attention and MLP projections: with the MLPs the random base learns the tasks in far fewer steps.
TARGET_MODULES = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                  "down_proj"]
JOB_DELTA = 1e-5
MAX_LEN = 48
# A random base drawn with std 0.2 learns the demo's tasks in far fewer steps than one drawn with 0.1.
BASE_INIT_STD = 0.2
# An honest round moves B by a few units here (SGD with momentum, noise-dominated); a larger update is refused.
NORM_BOUND = 50.0
# Each party's recipe, the one measured best for it on this task (3 hospitals, 256 records each, epsilon 8, 40
# DP-SGD steps of batch 64; 7 draws of the noise each, in the closing note of the federation issue):
# * the sites in the job: SGD with momentum. AdamW at each site scales every coordinate of its noise-dominated
#   update to about the learning rate, so averaging three sites cancelled little of the noise (mean 62%); plain
#   SGD keeps each update linear in the noisy gradients and the coordinator's average cancels the noise the
#   way one pooled batch would. 8 rounds of 5 steps: 82-100% (the adapter still climbing at the last round);
#   12 rounds (sigma 1.51 instead of 1.32 for the same epsilon): 98-100% at every site on 8 draws of 8, but
#   reached only at rounds 9-12 (one real run of five: 91% at one site); 16 rounds (sigma 1.67): 99-100% from
#   round 10 on;
# * a site alone: plain SGD at the same rate (72% mean; AdamW 65%, SGD with momentum 66%);
# * the pooled reference: AdamW (100%).
JOB_RECIPE = {"optimizer": "sgd", "lr": 0.45, "momentum": 0.9}
ALONE_RECIPE = {"optimizer": "sgd", "lr": 0.45, "momentum": 0.0}
REFERENCE_RECIPE = {"optimizer": "adamw", "lr": 0.015, "momentum": 0.0}
REFERENCE_DATASET = "pooled"


@dataclass
class DemoOptions:
    """The run's settings; the defaults are what benchmarks/federated_utility.py found to hold robustly."""

    out: Path
    clients: int = 3  # hospitals sharing the triage task
    own_task_site: bool = False  # also a bank whose task no other site has
    rounds: int = 16
    base: Path | None = None
    records: int = 256  # training records per site
    heldout: int = 128
    epsilon: float = 8.0  # per site, for the whole federated job
    steps: int = 5  # DP-SGD steps per round at each site
    batch_size: int = 64  # expected Poisson batch per site (the reference: sites x this)
    rank: int = 8


@dataclass
class SiteRun:
    site: Site
    root: Path
    train: Path
    heldout: Path
    keys: Path
    public_key: str = ""
    node_public_key: str = ""
    child: Child | None = None


@dataclass
class Results:
    """Everything the report needs."""

    options: DemoOptions
    base: Path
    base_digest: str
    base_built: bool
    sites: list[SiteRun]
    run_dir: Path
    per_round: dict[int, dict[str, Metrics]] = field(default_factory=dict)  # version -> site -> metrics
    rounds: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    epsilon: dict[str, dict] = field(default_factory=dict)  # site -> {federated, local, job_budget, lifetime}
    epsilon_rounds: dict[str, list[float]] = field(default_factory=dict)  # site -> job's composed epsilon by round
    local: dict[str, Metrics] = field(default_factory=dict)
    central: dict[str, Metrics] = field(default_factory=dict)  # the centralized DP reference, on each site's held-out
    reference: dict = field(default_factory=dict)  # the reference run: records, batch, epsilon, ...
    final: dict[str, Metrics] = field(default_factory=dict)
    audit: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _step(text: str) -> None:
    console.rule(f"[bold]{text}")


def build_base(out: Path) -> tuple[Path, bool]:
    """The demo base (tiny preset, random weights with std BASE_INIT_STD, int4) under ``out/base``, built once
    (its directory names the std, so a base built with another std is never reused by mistake)."""
    from fedtune.model.checkpoint import save_pretrained
    from fedtune.model.config import PRESETS
    from fedtune.model.convert import convert_checkpoint
    from fedtune.model.model import DeepseekForCausalLM, init_weights

    base = out / "base" / f"tiny-std{BASE_INIT_STD:g}-int4"
    if (base / "config.json").exists():
        return base, False
    scratch = out / "base" / ".building"
    shutil.rmtree(scratch, ignore_errors=True)
    model = DeepseekForCausalLM(dataclasses.replace(PRESETS["tiny"], initializer_range=BASE_INIT_STD))
    init_weights(model, 0)
    save_pretrained(model, scratch / "float")
    convert_checkpoint(scratch / "float", scratch / "int4", "int4", 32)
    (scratch / "int4").rename(base)  # in place only once complete: an interrupted build is redone
    shutil.rmtree(scratch, ignore_errors=True)
    return base, True


def _prepare_sites(opts: DemoOptions, run_dir: Path, base: Path, superlink: str, ca: Path) -> list[SiteRun]:
    from fedtune.client_agent.cli import write_site_keys

    runs = []
    for site in demo_sites(opts.clients, opts.own_task_site):
        root = run_dir / "sites" / site.client_id
        train, heldout = write_site_data(site, root / "data", records=opts.records, heldout=opts.heldout)
        keys = root / "keys"
        public_key, node_public_key = write_site_keys(keys)  # what `fedtune agent keygen --dir keys` writes
        run = SiteRun(site, root, train, heldout, keys, public_key, node_public_key)
        write_toml(root / "agent.toml", "agent", {
            "client_id": site.client_id, "superlink": superlink, "root_cert": str(ca),
            "signing_key": "keys/receipt.pem", "node_auth_key": "keys/node-key", "base": str(base.resolve()),
            "data": "data/train.jsonl", "dataset_id": DATASET_ID, "budget_epsilon": _lifetime_budget(opts),
            "budget_delta": 1e-4, "device": "cpu", "state_dir": "state", "threads": 1})  # the agents share the cores
        runs.append(run)
    return runs


def _lifetime_budget(opts: DemoOptions) -> float:
    """Each site's lifetime epsilon: the federated job and the local-only baseline, with room to spare."""
    return round(2.5 * opts.epsilon, 3)


def _job_body(opts: DemoOptions, digest: str, sites: list[SiteRun]) -> dict:
    categories = sorted({"synthetic triage notes" if s.site.shares_task else f"synthetic {s.site.task.split(' ->')[0]}s"
                         for s in sites})
    return {"id": JOB_ID, "base_digest": digest, "clients": [s.site.client_id for s in sites],
            "rounds": opts.rounds, "min_clients": len(sites), "aggregation": {"method": "ffa"},
            "round_timeout_s": 600, "max_client_epsilon": opts.epsilon, "norm_bound": NORM_BOUND,
            "declared_records": {s.site.client_id: opts.records for s in sites},
            "lora": {"rank": opts.rank, "alpha": 2.0 * opts.rank, "ffa": True, "target_modules": TARGET_MODULES},
            "train": {"batch_size": opts.batch_size, "physical_batch_size": opts.batch_size, "steps": opts.steps,
                      "max_len": MAX_LEN, **JOB_RECIPE},
            # the whole job's epsilon per site: each agent calibrates every round so that all rounds compose to it
            "privacy": {"target_epsilon": opts.epsilon, "delta": JOB_DELTA, "secure_mode": True},
            "processing": {"purpose": "fedtune demo: triage levels from synthetic triage notes",
                           "data_categories": categories, "retention_days": 30}}


class Api:
    """The admin API as the demo's operator and auditor use it."""

    def __init__(self, url: str, ca: Path, operator: str, auditor: str) -> None:
        self.client = httpx.Client(base_url=f"{url}/api/v1", timeout=120, verify=str(ca))
        self.op = {"Authorization": f"Bearer {operator}"}
        self.aud = {"Authorization": f"Bearer {auditor}"}

    def call(self, method: str, path: str, *, auditor: bool = False, expect: int = 200, **kw) -> httpx.Response:
        r = self.client.request(method, path, headers=self.aud if auditor else self.op, **kw)
        if r.status_code != expect:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r


def _tokens(data_dir: Path, url: str) -> tuple[str, str, str]:
    """The demo's operator and auditor tokens, and an admin token for a person watching in the web console."""
    from fedtune.coordinator.api.auth import create_token
    from fedtune.coordinator.migrations import upgrade_database
    from fedtune.coordinator.store import create_session_factory, create_store_engine

    engine = create_store_engine(url)
    upgrade_database(engine)
    sessions = create_session_factory(engine, immediate=True)
    tokens = []
    for role, name in (("operator", "demo operator"), ("auditor", "demo auditor"), ("admin", "demo console")):
        with sessions.begin() as s:
            tokens.append(create_token(s, name=name, role=role)[1])
    engine.dispose()
    return tokens[0], tokens[1], tokens[2]


def _job_runs(run: SiteRun) -> list[dict]:
    """The site's completed runs of the demo job, by round, from its own privacy ledger."""
    from fedtune.client_agent.ledger import LEDGER_FILE, PrivacyLedger

    path = run.root / "state" / LEDGER_FILE
    if not path.exists():  # the agent has not started yet
        return []
    with PrivacyLedger(path) as ledger:
        rows = [r for r in ledger.runs(DATASET_ID) if r["job_id"] == JOB_ID and r["status"] == "completed"]
    return sorted(rows, key=lambda r: r["round"])


def _composed(rows: list[dict]) -> float:
    """The epsilon a site's runs of the job spend together (composed by the accountant, at the job's delta)."""
    from fedtune.compliance.accounting import Mechanism, composed_epsilon

    return composed_epsilon([Mechanism(r["sample_rate"], r["noise_multiplier"], r["steps"]) for r in rows], JOB_DELTA)


def _site_progress(sites: list[SiteRun], round_number: int) -> dict[str, tuple[bool, float]]:
    """Per site: has it finished training round ``round_number``, and the epsilon it has spent on the job."""
    out = {}
    for run in sites:
        rows = _job_runs(run)
        out[run.site.client_id] = (any(r["round"] == round_number for r in rows), _composed(rows))
    return out


def _progress_table(res: Results, job: dict, started: float) -> Table:
    opts = res.options
    current = min(job["rounds_done"] + 1, opts.rounds)
    title = (f"job {JOB_ID}: {job['status']}, round {current if job['status'] == 'running' else job['rounds_done']}"
             f"/{opts.rounds}, {time.monotonic() - started:.0f} s")
    table = Table(title=title, title_justify="left")
    for col in ("site", f"round {current}", "epsilon spent / job budget", "held-out loss", "held-out accuracy"):
        table.add_column(col)
    progress = _site_progress(res.sites, current)
    latest = res.per_round.get(max(res.per_round)) if res.per_round else {}
    for run in res.sites:
        cid = run.site.client_id
        done, eps = progress[cid]
        state = "trained" if done else ("training" if job["status"] == "running" else "-")
        m = latest.get(cid)
        table.add_row(cid, state, f"{eps:.2f} / {opts.epsilon:g}", f"{m.loss:.3f}" if m else "-",
                      f"{m.accuracy:.0%}" if m else "-")
    return table


def _evaluate_version(res: Results, api: Api, base_model, tokenizer, version: int) -> None:
    target = res.run_dir / "adapters" / f"v{version}" if version > 0 else None  # version 0: B = 0, the base
    if target is not None and not target.exists():
        r = api.call("GET", f"/jobs/{JOB_ID}/adapters/{version}/download")
        tmp = target.with_name(f".v{version}")
        shutil.rmtree(tmp, ignore_errors=True)
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp)
        tmp.rename(target)
    res.per_round[version] = {run.site.client_id: evaluate(base_model, tokenizer, run.site, run.heldout, target)
                              for run in res.sites}


def run_demo(opts: DemoOptions) -> Results:
    """Everything, start to end; returns what the report shows. Ctrl-C stops every child."""
    from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert
    from fedtune.model import load_pretrained
    from fedtune.model.safetensors_index import checkpoint_digest, read_index
    from fedtune.model.tokenizer import load_tokenizer

    t0 = time.monotonic()
    opts.out.mkdir(parents=True, exist_ok=True)
    _step("1. the base model")
    if opts.base is not None:
        base, built = opts.base, False
        if not (base / "config.json").exists():
            raise ValueError(f"--base {base} is not a checkpoint directory (no config.json)")
    else:
        base, built = build_base(opts.out)
    digest = checkpoint_digest(read_index(base))
    console.print(f"{'built' if built else 'reusing'} {base} (digest {digest[:16]}...)")

    run_dir = opts.out / f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_dir.mkdir()
    res = Results(opts, base, digest, built, [], run_dir)
    stack = Stack()
    try:
        _step("2. the coordinator: admin API, SuperLink behind its fleet gateway (TLS, node auth), SQLite store")
        coord = run_dir / "coordinator"
        tls = write_self_signed_ca_and_server_cert(coord / "tls", ["127.0.0.1"])
        port, fleet, link = free_port(), free_port(), free_port()
        config = write_toml(coord / "coordinator.toml", "coordinator", {
            "data_dir": "data", "bases": [str(base.resolve())], "host": "127.0.0.1", "port": port,
            "fleet_host": "127.0.0.1", "fleet_port": fleet, "superlink_port": link,
            "tls_ca_cert": "tls/ca.pem", "tls_cert": "tls/server.pem", "tls_key": "tls/server.key",
            "supernode_auth": True})
        (coord / "data").mkdir(parents=True, exist_ok=True)
        operator, auditor, viewer = _tokens(coord / "data",
                                            f"sqlite:///{(coord / 'data' / 'coordinator.db').resolve()}")
        stack.coordinator = Child.start("coordinator", [fedtune_bin(), "coordinator", "serve", "--config",
                                                        str(config)], run_dir / "logs" / "coordinator.log")
        url = f"https://127.0.0.1:{port}"
        wait_until("the admin API", lambda: healthy(url, str(tls.ca_cert)), 180, stack)
        console.print(f"admin API {url}/api/v1, fleet gateway 127.0.0.1:{fleet}; log {stack.coordinator.log}")
        console.print(f"[bold]web console[/bold] {url}/console (watch the job live): sign in with the token "
                      f"{viewer} (admin, this run only). The certificate is from the demo's own CA, "
                      f"{tls.ca_cert.resolve()}: trust it or accept the browser's warning.", soft_wrap=True)
        api = Api(url, tls.ca_cert, operator, auditor)

        _step("3. the sites: private data, keys, registration through the admin API")
        res.sites = _prepare_sites(opts, run_dir, base, f"127.0.0.1:{fleet}", tls.ca_cert.resolve())
        for run in res.sites:
            s = run.site
            api.call("POST", "/clients", expect=201, json={"id": s.client_id, "org": s.org, "name": s.name,
                                                           "public_key": run.public_key,
                                                           "node_public_key": run.node_public_key})
            console.print(f"{s.client_id}: {s.task}, {opts.records} records + {opts.heldout} held out in "
                          f"{run.root / 'data'}")

        def registered() -> bool:
            items = api.call("GET", "/clients").json()["items"]
            return all(c["flower_node_id"] is not None for c in items)

        wait_until("the SuperNode keys to be registered with the SuperLink", registered, 120, stack)
        for run in res.sites:
            run.child = Child.start(run.site.client_id, [fedtune_bin(), "agent", "run", "--config",
                                                         str(run.root / "agent.toml")],
                                    run_dir / "logs" / f"{run.site.client_id}.log",
                                    env={THREADS_ENV: "1"})
            stack.agents.append(run.child)
        res.seconds["setup"] = time.monotonic() - t0

        _step(f"4. the federated job: {opts.rounds} rounds, DP-SGD at every site, epsilon {opts.epsilon:g} per site")
        api.call("POST", "/jobs", expect=201, json=_job_body(opts, digest, res.sites))
        api.call("POST", f"/jobs/{JOB_ID}/start")
        base_model = load_pretrained(base)
        tokenizer = load_tokenizer(base)
        _evaluate_version(res, api, base_model, tokenizer, 0)
        started = time.monotonic()
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                stack.check()
                job = api.call("GET", f"/jobs/{JOB_ID}").json()
                latest = job["latest_version"] or 0
                for version in range(1, latest + 1):
                    if version not in res.per_round:
                        _evaluate_version(res, api, base_model, tokenizer, version)
                        if not console.is_terminal:  # a log, not a screen: one line per round
                            console.print(f"round {version} committed after {time.monotonic() - started:.0f} s: "
                                          + ", ".join(f"{cid} loss {m.loss:.3f} acc {m.accuracy:.0%}"
                                                      for cid, m in res.per_round[version].items()))
                live.update(_progress_table(res, job, started))
                if job["status"] in ("completed", "failed", "aborted"):
                    break
                time.sleep(2)
        if job["status"] != "completed":
            raise RuntimeError(f"the job ended {job['status']}; see {stack.coordinator.log}")
        res.seconds["federated"] = time.monotonic() - started
        res.rounds = api.call("GET", f"/jobs/{JOB_ID}/rounds", auditor=True).json()["items"]
        res.versions = api.call("GET", f"/jobs/{JOB_ID}/adapters", auditor=True).json()["items"]
        for run in res.sites:
            budget = api.call("GET", f"/clients/{run.site.client_id}/privacy/budget", auditor=True).json()
            res.epsilon[run.site.client_id] = {"federated": budget["jobs"][0]["epsilon_spent"],
                                               "job_budget": opts.epsilon, "lifetime": _lifetime_budget(opts)}
        stack.stop_agents()
        res.epsilon_rounds = {}
        for run in res.sites:
            rows = _job_runs(run)
            res.epsilon_rounds[run.site.client_id] = [_composed(rows[:i + 1]) for i in range(len(rows))]

        _step("5. the comparisons, in parallel: each site alone at the epsilon it spent (fedtune agent train-local), "
              "and the centralized DP reference on every site's records pooled")
        t = time.monotonic()
        children = _start_comparisons(res, stack)
        _step("6. the audit trail: export through the admin API, verify offline with the coordinator's public key")
        res.audit = _export_and_verify(api, coord, run_dir)
        console.print(f"fedtune audit verify: {'PASSED' if res.audit['ok'] else 'FAILED'}")
        _finish_comparisons(res, children)
        for run in res.sites:
            res.local[run.site.client_id] = evaluate(base_model, tokenizer, run.site, run.heldout,
                                                     run.root / "local-adapter")
            res.central[run.site.client_id] = evaluate(base_model, tokenizer, run.site, run.heldout,
                                                       res.run_dir / "reference" / "adapter")
        res.seconds["comparisons"] = time.monotonic() - t
        res.final = res.per_round[max(res.per_round)]
    finally:
        stack.stop()
    res.seconds["total"] = time.monotonic() - t0
    return res


def _train_local_args(res: Results, *, data: Path, out: Path, epsilon: float, batch_size: int, dataset_id: str,
                      state_dir: Path, recipe: dict) -> list[str]:
    """``fedtune agent train-local`` with the job's LoRA and length, ``rounds x steps`` steps, and ``recipe``'s
    optimizer."""
    opts = res.options
    return [fedtune_bin(), "agent", "train-local", "--base", str(res.base), "--data", str(data), "--out", str(out),
            "--epsilon", f"{epsilon:.6f}", "--delta", str(JOB_DELTA), "--steps", str(opts.rounds * opts.steps),
            "--batch-size", str(batch_size), "--physical-batch-size", str(batch_size), "--lr", str(recipe["lr"]),
            "--optimizer", recipe["optimizer"], "--momentum", str(recipe["momentum"]),
            "--max-len", str(MAX_LEN), "--rank", str(opts.rank), "--ffa", "--target-modules", ",".join(TARGET_MODULES),
            "--dataset-id", dataset_id, "--state-dir", str(state_dir)]


def _start_comparisons(res: Results, stack: Stack) -> list[tuple[str, Path, Path, Child]]:
    """Start, in parallel: ``train-local`` at every site on its own records and ledger (it spends the site's
    budget) at the epsilon the site spent on the job, and the centralized DP reference.

    The reference pools every site's training records into one file (only this demo, which plays every
    site on one machine, can: a real consortium cannot) and trains on it at the job's epsilon per record,
    with the same steps and a batch as many times larger as there are sites (the same sample rate), in a
    state directory of its own whose budget is set here. Each child joins ``stack.workers`` (stopped with the
    stack) as it starts. Returns (name, adapter dir, log, child) each.
    """
    from fedtune.client_agent.ledger import LEDGER_FILE, PrivacyLedger

    opts = res.options
    started = []
    for run in res.sites:
        log = res.run_dir / "logs" / f"{run.site.client_id}-local.log"
        args = _train_local_args(res, data=run.train, out=run.root / "local-adapter",
                                 epsilon=res.epsilon[run.site.client_id]["federated"], batch_size=opts.batch_size,
                                 dataset_id=DATASET_ID, state_dir=run.root / "state", recipe=ALONE_RECIPE)
        child = Child.start(f"{run.site.client_id} train-local", args, log, env={"OMP_NUM_THREADS": "1"})
        stack.workers.append(child)
        started.append((run.site.client_id, run.root / "local-adapter", log, child))
    ref = res.run_dir / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    pooled = ref / "pooled.jsonl"
    pooled.write_text("".join(run.train.read_text() for run in res.sites))
    with PrivacyLedger(ref / "state" / LEDGER_FILE) as ledger:
        ledger.set_budget(REFERENCE_DATASET, opts.epsilon, JOB_DELTA)
    batch = opts.batch_size * len(res.sites)
    res.reference = {"records": opts.records * len(res.sites), "batch_size": batch, "data": str(pooled),
                     "sites": [run.site.client_id for run in res.sites]}
    log = res.run_dir / "logs" / "reference-train-local.log"
    args = _train_local_args(res, data=pooled, out=ref / "adapter", epsilon=opts.epsilon, batch_size=batch,
                             dataset_id=REFERENCE_DATASET, state_dir=ref / "state", recipe=REFERENCE_RECIPE)
    child = Child.start("reference train-local", args, log, env={"OMP_NUM_THREADS": "1"})
    stack.workers.append(child)
    started.append(("reference", ref / "adapter", log, child))
    return started


def _finish_comparisons(res: Results, children: list[tuple[str, Path, Path, Child]]) -> None:
    """Wait for every comparison run; record the epsilon each spent (its report.json) and each site's lifetime
    spend (its ledger)."""
    from fedtune.client_agent.ledger import LEDGER_FILE, PrivacyLedger

    for name, adapter, log, child in children:
        child.wait(1800)
        if child.popen.returncode != 0:
            raise RuntimeError(f"train-local for {name} failed; log {log}:\n{child.tail()}")
        epsilon = json.loads((adapter / "report.json").read_text())["epsilon"]
        if name == "reference":
            res.reference["epsilon"] = epsilon
        else:
            res.epsilon[name]["local"] = epsilon
    for run in res.sites:  # what the site's own ledger says its history (the job, then the local run) spends
        with PrivacyLedger(run.root / "state" / LEDGER_FILE) as ledger:
            res.epsilon[run.site.client_id]["lifetime_spent"] = ledger.spent(DATASET_ID).epsilon


def _export_and_verify(api: Api, coord: Path, run_dir: Path) -> dict:
    from fedtune.compliance.signing import load_private_key, public_key_pem

    r = api.call("POST", "/audit/export", auditor=True, json={"format": "jsonl"})
    export = run_dir / "audit-export"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(export)
    # The auditor gets the coordinator's public key out of band; here it is derived from the key file.
    pub = run_dir / "coordinator-public.pem"
    pub.write_bytes(public_key_pem(load_private_key(coord / "data" / "keys" / "coordinator.pem")))
    out = subprocess.run([fedtune_bin(), "audit", "verify", str(export), "--pubkey", str(pub)],
                         capture_output=True, text=True, timeout=300)
    manifest = json.loads((export / "manifest.json").read_text()) if (export / "manifest.json").exists() else {}
    return {"ok": out.returncode == 0, "output": (out.stdout + out.stderr).strip(), "export": str(export),
            "records": manifest.get("records"), "pubkey": str(pub)}
