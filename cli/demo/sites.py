"""The demo's institutions and their private data.

Two banks (transaction memo -> spending category; the same task, different customers: each bank
sees its own mix of merchants) and a hospital (triage note -> triage level). Every record is
drawn from a fixed table, so the completion depends on the prompt; the number in each prompt
(a memo reference, a patient's age) is noise, so the held-out records are not the training ones.
The key phrase sits at the end of the prompt, right before the answer.

Each site's files are written only under its own directory: ``data/train.jsonl`` (what the
agent trains on) and ``data/heldout.jsonl`` (what the site evaluates on; never sent anywhere).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MERCHANT_CATEGORY = {"grocer": "food", "bakery": "food", "airline": "travel", "taxi": "travel",
                     "landlord": "rent", "power co": "bills", "pharmacy": "health", "dentist": "health"}
SYMPTOM_TRIAGE = {"chest pain": "urgent", "stroke": "urgent", "fractured arm": "soon", "high fever": "soon",
                  "deep cut": "soon", "mild rash": "routine", "checkup": "routine", "dry cough": "routine"}


@dataclass(frozen=True)
class Site:
    """One institution: its client id, what it is, and how its records are drawn."""

    client_id: str
    org: str
    name: str
    task: str
    table: dict[str, str]
    prompt: str  # format with {n} (noise) and {key}
    weights: tuple[float, ...] | None = None  # over sorted(table): this site's own mix

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.table.values()))

    def records(self, n: int, seed: int) -> list[dict[str, str]]:
        rng = random.Random(seed)
        keys = sorted(self.table)
        out = []
        for _ in range(n):
            key = rng.choices(keys, weights=self.weights)[0]
            out.append({"prompt": self.prompt.format(n=rng.randrange(1000), key=key),
                        "completion": f" {self.table[key]}"})
        return out


_TEMPLATES = (
    ("bank", "Bank", "transaction memo -> spending category", MERCHANT_CATEGORY, "memo {n}: {key}"),
    ("bank", "Bank", "transaction memo -> spending category", MERCHANT_CATEGORY, "memo {n}: {key}"),
    ("hospital", "Hospital", "triage note -> triage level", SYMPTOM_TRIAGE, "note, age {n}: {key}"),
)


def demo_sites(count: int) -> list[Site]:
    """``count`` institutions: bank-a, bank-b, hospital-c, then the same kinds again (bank-d, ...).

    Each bank weighs a different pair of merchants three times as often as the rest.
    """
    if not 2 <= count <= 8:
        raise ValueError(f"--clients must be between 2 and 8 (a federation needs two sites), got {count}")
    sites = []
    for i in range(count):
        kind, title, task, table, prompt = _TEMPLATES[i % len(_TEMPLATES)]
        letter = "abcdefgh"[i]
        weights = None
        if kind == "bank":
            weights = tuple(3.0 if j in (2 * i % 8, (2 * i + 1) % 8) else 1.0 for j in range(len(table)))
        sites.append(Site(f"{kind}-{letter}", f"org-{letter}", f"{title} {letter.upper()}", task, table, prompt,
                          weights))
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
