"""Coordinator scale benchmark: the round engine's cost per update and its memory, at 10 to 1,000 sites.

    .venv/bin/python -P benchmarks/coordinator_scale.py [--clients 10,100,1000] [--stores sqlite,postgresql]
        [--strategies fedavg,ffa,median,trimmed_mean] [--robust-max-clients 100] [--preset small] [--rank 16]
        [--skewed] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

The first two rounds of one job are driven in-process through
:func:`fedtune.coordinator.rounds.run_round`, the function the Flower ServerApp's ``run_job`` calls (no
Flower processes), on a real store (SQLite in a temporary file; PostgreSQL in a fresh schema, dropped
afterwards), with N simulated clients of a rank-16 LoRA on the ``small`` preset (every default
target: attention, dense MLP and shared experts; 1.84 MB per plain-LoRA update, 0.97 MB per FFA
update, float32).

Clients (excluded from every coordinator figure). Before any coordinator process starts, this process
builds version 0 (:func:`fedtune.model.adapters.initial_adapter_state`), gives each client a fresh
Ed25519 key, draws its update (version 0 plus Gaussian noise; records 100-140, so that
``max_weight_multiple`` = 1.5 caps nobody unless ``--skewed`` makes one client claim 100x), signs it
for each round with :func:`fedtune.compliance.wire.sign_train_reply` and serializes it as Flower
carries it (our ``RecordDict`` -> Flower's protobuf bytes) into a file per round. The signatures bind
each round's nonce, so the coordinator's ``new_nonce`` is fixed to values chosen in advance; the engine
still checks every binding as in production.

Coordinator (one fresh process per cell: store x strategy x N). It registers the clients and the job,
writes version 0, then runs two rounds, each followed by the audit checkpoint ``run_job`` signs, with
a transport that yields ONE reply at a time, as Flower hands them over: it reads one client's protobuf
bytes from the file and turns them into a ``RecordDict`` (Flower's own deserialization, counted as
transport), then decodes it with
:func:`fedtune.coordinator.validation.decode_reply` (what the ServerApp's ``interpret_replies`` does:
counted as validation). Round 1 is a fresh coordinator process's first round (every client's stored
key is decoded and checked then, see "key check"); round 2 is the steady state. Columns, in ms per
update (the round's figure / N):

* validate: ``decode_reply`` + the engine's validation (signature verify, bindings, digest, claims,
  shapes, finite values, norm) + reading the signed spend;
* aggregate: folding accepted updates into the strategy and, for weighted strategies, writing them to
  the encrypted spool a binding weight cap is replayed from (``coordinator/intake.py``);
* persist: the adapter blob (encrypted, fsynced) and the round's one transaction (round, update, ledger
  and audit rows, adapter version);
* checkpoint: signing the audit checkpoint the engine's ``run_job`` signs after every round (the whole
  trail's Merkle root; shown apart, in ms per update too);
* CPU: the coordinator process's CPU time over the whole round, per update (the transport's reading
  and parsing included): what the round cost whatever else the machine was running;
* key check: decoding one client's stored public key, whose prime-order check runs in pure Python; the
  validation figure of round 1 pays it once per client, round 2 does not.

Memory, measured in the coordinator's process by Linux's own counters: the resident high-water mark
(``VmHWM``) is reset (``/proc/self/clear_refs`` = 5) just before each round and read after it.
``peak MB`` is that high-water mark (imports, torch, SQLAlchemy included: the coordinator's peak
memory); ``round MB`` is its growth over the resident size before the round, i.e. what the round
itself allocated at its peak (in round 2, beyond what round 1 left resident), torch tensors
included, which ``tracemalloc`` cannot see; the page cache of the store and of the update spool is
not counted, as the kernel does not. Median and trimmed mean hold every update (see
``coordinator/aggregation.py``): they run up to ``--robust-max-clients`` and their documented bound
is printed for larger N.

Prints a Markdown table and one JSON line per cell. Timings on a shared machine move with its load;
compare cells of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

JOB_ID = "scale-job"
BASE_DIGEST = "sha256:" + "ba5e" * 16
ROUNDS = 2
# each round's nonce, fixed in advance so that clients can sign before the coordinator runs
NONCES = {number: bytes((number * 32 + i) % 256 for i in range(32)) for number in range(1, ROUNDS + 1)}
BATCH_SIZE = 8
NORM_BOUND = 10.0
ROBUST = ("median", "trimmed_mean")
FFA_STRATEGIES = ("ffa",)
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# ---------------------------------------------------------------------------------------------
# Clients (run before, and outside, the coordinator's measurement)


def initial_adapter(preset: str, rank: int, ffa: bool) -> dict[str, torch.Tensor]:
    """Version 0 of a job's adapter on ``preset``: the exchanged tensors at their initial values."""
    from fedtune.model.adapters import LoraSettings, initial_adapter_state
    from fedtune.model.config import PRESETS
    from fedtune.model.model import DeepseekForCausalLM

    with torch.device("cpu"):
        base = DeepseekForCausalLM(PRESETS[preset])
    return initial_adapter_state(base, LoraSettings(rank=rank, ffa=ffa))


