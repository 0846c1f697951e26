"""`fedtune demo`: what the README's first command runs.

For now the base-model job: make a tiny checkpoint (once), load it, describe it and generate a few
tokens. The federated demo replaces this when the coordinator and agents exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtune.model.cli import console, generate, info, init_tiny


def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's files.")] = Path("out/demo"),
    preset: Annotated[str, typer.Option(help="Base-model size preset (tiny or small).")] = "tiny",
) -> None:
    """Run the demo job end to end and say where its files are."""
    base = out / f"base-{preset}"
    if not (base / "config.json").exists():
        console.rule("1. create a random base checkpoint")
        init_tiny(base, preset=preset, seed=0)
    else:
        console.rule(f"1. reuse the base checkpoint in {base}")
    console.rule("2. fedtune model info")
    info(base, as_json=False)
    console.rule("3. load it and generate greedily with the latent KV cache")
    generate(base, prompt="Hello, fedtune", max_new_tokens=12)
    console.print(f"\ndemo files are in {out.resolve()}")
