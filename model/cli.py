"""`fedtune model ...`: make, inspect and try base-model checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtune.kernels.schemes import SCHEMES, QuantizationError
from fedtune.model.checkpoint import load_pretrained, read_config, read_quantization, save_pretrained
from fedtune.model.config import PRESETS, ModelConfig
from fedtune.model.convert import convert_checkpoint
from fedtune.model.model import DeepseekForCausalLM, init_weights
from fedtune.model.quantize import QuantizationConfig
from fedtune.model.safetensors_index import CheckpointError, checkpoint_digest, read_index
from fedtune.model.tokenizer import load_tokenizer

app = typer.Typer(
    help="Base-model checkpoints: create, convert (quantize), inspect, generate.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters active per token) of a config, computed from a meta model."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    idle_experts = config.n_routed_experts - config.num_experts_per_tok
    active = total - idle_experts * config.expert_parameters * config.num_moe_layers
    return total, active


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


@app.command("init-tiny")
def init_tiny(
    out: Annotated[Path, typer.Argument(help="Directory to write config.json and model.safetensors into.")],
    preset: Annotated[str, typer.Option(help=f"Size preset: {', '.join(PRESETS)}.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    init_std: Annotated[float | None, typer.Option(
        help="Standard deviation of the random weights (the config's initializer_range; default: the preset's "
             "0.02). The demo uses 0.1: at 0.02 the output head's logits of a 64-wide model stay within about "
             "+-1.3, so no adapter can make the model confident.")] = None,
) -> None:
    """Write a random DeepSeek-V3-format checkpoint (for tests, benchmarks and the demo)."""
    if preset not in PRESETS:
        raise _fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if init_std is not None and not 0 < init_std <= 1:
        raise _fail(f"--init-std must be in (0, 1], got {init_std}")
    if (out / "config.json").exists():
        raise _fail(f"{out} already holds a checkpoint; choose an empty directory or delete it first")
    config = PRESETS[preset] if init_std is None else dataclasses.replace(PRESETS[preset], initializer_range=init_std)
    model = DeepseekForCausalLM(config)
    init_weights(model, seed)
    save_pretrained(model, out)
    console.print(f"wrote {preset} checkpoint to {out}")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Architecture, parameter counts, quantization, size on disk (and its ratio to bf16), and the digest jobs pin."""
    try:
        config = read_config(path)
        quantization = read_quantization(path)
        entries = read_index(path)
        digest = checkpoint_digest(entries)
    except CheckpointError as e:
        raise _fail(str(e)) from e
    total, active = parameter_counts(config)
    on_disk = sum(f.stat().st_size for f in {e.file for e in entries.values()})
    bf16_bytes = 2 * total  # the same architecture with every parameter in bf16
    if as_json:
        print(json.dumps({"model_type": config.model_type, "parameters": total, "active_parameters": active,
                          "tensors": len(entries), "quantization": quantization and quantization.to_json(),
                          "bytes_on_disk": on_disk, "bf16_bytes": bf16_bytes,
                          "ratio_to_bf16": round(on_disk / bf16_bytes, 4), "digest": f"sha256:{digest}"}))
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    rows = [
        ("architecture", f"{config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                         f"{config.num_attention_heads} heads (MLA, kv rank {config.kv_lora_rank}, "
                         f"q rank {config.q_lora_rank or 'none'})"),
        ("experts", f"{config.n_routed_experts} routed (top {config.num_experts_per_tok}, {config.n_group} groups), "
                    f"{config.n_shared_experts} shared, first {config.first_k_dense_replace} layers dense"),
        ("rope", f"{config.rope.rope_type}, theta {config.rope.theta:g}"
                 + (f", factor {config.rope.factor:g}" if config.rope.rope_type == "yarn" else "")),
        ("parameters", f"{total:,} total, {active:,} active per token"),
        ("quantization", _describe(quantization)),
        ("tensors", f"{len(entries)} in {len({e.file for e in entries.values()})} file(s)"),
        ("bytes on disk", f"{on_disk:,} ({on_disk / bf16_bytes:.3f}x the {bf16_bytes:,} bytes of this "
                          f"architecture in bf16)"),
        ("digest", f"sha256:{digest}"),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


def _describe(quantization: QuantizationConfig | None) -> str:
    if quantization is None:
        return "none (float checkpoint)"
    group = f", group size {quantization.group_size}" if quantization.group_size else ""
    head = "quantized" if quantization.quantize_lm_head else "kept float"
    return (f"{quantization.scheme}{group}; lm_head {head}; embeddings, norms and routers kept float "
            f"(format {quantization.format_version})")


@app.command()
def convert(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face DeepSeek-V2/V3 checkpoint (bf16, fp32 or FP8).")],
    out: Annotated[Path, typer.Argument(help="Directory to write the quantized checkpoint into (must be empty).")],
    quant: Annotated[str, typer.Option("--quant", help=f"Scheme: {'|'.join(SCHEMES)}.")],
    group_size: Annotated[int, typer.Option(help="int4 group size along K: 32, 64 or 128 (0: default 128).")] = 0,
    quantize_lm_head: Annotated[bool, typer.Option("--quantize-lm-head", help="Also quantize lm_head.")] = False,
) -> None:
    """Quantize a checkpoint, streaming one layer at a time; writes config.json, shards and manifest.json."""
    try:
        manifest = convert_checkpoint(hf_dir, out, quant, group_size, quantize_lm_head=quantize_lm_head)
    except (CheckpointError, QuantizationError) as e:
        raise _fail(str(e)) from e
    console.print(f"wrote {manifest['scheme']} checkpoint to {out}")
    console.print(f"source digest {manifest['source_digest']}", highlight=False, soft_wrap=True)
    console.print(f"digest        {manifest['digest']}", highlight=False, soft_wrap=True)


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "Hello",
    max_new_tokens: Annotated[int, typer.Option(min=0, help="How many tokens to generate.")] = 16,
) -> None:
    """Greedy generation with the latent KV cache (a smoke test of a checkpoint)."""
    try:
        model = load_pretrained(path)
    except CheckpointError as e:
        raise _fail(str(e)) from e
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    out = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    console.print(f"prompt tokens {ids.shape[1]}, new token ids {new}")
    console.print(f"text: {tokenizer.decode(new)!r}")