def client_id(i: int) -> str:
    return f"site-{i:04d}"


def client_records(i: int, skewed: bool) -> int:
    """Records a client claims: 100-140 (no cap binds at max_weight_multiple 1.5); with ``skewed``,
    client 0 claims 100x, so the cap binds and the engine replays the spooled updates."""
    records = 100 + (i * 37) % 41
    return records * 100 if skewed and i == 0 else records


def write_replies(directory: Path, adapter: dict[str, torch.Tensor], n: int, *, skewed: bool = False,
                  seed: int = 0) -> None:
    """Sign ``n`` clients' replies to each of the job's rounds and write them, as Flower's protobuf bytes,
    to ``directory/replies-<round>.bin`` (length-prefixed), with ``clients.json`` (public keys) and
    ``adapter.safetensors`` (version 0). A client sends the same tensors every round."""
    import safetensors.torch
    from flwr.common.serde import recorddict_to_proto

    from fedtune.compliance.signing import encode_public_key, generate_signing_key
    from fedtune.compliance.wire import TrainInstruction, reply_to_record_dict, sign_train_reply

    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(adapter, str(directory / "adapter.safetensors"))
    instructions = [TrainInstruction(job_id=JOB_ID, round=number, nonce=nonce, base_digest=BASE_DIGEST, config={},
                                     adapter={}) for number, nonce in NONCES.items()]
    generator = torch.Generator().manual_seed(seed)
    keys = {}
    with ExitStack() as files:
        outs = [files.enter_context(open(directory / f"replies-{ins.round}.bin", "wb")) for ins in instructions]
        for i in range(n):
            key = generate_signing_key()
            keys[client_id(i)] = encode_public_key(key)
            tensors = {name: t + 1e-3 * torch.randn(t.shape, generator=generator) for name, t in adapter.items()}
            records = client_records(i, skewed)
            for instruction, out in zip(instructions, outs, strict=True):
                reply = sign_train_reply(instruction, client_id=client_id(i), tensors=tensors, records=records,
                                         epsilon=1.0, delta=1e-5, sample_rate=BATCH_SIZE / records,
                                         noise_multiplier=1.0, steps=10, accountant="rdp", private_key=key)
                data = recorddict_to_proto(reply_to_record_dict(reply)).SerializeToString()
                out.write(struct.pack(">Q", len(data)))
                out.write(data)
    (directory / "clients.json").write_text(json.dumps({"clients": keys}))


# ---------------------------------------------------------------------------------------------
# The coordinator's side


