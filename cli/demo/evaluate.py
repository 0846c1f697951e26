"""Held-out metrics of a site: what each institution measures on its own held-out split.

* loss: mean over records of the completion's next-token cross-entropy (nats per token, the
  training objective; lower is better);
* accuracy: the label the model finds most likely among the site's labels (total log-likelihood
  of " <label>" + eos after the prompt) is the true one.

In the demo one process plays every site's evaluator; nothing here leaves a site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.cli.demo.sites import Site
from fedtune.client_agent.data import IGNORE_INDEX, Record, encode_records, load_records, padding_collate
from fedtune.client_agent.training_loops import per_record_loss
from fedtune.model.adapters import detach_lora, load_adapter

MAX_LEN = 48


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float


@torch.no_grad()
def _scores(model: torch.nn.Module, records: list[Record], tokenizer, batch_size: int = 64) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """Per record: mean completion loss, and total completion negative log-likelihood."""
    model.eval()
    encoded = encode_records(records, tokenizer, MAX_LEN)
    means, totals = [], []
    for start in range(0, len(encoded), batch_size):
        batch = padding_collate(tokenizer.pad_token_id)(encoded[start:start + batch_size])
        mean = per_record_loss(model, batch)
        count = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1)
        means.append(mean)
        totals.append(mean * count)
    return torch.cat(means), torch.cat(totals)


def evaluate_records(model: torch.nn.Module, tokenizer, records: list[Record], labels: list[str]) -> Metrics:
    """Held-out loss and accuracy of ``model`` (the base, or a base with adapters attached) on ``records``,
    whose completions are " <label>" for one of ``labels``."""
    loss, _ = _scores(model, records, tokenizer)
    candidates = [Record(r.prompt, f" {label}") for r in records for label in labels]
    _, nll = _scores(model, candidates, tokenizer)
    predicted = nll.view(len(records), len(labels)).argmin(1)  # [records]
    truth = torch.tensor([labels.index(r.completion.strip()) for r in records])
    return Metrics(float(loss.mean()), float((predicted == truth).float().mean()))


def evaluate(base: torch.nn.Module, tokenizer, site: Site, heldout: Path, adapter: Path | None = None) -> Metrics:
    """The site's held-out loss and accuracy of ``base`` with the peft adapter in ``adapter`` (None: the base)."""
    records = load_records(heldout)
    model = load_adapter(base, adapter) if adapter is not None else base
    try:
        return evaluate_records(model, tokenizer, records, site.labels)
    finally:
        if adapter is not None:
            detach_lora(model)
