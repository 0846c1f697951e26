"""The training loops behind `train_dp_lora`: the per-record loss, DP-SGD steps with Opacus (Poisson
batches split into physical micro-batches, clipping, noise, accountant) and the non-private baseline."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from fedtune.client_agent.data import IGNORE_INDEX, EncodedRecord, PaddedBatch, padding_collate
from fedtune.client_agent.dp_modules import noise_only_step, wrap_for_dp
from fedtune.client_agent.privacy import (
    PoissonBatchSampler,
    PrivacyConfig,
    PrivacyPlan,
    SeededRandom,
    SourcedDPOptimizer,
    SourcedGhostDPOptimizer,
    random_source,
)

if TYPE_CHECKING:
    from fedtune.client_agent.training import TrainConfig

ProgressFn = Callable[[int, int, float | None], None]  # (step done, total steps, mean loss of the step or None)

# DP runs use the kernels' reference path: the CPU fast path switches to bf16 packed matmuls for
# slices of at most 32 rows, so a record's computed gradient (even its routing) would depend on
# how many other tokens share its batch or expert slice. The reference path's numerics do not
# depend on the batch (a non-private step costs 1.10-1.15x with it on `small`, benchmarks/dp_train.py).
DP_KERNELS = "reference"


def batch_to(batch: PaddedBatch, device: torch.device) -> PaddedBatch:
    return PaddedBatch(*(t.to(device) for t in batch))


def per_record_loss(model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """[n]: each record's mean next-token cross-entropy over its completion tokens (and eos).

    No attention mask is passed: padding is on the right and attention is causal, so no real
    position ever attends to padding, and padded positions carry no label.
    """
    logits = model(input_ids=batch.input_ids).logits  # [n, T, V]
    targets = batch.labels[:, 1:]  # [n, T-1]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                         reduction="none")  # [n, T-1]
    return ce.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


@torch.no_grad()
def mean_record_loss(model: nn.Module, encoded: list[EncodedRecord], pad_token_id: int, batch_size: int = 16) -> float:
    """Mean over records of `per_record_loss` (evaluation; the model is put in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = batch_to(padding_collate(pad_token_id)(encoded[start:start + batch_size]), device)
        total += float(per_record_loss(model, batch).sum())
    return total / len(encoded)


class LossTracker:
    """Mean per-record loss of each logical step (None for an empty Poisson batch), and progress."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total, self.progress = total, progress
        self.curve: list[float | None] = []
        self.empty = 0
        self._sum, self._count = 0.0, 0

    def add(self, losses: torch.Tensor) -> None:
        self._sum += float(losses.detach().sum())
        self._count += losses.shape[0]

    def end_step(self) -> None:
        loss = self._sum / self._count if self._count else None
        self.empty += self._count == 0
        self.curve.append(loss)
        self._sum, self._count = 0.0, 0
        if self.progress is not None:
            self.progress(len(self.curve), self.total, loss)


def _loader(encoded: list[EncodedRecord], sampler: PoissonBatchSampler, pad_token_id: int) -> DataLoader:
    return DataLoader(encoded, batch_sampler=sampler, collate_fn=padding_collate(pad_token_id))


def train_private(model: nn.Module, encoded: list[EncodedRecord], plan: PrivacyPlan, privacy_cfg: PrivacyConfig,
                   train_cfg: TrainConfig, pad_token_id: int, tracker: LossTracker) -> float:
    """DP-SGD: Poisson batches, per-record clipping, Gaussian noise, accountant. Returns the epsilon spent."""
    mode, source = privacy_cfg.grad_sample_mode, random_source(privacy_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    module = wrap_for_dp(model, mode, plan.max_grad_norm)
    optimizer_cls = SourcedGhostDPOptimizer if mode == "ghost" else SourcedDPOptimizer
    optimizer = optimizer_cls(train_cfg.make_optimizer(params), noise_source=source,
                              noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                              expected_batch_size=train_cfg.batch_size, loss_reduction="mean")
    accountant = create_accountant(mechanism=plan.accountant)
    account = accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate)

    def on_step(opt) -> None:  # called once per logical step, after noising (empty batches included)
        account(opt)
        tracker.end_step()

    optimizer.attach_step_hook(on_step)
    loader = _loader(encoded, PoissonBatchSampler(len(encoded), plan.sample_rate, plan.steps, source), pad_token_id)
    try:
        _run_dp_steps(module, optimizer, params, loader, mode, train_cfg, tracker)
    finally:
        module.cleanup()
    if len(tracker.curve) != plan.steps:
        raise RuntimeError(f"internal error: {len(tracker.curve)} optimizer steps taken, {plan.steps} planned")
    return float(accountant.get_epsilon(delta=plan.delta))


def _run_dp_steps(module: nn.Module, optimizer: SourcedDPOptimizer, params: list[nn.Parameter], loader: DataLoader,
                  mode: str, train_cfg: TrainConfig, tracker: LossTracker) -> None:
    """Every logical Poisson batch, split into physical micro-batches by Opacus' BatchMemoryManager."""
    device = torch.device(train_cfg.device)
    with warnings.catch_warnings(), BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=train_cfg.physical_batch_size, optimizer=optimizer) as batches:
        # Opacus' full backward hooks on the first adapters (whose inputs need no gradient) warn every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for batch in batches:
            if len(batch) == 0:
                noise_only_step(params, mode)  # the step (and its noise) is part of what was accounted
            else:
                losses = per_record_loss(module, batch_to(batch, device))  # [n]
                tracker.add(losses)
                if mode == "ghost":
                    DPTensorFastGradientClipping(module, optimizer, losses, "mean").backward()
                else:
                    losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()


def train_plain(model: nn.Module, encoded: list[EncodedRecord], train_cfg: TrainConfig, steps: int,
                 pad_token_id: int, tracker: LossTracker) -> None:
    """The non-private baseline: the same sampling, loss and scaling, without clipping or noise."""
    device = torch.device(train_cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train_cfg.make_optimizer(params)
    collate = padding_collate(pad_token_id)
    # No privacy to protect here: the sampling follows the run's seed, for reproducible baselines.
    rate = train_cfg.sample_rate(len(encoded))
    sampler = PoissonBatchSampler(len(encoded), rate, steps, SeededRandom(train_cfg.seed))
    for indices in sampler:
        for start in range(0, len(indices), train_cfg.physical_batch_size):
            batch = batch_to(collate([encoded[i] for i in indices[start:start + train_cfg.physical_batch_size]]),
                              device)
            losses = per_record_loss(model, batch)
            tracker.add(losses)
            (losses.sum() / train_cfg.batch_size).backward()
        if indices:
            optimizer.step()
            optimizer.zero_grad()
        tracker.end_step()