class StreamTransport:
    """The round engine's transport over the replies files: a generator that reads, deserializes and
    decodes one reply at a time (as the ServerApp would hand over each pulled Flower message), from
    node i + 1 for client i. ``decode_s`` is the time in ``decode_reply`` (coordinator work)."""

    def __init__(self, directory: Path, clients: list[str]) -> None:
        self.directory = directory
        self.clients = clients
        self.decode_s = 0.0

    def connected_clients(self) -> set[str]:
        return set(self.clients)

    def train(self, instruction: Any, client_ids: list[str], timeout_s: float, **_: Any) -> Iterator[Any]:
        from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

        from fedtune.coordinator.rounds import FromNode
        from fedtune.coordinator.validation import decode_reply

        assert instruction.nonce == NONCES[instruction.round], "the engine's nonce was not fixed: replies won't bind"
        with open(self.directory / f"replies-{instruction.round}.bin", "rb") as f:
            for node in range(1, len(self.clients) + 1):
                (size,) = struct.unpack(">Q", f.read(8))
                content = recorddict_from_proto(ProtoRecordDict.FromString(f.read(size)))
                t = time.perf_counter()
                reply = decode_reply(content)
                self.decode_s += time.perf_counter() - t
                del content
                yield FromNode(reply, node)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def _store(kind: str, workdir: Path, pg_url: str) -> Iterator[str]:
    """A database URL for an empty store: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'coordinator.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"fedtune_scale_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def job_config(strategy: str, n: int, rank: int) -> dict[str, Any]:
    return {"rounds": 2, "min_clients": n, "aggregation": {"method": strategy, "trim_fraction": 0.1},
            "norm_bound": NORM_BOUND, "round_timeout_s": 600, "straggler_grace_s": 600,
            "train": {"lora": {"rank": rank, "ffa": strategy in FFA_STRATEGIES},
                      "train": {"batch_size": BATCH_SIZE}, "privacy": {"target_epsilon": 8.0, "delta": 1e-5}}}


def measure_cell(replies_dir: Path, *, url: str, strategy: str, n: int, rank: int) -> list[dict[str, Any]]:
    """Set up the empty store at ``url`` with ``n`` clients and the job, run its rounds from the replies
    in ``replies_dir`` and return each round's figures (see the module docstring)."""
    import safetensors.torch
    from sqlalchemy.engine import make_url

    from fedtune.compliance.signing import generate_signing_key
    from fedtune.coordinator.encryption import generate_blob_key
    from fedtune.coordinator.migrations import upgrade_database
    from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version, mark_job_running
    from fedtune.coordinator.store import Client, Job, create_session_factory, create_store_engine

    keys = json.loads((replies_dir / "clients.json").read_text())["clients"]
    clients = [client_id(i) for i in range(n)]
    adapter = safetensors.torch.load_file(str(replies_dir / "adapter.safetensors"))
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-") as tmp:
        engine = create_store_engine(url)
        try:
            upgrade_database(engine)
            sessions = create_session_factory(engine, immediate=True)
            with sessions.begin() as s:
                s.add_all(Client(id=c, org="org", name=c, public_key=keys[c]) for c in clients)
                s.add(Job(id=JOB_ID, base_digest=BASE_DIGEST, config=job_config(strategy, n, rank)))
            ctx = CoordinatorContext(sessions=sessions, blob_dir=Path(tmp) / "blobs", blob_key=generate_blob_key(),
                                     signing_key=generate_signing_key())
            create_initial_version(ctx, JOB_ID, adapter)
            mark_job_running(ctx, JOB_ID)
            del adapter
            transport = StreamTransport(replies_dir, clients)
            rows = [_measure_round(ctx, transport, number, strategy, n) for number in NONCES]
        finally:
            engine.dispose()
    key_check_ms = 1e3 * _key_check_s(keys, clients[:20])
    store = make_url(url).get_backend_name()
    return [{"store": store, **row, "key_check_ms": key_check_ms} for row in rows]


def _measure_round(ctx: Any, transport: StreamTransport, number: int, strategy: str, n: int) -> dict[str, Any]:
    """Run round ``number`` and sign the audit checkpoint after it, as ``run_job`` does; the round's figures."""
    from fedtune.coordinator import rounds
    from fedtune.coordinator.store.audit import commit_audit_checkpoint

    gc.collect()
    transport.decode_s = 0.0
    peak_known = _reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    cpu = time.process_time()
    with mock.patch.object(rounds, "new_nonce", lambda: NONCES[number]):
        result = rounds.run_round(ctx, JOB_ID, transport)
    cpu_s = time.process_time() - cpu
    peak_kb = _status_kb("VmHWM") if peak_known else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    commit_audit_checkpoint(ctx.sessions, ctx.signing_key)
    checkpoint_s = time.perf_counter() - t
    if result.status != "completed" or len(result.accepted) != n or result.number != number:
        raise RuntimeError(f"{strategy}/{n}: round {result.number} {result.status} ({result.failure_reason}), "
                           f"{len(result.accepted)} of {n} accepted, rejected {result.rejected[:3]}")
    timings = result.timings
    per_update = {"validate": (timings["validate_s"] + transport.decode_s) / n, "aggregate": timings["aggregate_s"] / n,
                  "persist": timings["persist_s"] / n, "checkpoint": checkpoint_s / n}
    return {"strategy": strategy, "clients": n, "round": number,
            "ms_per_update": {k: 1e3 * v for k, v in per_update.items()},
            "total_ms_per_update": 1e3 * (per_update["validate"] + per_update["aggregate"] + per_update["persist"]),
            "cpu_ms_per_update": 1e3 * cpu_s / n,
            "load_s": timings.get("load_s"), "transport_s": timings.get("transport_and_train_s"),
            "peak_mb": peak_kb / 1024 if peak_kb else None,
            "round_mb": (peak_kb - before_kb) / 1024 if peak_known and before_kb else None,
            "peak_measure": "VmHWM reset before the round" if peak_known else "ru_maxrss (process lifetime)"}


def _key_check_s(keys: dict[str, str], clients: list[str]) -> float:
    """Seconds to decode and check one stored public key (the prime-order subgroup check, in pure Python):
    validation pays it once per client per coordinator process (the engine caches decoded keys)."""
    from fedtune.compliance.signing import decode_public_key

    t = time.perf_counter()
    for c in clients:
        decode_public_key(keys[c])
    return (time.perf_counter() - t) / len(clients)


# ---------------------------------------------------------------------------------------------
# Driver: one fresh process per cell


