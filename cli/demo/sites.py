"""The demo's institutions and their private data.

Hospitals that share one task, triage (a triage note -> its triage level, 1 immediate, 2 urgent,
3 routine), each with its own case mix and only a few hundred notes: a trauma centre sees mostly
level 1 and 2, a community clinic mostly level 3. Optionally a bank with a task of its own
(a transaction memo -> its spending category), to show what federation does for a site whose
task nobody else has.

Every record is drawn from a fixed table, so the completion depends on the prompt; the number in
each prompt (a patient's age, a memo reference) is noise, so the held-out records are not the
training ones. The key phrase sits at the end of the prompt, right before the answer, and every
answer of a task has the same number of tokens (one digit, one four-letter word), so that no
answer is favoured by its length when the held-out accuracy compares their likelihoods.

A site draws a label from its own mix, then a key phrase with that label uniformly. Each site's
files are written only under its own directory: ``data/train.jsonl`` (what the agent trains on)
and ``data/heldout.jsonl`` (what the site evaluates on: drawn from the same case mix; never sent
anywhere).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TRIAGE_LEVEL = {"chest pain": "1", "stroke": "1", "fractured arm": "2", "high fever": "2", "deep cut": "2",
                "mild rash": "3", "checkup": "3", "dry cough": "3"}
MERCHANT_CATEGORY = {"grocer": "food", "bakery": "food", "airline": "trip", "taxi": "trip", "landlord": "rent",
                     "power co": "bill", "pharmacy": "meds", "dentist": "meds"}
TRIAGE_TASK = "triage note -> triage level"
TRIAGE_PROMPT = "note, age {n}: {key}"

# Case mixes over triage levels (1, 2, 3), one per hospital in turn.
CASE_MIXES = (
    ("trauma centre", (0.5, 0.35, 0.15)),
    ("general hospital", (0.2, 0.45, 0.35)),
    ("community clinic", (0.1, 0.25, 0.65)),
)


@dataclass(frozen=True)
class Site:
    """One institution: its client id, what it is, its task and how its records are drawn.

    Attributes:
        table: key phrase -> label (the task).
        prompt: format with ``{n}`` (noise) and ``{key}``.
        label_mix: this site's weights over ``labels`` (sorted); None: every key equally often.
        shares_task: whether other sites of the demo have the same task.
    """

    client_id: str
    org: str
    name: str
    task: str
    table: dict[str, str]
    prompt: str
    label_mix: tuple[float, ...] | None = None
    shares_task: bool = True

    def __post_init__(self) -> None:
        if self.label_mix is not None and (len(self.label_mix) != len(self.labels) or min(self.label_mix) < 0
                                           or not sum(self.label_mix) > 0):
            raise ValueError(f"{self.client_id}: label_mix {self.label_mix} must give a weight >= 0 to each of "
                             f"{self.labels} (and not all 0)")

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.table.values()))

    def label_shares(self) -> dict[str, float]:
        """The probability of each label in this site's records."""
        if self.label_mix is None:
            counts = {label: sum(v == label for v in self.table.values()) for label in self.labels}
            return {label: c / len(self.table) for label, c in counts.items()}
        total = sum(self.label_mix)
        return {label: w / total for label, w in zip(self.labels, self.label_mix, strict=True)}

    def records(self, n: int, seed: int) -> list[dict[str, str]]:
        rng = random.Random(seed)
        keys_of = {label: sorted(k for k, v in self.table.items() if v == label) for label in self.labels}
        shares = self.label_shares()
        out = []
        for _ in range(n):
            label = rng.choices(self.labels, weights=[shares[label] for label in self.labels])[0]
            key = rng.choice(keys_of[label])
            out.append({"prompt": self.prompt.format(n=rng.randrange(1000), key=key), "completion": f" {label}"})
        return out


def hospital(letter: str, label_mix: Sequence[float], kind: str = "hospital") -> Site:
    """A hospital that triages with the shared table, with its own case mix."""
    return Site(f"hospital-{letter}", f"org-{letter}", f"Hospital {letter.upper()} ({kind})", TRIAGE_TASK,
                TRIAGE_LEVEL, TRIAGE_PROMPT, tuple(label_mix))


def demo_sites(hospitals: int, own_task_site: bool = True) -> list[Site]:
    """``hospitals`` hospitals sharing the triage task (case mixes from :data:`CASE_MIXES` in turn),
    then, with ``own_task_site``, a bank whose task no other site has.

    Raises:
        ValueError: fewer than 2 or more than 8 hospitals.
    """
    if not 2 <= hospitals <= 8:
        raise ValueError(f"--clients must be between 2 and 8 hospitals (a shared task needs two), got {hospitals}")
    sites = []
    for i in range(hospitals):
        kind, mix = CASE_MIXES[i % len(CASE_MIXES)]
        sites.append(hospital("abcdefgh"[i], mix, kind))
    if own_task_site:
        letter = "abcdefghi"[hospitals]
        sites.append(Site(f"bank-{letter}", f"org-{letter}", f"Bank {letter.upper()}",
                          "transaction memo -> spending category", MERCHANT_CATEGORY, "memo {n}: {key}",
                          shares_task=False))
    return sites


def write_site_data(site: Site, directory: Path, *, records: int, heldout: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``directory`` (the site's own)."""
    directory.mkdir(parents=True, exist_ok=True)
    base_seed = seed * 1000 + sum(site.client_id.encode())
    paths = []
    for name, n, s in (("train", records, base_seed), ("heldout", heldout, base_seed + 7919)):
        path = directory / f"{name}.jsonl"
        with open(path, "w") as f:
            for record in site.records(n, s):
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]
