"""Does DP-LoRA learn? Held-out loss of the base, a non-private run and a DP run on a small task.

    .venv/bin/python benchmarks/dp_learning.py [--epsilon 8] [--steps 40] [--records 1024]

The task: a bank memo ("memo: grocer 17 ->") maps to its category (" food"), a fixed table of
merchant -> category, so the completion depends on the prompt. The base is the random `tiny`
preset quantized to int4 (g32): it knows nothing, so what the adapters learn is the task itself.
Both runs use the same records, steps, batch and learning rate; the DP run is calibrated to
`--epsilon` at delta 1e-5 (RDP). Held-out loss is the mean per-record completion loss.
"""

from __future__ import annotations

import argparse
import random
import time

from fedtune.client_agent.data import Record, encode_records
from fedtune.client_agent.privacy import PrivacyConfig
from fedtune.client_agent.training import TrainConfig, mean_record_loss, train_dp_lora
from fedtune.model import DeepseekForCausalLM, init_weights
from fedtune.model.adapters import LoraSettings, attach_lora, detach_lora, load_adapter_state
from fedtune.model.config import PRESETS
from fedtune.model.quantize import quantize_model
from fedtune.model.tokenizer import ByteTokenizer

CATEGORIES = {"grocer": "food", "bakery": "food", "airline": "travel", "taxi": "travel", "landlord": "rent",
              "utility": "bills", "pharmacy": "health", "clinic": "health"}


def memo_records(n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    merchants = sorted(CATEGORIES)
    out = []
    for _ in range(n):
        m = rng.choice(merchants)
        out.append(Record(f"memo: {m} {rng.randrange(100)} ->", f" {CATEGORIES[m]}"))
    return out


def held_out_loss(base, state, settings: LoraSettings, records: list[Record], tok: ByteTokenizer) -> float:
    model = attach_lora(base, settings)
    try:
        if state is not None:
            load_adapter_state(model, state)
        return mean_record_loss(model, encode_records(records, tok, 32), tok.pad_token_id)
    finally:
        detach_lora(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()

    tok = ByteTokenizer()
    base = DeepseekForCausalLM(PRESETS["tiny"])
    init_weights(base, 0)
    base = quantize_model(base, "int4", 32)
    settings = LoraSettings(rank=4, alpha=8)
    train, held_out = memo_records(args.records, seed=1), memo_records(128, seed=2)
    train_cfg = TrainConfig(batch_size=64, physical_batch_size=64, steps=args.steps, max_len=32, lr=args.lr)

    rows = [("base (no adapter)", held_out_loss(base, None, settings, held_out, tok), "-", "-")]
    start = time.perf_counter()
    plain, _ = train_dp_lora(base, None, train, train_cfg, None, settings, tokenizer=tok)
    rows.append(("LoRA, non-private", held_out_loss(base, plain, settings, held_out, tok), "-",
                 f"{time.perf_counter() - start:.1f}"))
    start = time.perf_counter()
    private, report = train_dp_lora(base, None, train, train_cfg, PrivacyConfig(target_epsilon=args.epsilon),
                                    settings, tokenizer=tok)
    rows.append((f"DP-LoRA, epsilon {args.epsilon:g}", held_out_loss(base, private, settings, held_out, tok),
                 f"{report.epsilon:.3f} (sigma {report.noise_multiplier:.3f}, q {report.sample_rate:.4f})",
                 f"{time.perf_counter() - start:.1f}"))

    print(f"task: memo -> category, {len(train)} train / {len(held_out)} held-out records, {args.steps} steps of "
          f"batch {train_cfg.batch_size}, lr {args.lr}, tiny preset int4-g32 base (random weights)")
    print(f"{'run':<24}{'held-out loss':>14}  {'epsilon spent':<40}{'seconds':>8}")
    for name, loss, eps, secs in rows:
        print(f"{name:<24}{loss:>14.4f}  {eps:<40}{secs:>8}")


if __name__ == "__main__":
    main()