def robust_bound_mb(adapter: dict[str, torch.Tensor], n: int) -> float:
    """The documented bound of median / trimmed mean's updates in memory (``coordinator/aggregation.py``):
    n adapters as received, plus the largest tensor of all n stacked, in float64, and sorted (28 bytes
    per element and update)."""
    received = sum(t.numel() * t.element_size() for t in adapter.values())
    largest = max(t.numel() for t in adapter.values())
    return n * (received + 28 * largest) / 2**20


def _run_cell(replies_dir: Path, store: str, strategy: str, n: int, rank: int, pg_url: str) -> list[dict[str, Any]]:
    cell = {"replies_dir": str(replies_dir), "store": store, "strategy": strategy, "n": n, "rank": rank,
            "pg_url": pg_url}
    proc = subprocess.run([sys.executable, "-P", __file__, "--cell", json.dumps(cell)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {store}/{strategy}/{n} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("| store | strategy | N | round | validate | aggregate | persist | total (ms/update) | CPU (ms/update) | "
          "checkpoint | key check (ms/key) | peak MB | round MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "bound_mb" in r:
            print(f"| {r['store']} | {r['strategy']} | {r['clients']} | | not run: documented bound "
                  f"{r['bound_mb']:.0f} MB of updates | | | | | | | | |")
            continue
        ms = r["ms_per_update"]
        print(f"| {r['store']} | {r['strategy']} | {r['clients']} | {r['round']} | {ms['validate']:.2f} | "
              f"{ms['aggregate']:.2f} | {ms['persist']:.2f} | {r['total_ms_per_update']:.2f} | "
              f"{r['cpu_ms_per_update']:.2f} | {ms['checkpoint']:.2f} | {r['key_check_ms']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['round_mb']:.0f} |")
    # Peak memory per round; growth in round 1 only (round 2 starts from the resident size round 1 left).
    measured = [r for r in rows if "peak_mb" in r]
    for r in measured:
        first = min((m for m in measured if (m["store"], m["strategy"], m["round"]) ==
                     (r["store"], r["strategy"], r["round"])), key=lambda m: m["clients"])
        if first is not r:
            grown = f", round growth {r['round_mb'] / first['round_mb']:.2f}x" if r["round"] == 1 else ""
            print(f"{r['store']}/{r['strategy']} round {r['round']}: N={r['clients']} vs N={first['clients']}: "
                  f"peak {r['peak_mb'] / first['peak_mb']:.2f}x{grown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--strategies", default="fedavg,ffa,median,trimmed_mean")
    parser.add_argument("--robust-max-clients", type=int, default=100)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skewed", action="store_true", help="one client claims 100x the records (the cap binds)")
    parser.add_argument("--pg-url", default=os.environ.get("FEDTUNE_TEST_DATABASE_URL", DEFAULT_PG_URL))
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        cell = json.loads(args.cell)
        with tempfile.TemporaryDirectory(prefix="fedtune-scale-store-") as tmp, \
                _store(cell["store"], Path(tmp), cell["pg_url"]) as url:
            rows = measure_cell(Path(cell["replies_dir"]), url=url, strategy=cell["strategy"], n=cell["n"],
                                rank=cell["rank"])
        print(json.dumps(rows))
        return
    sizes = sorted(int(x) for x in args.clients.split(","))
    strategies = args.strategies.split(",")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-clients-") as tmp:
        replies: dict[bool, Path] = {}
        adapters: dict[bool, dict[str, torch.Tensor]] = {}
        for ffa in sorted({s in FFA_STRATEGIES for s in strategies}):
            t = time.perf_counter()
            adapters[ffa] = initial_adapter(args.preset, args.rank, ffa)
            replies[ffa] = Path(tmp) / ("ffa" if ffa else "lora")
            write_replies(replies[ffa], adapters[ffa], sizes[-1], skewed=args.skewed)
            size = sum(t.numel() * t.element_size() for t in adapters[ffa].values())
            print(f"clients: {sizes[-1]} {'FFA' if ffa else 'plain-LoRA'} updates of {size / 1e6:.2f} MB signed for "
                  f"{ROUNDS} rounds in {time.perf_counter() - t:.0f} s", flush=True)
        for store in args.stores.split(","):
            for strategy in strategies:
                ffa = strategy in FFA_STRATEGIES
                for n in sizes:
                    if strategy in ROBUST and n > args.robust_max_clients:
                        rows.append({"store": store, "strategy": strategy, "clients": n,
                                     "bound_mb": robust_bound_mb(adapters[ffa], n)})
                        continue
                    for row in _run_cell(replies[ffa], store, strategy, n, args.rank, args.pg_url):
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    _print_table(rows)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
