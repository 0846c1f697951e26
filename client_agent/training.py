"""DP-LoRA training on the frozen base: `train_dp_lora`, the one function the agent's CLI and Flower
client call. Privacy unit: one record (docs/dp_lora.md).

Before training, `plan_training(len(records), train_cfg, privacy_cfg)` fixes the sample rate, the
steps, the noise multiplier and the epsilon the run will spend; a ledger checks that against the
lifetime budget and passes the same plan to `train_dp_lora`, whose report then states exactly that
epsilon (re-read from the accountant after the last step).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtune.client_agent.data import Record, encode_records
from fedtune.client_agent.privacy import PrivacyConfig, PrivacyError, PrivacyPlan, epsilon_for, plan_privacy
from fedtune.client_agent.training_loops import (
    DP_KERNELS,
    LossTracker,
    ProgressFn,
    mean_record_loss,
    per_record_loss,
    train_plain,
    train_private,
)
from fedtune.kernels import use_implementation
from fedtune.model.adapters import (
    LoraSettings,
    adapter_state_dict,
    attach_lora,
    check_private_trainables,
    detach_lora,
    load_adapter_state,
)
from fedtune.model.tokenizer import ByteTokenizer, TextTokenizer

__all__ = ["DP_KERNELS", "PrivacyPlan", "ProgressFn", "TrainConfig", "TrainReport", "mean_record_loss",
           "per_record_loss", "plan_training", "train_dp_lora"]

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train. Give `steps` or `epochs` (default: 1 epoch = ceil(1 / sample_rate) steps).

    Attributes:
        batch_size: expected (logical) batch size; Poisson sampling rate = batch_size / len(records).
        physical_batch_size: most records in one forward/backward (memory); a logical batch is
            split into micro-batches and makes one optimizer step.
        lr: the optimizer's learning rate. max_len: tokens per record (longer records are cut, data.py).
        optimizer: ``adamw`` (the default) or ``sgd``. AdamW scales every coordinate by its own running
            size, which under DP noise turns each site's update into mostly normalised noise; plain SGD
            (with ``momentum``) keeps the update linear in the noisy gradients, so the coordinator's average
            cancels the sites' noise the way one pooled batch would. Federated jobs with a server optimizer
            (``fedadam``, ``fedavgm``: Reddi et al., ICLR 2021) are built for SGD at the clients. Either one
            only post-processes the DP-noised gradients: privacy is the same.
        momentum: SGD momentum in [0, 1) (``sgd`` only), restarted with every run.
        seed: model-side randomness (LoRA dropout); DP sampling and noise never derive from it.
        device: where the base and the adapters train.
    """

    batch_size: int = 16
    physical_batch_size: int = 16
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    max_len: int = 256
    seed: int = 0
    device: str = "cpu"
    optimizer: str = "adamw"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "epochs", 1.0)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.physical_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={self.batch_size}, "
                             f"physical_batch_size={self.physical_batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum {self.momentum} is for optimizer 'sgd'; {self.optimizer!r} keeps its own")

    def make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """This run's optimizer over ``params`` (DP training wraps it in Opacus' DPOptimizer)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def sample_rate(self, num_records: int) -> float:
        """Poisson sampling rate q = batch_size / num_records.

        Raises:
            ValueError: fewer records than the expected batch size.
        """
        if num_records < self.batch_size:
            raise ValueError(f"{num_records} records cannot fill the expected batch of {self.batch_size}: give more "
                             f"records or a smaller batch_size")
        return self.batch_size / num_records

    def planned_steps(self, num_records: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs / self.sample_rate(num_records)))


def plan_training(num_records: int, train_cfg: TrainConfig, privacy_cfg: PrivacyConfig | None) -> PrivacyPlan | None:
    """What a run over `num_records` records would spend, before touching them (None: no DP).

    This is the number a lifetime-budget ledger checks; pass the plan on to `train_dp_lora`.

    Raises:
        ValueError: too few records for the batch; PrivacyError: the target cannot be met.
    """
    if privacy_cfg is None or not privacy_cfg.enabled:
        return None
    return plan_privacy(privacy_cfg, sample_rate=train_cfg.sample_rate(num_records),
                        steps=train_cfg.planned_steps(num_records))


@dataclass
class TrainReport:
    """What a run did. `loss_curve` is computed from the raw records without DP: it stays on the agent
    (`to_dict(include_local=False)` leaves it out); everything else is DP-safe to share."""

    private: bool
    steps: int
    sample_rate: float
    expected_batch_size: int
    num_records: int
    seconds: float
    trainable_parameters: list[str]
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    grad_sample_mode: str | None = None
    secure_mode: bool = False
    empty_batches: int = 0
    loss_curve: list[float | None] = field(default_factory=list)

    def to_dict(self, include_local: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not include_local:
            del data["loss_curve"]
        return data


def _default_tokenizer(base: nn.Module) -> TextTokenizer:
    tok, config = ByteTokenizer(), base.config
    if (config.bos_token_id, config.eos_token_id) != (tok.bos_token_id, tok.eos_token_id):
        raise ValueError("this base model does not use the byte-level tokenizer; pass tokenizer= "
                         "(fedtune.model.tokenizer.load_tokenizer(checkpoint_dir))")
    return tok


def train_dp_lora(
    base: nn.Module,
    adapter_state: dict[str, torch.Tensor] | None,
    records: list[Record],
    train_cfg: TrainConfig,
    privacy_cfg: PrivacyConfig | None,
    lora_settings: LoraSettings | None = None,
    *,
    tokenizer: TextTokenizer | None = None,
    plan: PrivacyPlan | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], TrainReport]:
    """Fine-tune LoRA adapters on `records` with record-level DP-SGD; the base stays frozen and unchanged.

    Args:
        base: the frozen base (float or quantized), kept across calls: adapters are attached for
            this run and removed afterwards, whatever happens.
        adapter_state: starting adapter tensors (`adapter_state_dict` names; FFA: B only), or None
            for a fresh adapter (A from `lora_settings.seed`, B = 0).
        records: the local data; one record = one privacy unit.
        train_cfg, privacy_cfg: see TrainConfig / PrivacyConfig; privacy_cfg None or
            `enabled=False` trains without DP (baselines).
        lora_settings: targets, rank, expert LoRA, FFA, seed (the job's); default LoraSettings().
        tokenizer: the base's tokenizer; default the byte-level one (checked against the config).
        plan: the `plan_training` result the caller checked against its budget; recomputed when None.
        progress: called after every optimizer step.
    Returns:
        (adapter state after training, report). Nothing is returned on error.
    Raises:
        ValueError / DataError: bad config or records; PrivacyError: the target cannot be met, or
        `plan` does not match this run; LoraError / ExpertLoraError: adapters that cannot be trained
        privately.
    """
    if not records:
        raise ValueError("no records to train on")
    lora_settings = lora_settings or LoraSettings()
    tokenizer = tokenizer or _default_tokenizer(base)
    encoded = encode_records(records, tokenizer, train_cfg.max_len)
    private = privacy_cfg is not None and privacy_cfg.enabled
    if plan is not None and not private:
        raise PrivacyError("a privacy plan was given for a run without DP")
    expected = plan_training(len(records), train_cfg, privacy_cfg) if plan is None else plan
    if plan is not None:
        _check_plan(plan, len(records), train_cfg, privacy_cfg)
    steps = expected.steps if private else train_cfg.planned_steps(len(records))
    pad_token_id = tokenizer.pad_token_id
    tracker = LossTracker(steps, progress)
    model = attach_lora(base, lora_settings, device=train_cfg.device)
    devices = [torch.device(train_cfg.device)] if torch.device(train_cfg.device).type == "cuda" else []
    try:
        if adapter_state is not None:
            load_adapter_state(model, adapter_state)
        trainable = check_private_trainables(model)
        model.train()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(train_cfg.seed)
            if private:
                with use_implementation(DP_KERNELS):
                    epsilon = train_private(model, encoded, expected, privacy_cfg, train_cfg, pad_token_id, tracker)
            else:
                train_plain(model, encoded, train_cfg, steps, pad_token_id, tracker)
        seconds = time.perf_counter() - start
        state = adapter_state_dict(model)
    finally:
        model.eval()
        detach_lora(model)
    if any(not bool(torch.isfinite(t).all()) for t in state.values()):
        raise FloatingPointError("training produced non-finite adapter values; lower lr or max_grad_norm")
    report = TrainReport(private=private, steps=steps, sample_rate=train_cfg.sample_rate(len(records)),
                         expected_batch_size=train_cfg.batch_size, num_records=len(records), seconds=seconds,
                         trainable_parameters=[n.removeprefix("base_model.model.") for n in trainable],
                         empty_batches=tracker.empty, loss_curve=tracker.curve)
    if private:
        if epsilon > expected.target_epsilon or not math.isclose(epsilon, expected.epsilon, rel_tol=1e-6):
            raise PrivacyError(f"internal error: the accountant reports epsilon={epsilon}, the plan said "
                               f"{expected.epsilon} (target {expected.target_epsilon})")
        report = dataclasses.replace(
            report, epsilon=epsilon, delta=expected.delta, target_epsilon=expected.target_epsilon,
            noise_multiplier=expected.noise_multiplier, max_grad_norm=expected.max_grad_norm,
            accountant=expected.accountant, grad_sample_mode=privacy_cfg.grad_sample_mode,
            secure_mode=privacy_cfg.secure_mode)
    return state, report


def _check_plan(plan: PrivacyPlan, num_records: int, train_cfg: TrainConfig, cfg: PrivacyConfig) -> None:
    want = {"sample_rate": train_cfg.sample_rate(num_records), "steps": train_cfg.planned_steps(num_records),
            "delta": cfg.delta, "accountant": cfg.accountant, "max_grad_norm": cfg.max_grad_norm,
            "target_epsilon": cfg.target_epsilon}
    if cfg.noise_multiplier is not None:
        want["noise_multiplier"] = cfg.noise_multiplier
    wrong = {k: (getattr(plan, k), v) for k, v in want.items() if getattr(plan, k) != v}
    if wrong:
        raise PrivacyError(f"the given plan does not match this run (plan, run): {wrong}; plan it with plan_training")
    epsilon = epsilon_for(plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta, plan.accountant)
    if not math.isclose(epsilon, plan.epsilon, rel_tol=1e-6) or plan.epsilon > plan.target_epsilon:
        raise PrivacyError(f"the plan says epsilon={plan.epsilon} (target {plan.target_epsilon}); its (q, sigma, "
                           f"steps) spend {epsilon}")
