"""Jobs as operators see them: the bases the coordinator knows, job creation with its version 0,
and the job life cycle (start, pause, resume, abort) as state changes in the store.

The store is the source of truth: these functions only change a job's ``status``; the job
supervisor (``supervisor.py``) starts a Flower run for every ``running`` job that has none, and
the round engine stops after the round in flight when a job is paused, and discards it when the
job is aborted.

Life cycle::

    created --start--> running --pause--> paused --resume--> running
    created | running | paused --abort--> aborted        running --(engine)--> completed | failed
"""

from __future__ import annotations

import io
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session

from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version
from fedtune.coordinator.store import Job

TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    # action: (statuses it applies to, status it sets)
    "start": (("created",), "running"),
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "abort": (("created", "running", "paused"), "aborted"),
}


class JobStateError(ValueError):
    """A life-cycle action that does not apply to the job's current status."""


class UnknownBaseError(LookupError):
    """A base digest the coordinator has no checkpoint for."""


@dataclass
class BaseCatalog:
    """The frozen bases this coordinator holds, by checkpoint digest. The coordinator needs a base's
    shapes to create a job's version 0 and to export adapters in peft's format; each base is
    loaded once, on first use, and shared (under a lock: attaching LoRA changes the module)."""

    paths: dict[str, Path] = field(default_factory=dict)
    _models: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_paths(cls, paths: list[Path]) -> BaseCatalog:
        from fedtune.model.safetensors_index import checkpoint_digest, read_index

        return cls({checkpoint_digest(read_index(Path(p))): Path(p) for p in paths})

    def check(self, digest: str) -> None:
        """Raise UnknownBaseError unless ``digest`` names a base here."""
        if digest not in self.paths:
            raise UnknownBaseError(f"base digest {digest} is not one of this coordinator's bases "
                                   f"({', '.join(self.paths) or 'none configured: start it with --base PATH'})")

    def _model(self, digest: str) -> torch.nn.Module:
        self.check(digest)
        if digest not in self._models:
            from fedtune.model import load_pretrained

            self._models[digest] = load_pretrained(self.paths[digest]).eval()
        return self._models[digest]

    def initial_adapter(self, digest: str, lora: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Version 0 of an adapter on this base: A from the job's seed, B = 0 (FFA: B only)."""
        from fedtune.model.adapters import LoraSettings, initial_adapter_state

        with self._lock:
            return initial_adapter_state(self._model(digest), LoraSettings.from_json(dict(lora)))

    def peft_archive(self, digest: str, lora: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
        """A zip of the adapter in peft's format (adapter_model.safetensors with A and B,
        adapter_config.json, fedtune_lora.json), loadable with ``peft.PeftModel.from_pretrained``."""
        from fedtune.model.adapters import LoraSettings, attach_lora, detach_lora, load_adapter_state, save_adapter

        with self._lock, tempfile.TemporaryDirectory() as tmp:
            model = attach_lora(self._model(digest), LoraSettings.from_json(dict(lora)))
            try:
                with torch.no_grad():
                    load_adapter_state(model, dict(tensors))
                save_adapter(model, tmp)
            finally:
                detach_lora(model)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for path in sorted(Path(tmp).iterdir()):
                    z.write(path, path.name)
            return buf.getvalue()


def create_job(ctx: CoordinatorContext, catalog: BaseCatalog, *, job_id: str, base_digest: str,
               config: dict[str, Any], also: Callable[[Session], None] | None = None) -> None:
    """Create a job and its version 0 in one transaction (``also`` runs inside it: the API's audit
    record). Raises UnknownBaseError, or RoundEngineError when the job id exists."""
    tensors = catalog.initial_adapter(base_digest, config["train"]["lora"])
    create_initial_version(ctx, job_id, tensors, also=also,
                           new_job=Job(id=job_id, base_digest=base_digest, config=config, status="created"))


def change_job_status(session: Session, job: Job, action: str) -> str:
    """Apply a life-cycle action to ``job`` (in the caller's transaction); returns the old status.

    Raises:
        JobStateError: the action does not apply to the job's status (the message says which do).
    """
    sources, target = TRANSITIONS[action]
    if job.status not in sources:
        raise JobStateError(f"cannot {action} job {job.id!r}: it is {job.status}; {action} applies to a job that is "
                            f"{' or '.join(sources)}")
    old = job.status
    job.status = target
    if target == "aborted":
        job.finished_at = datetime.now(UTC)
    return old
