"""`fedtune model ...`: make, inspect and try base-model checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from fedtune.model.checkpoint import load_pretrained, read_config, save_pretrained
from fedtune.model.config import PRESETS, ModelConfig
from fedtune.model.model import DeepseekForCausalLM, init_weights
from fedtune.model.safetensors_index import CheckpointError, checkpoint_digest, read_index
from fedtune.model.tokenizer import load_tokenizer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="Base-model checkpoints: create, inspect, generate.", no_args_is_help=True, pretty_exceptions_show_locals=False
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
) -> None:
    """Write a random DeepSeek-V3-format checkpoint (for tests, benchmarks and the demo)."""
    if preset not in PRESETS:
        raise _fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if (out / "config.json").exists():
        raise _fail(f"{out} already holds a checkpoint; choose an empty directory or delete it first")
    model = DeepseekForCausalLM(PRESETS[preset])
    init_weights(model, seed)
    save_pretrained(model, out)
    console.print(f"wrote {preset} checkpoint to {out}")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Architecture, parameter counts, size on disk and the checkpoint digest that jobs pin."""
    try:
        config = read_config(path)
        entries = read_index(path)
        digest = checkpoint_digest(entries)
    except CheckpointError as e:
        raise _fail(str(e)) from e
    total, active = parameter_counts(config)
    on_disk = sum(f.stat().st_size for f in {e.file for e in entries.values()})
    if as_json:
        print(json.dumps({"model_type": config.model_type, "parameters": total, "active_parameters": active,
                          "tensors": len(entries), "bytes_on_disk": on_disk, "digest": f"sha256:{digest}"}))
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
        ("tensors", f"{len(entries)} in {len({e.file for e in entries.values()})} file(s)"),
        ("bytes on disk", f"{on_disk:,}"),
        ("digest", f"sha256:{digest}"),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


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
