"""Adding a quantization scheme touches one place (docs/quantization.md, "How to add a quantization
scheme"): a toy scheme registered only through `register_scheme` runs through convert, load, the CPU
path and the Triton path. It has no fast path, so each path runs the reference and logs that once,
naming the scheme and the path; it never treats the stored codes as float weights.

The toy: int8 codes with one fp32 scale per block of 16 columns (K padded to whole blocks).
Expected values come from that arithmetic written out here (`by_hand`) and a float64 matmul (for
MoE, the float specification `reference.moe_experts` on those weights).

The Triton test runs on a CUDA GPU in this process, or in Triton's interpreter on CPU tensors in a
child pytest (TRITON_INTERPRET=1 must be set before triton is imported), as tests/kernels/test_triton.py
does; it skips when triton is not installed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.kernels import moe_experts, prepack, quant_linear, reference, schemes, triton_ops, use_implementation
from fedtune.kernels.schemes import SCHEMES, QuantScheme, register_scheme
from fedtune.model import init_weights, load_pretrained, save_pretrained
from fedtune.model.config import PRESETS
from fedtune.model.convert import convert_checkpoint
from fedtune.model.model import DeepseekForCausalLM
from fedtune.model.quantize import quantization_targets

BLOCK = 16
REPO_ROOT = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def quantize_toy(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    k = w.shape[-1]
    w = torch.cat((w, w[..., -1:].expand(*w.shape[:-1], -k % BLOCK)), dim=-1).float()  # pad: repeat the last column
    blocks = w.unflatten(-1, (-1, BLOCK))  # [..., N, Kp/16, 16]
    scales = (blocks.abs().amax(dim=-1) / 127).clamp(min=1e-12)  # [..., N, Kp/16]
    codes = torch.round(blocks / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return {"codes": codes.flatten(-2), "block_scales": scales}


def dequantize_toy(t: list[torch.Tensor], group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    codes, scales = t
    return (codes.to(dtype).unflatten(-1, (-1, BLOCK)) * scales.to(dtype)[..., None]).flatten(-2)[..., :k]


def layout_toy(lead: tuple[int, ...], n: int, k: int, group_size: int, dtype: torch.dtype) -> dict:
    kp = -(-k // BLOCK) * BLOCK
    return {"codes": ((*lead, n, kp), torch.int8), "block_scales": ((*lead, n, kp // BLOCK), torch.float32)}


TOY = QuantScheme("toy8", ("codes", "block_scales"), quantize_toy, dequantize_toy, layout_toy, fixed_block=BLOCK,
                  description="test only: int8 codes, one fp32 scale per 16 columns")


def by_hand(codes: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """w[n, c] = codes[n, c] * scales[n, c // 16], float64, cut to k columns."""
    return (codes.double() * scales.double().repeat_interleave(BLOCK, dim=-1))[..., :k]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(schemes, "_fallbacks_logged", set())  # so that this test sees the first fallback
    assert TOY.name not in SCHEMES
    register_scheme(TOY)
    yield TOY
    del SCHEMES[TOY.name]


def fallback_records(caplog, path: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "'toy8'" in r.getMessage()
            and f"no {path} fast path" in r.getMessage()]


def toy_weights(n: int, k: int, seed: int, lead: tuple[int, ...] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
    w = torch.randn(*lead, n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    stored = quantize_toy(w, 0)
    return [stored["codes"], stored["block_scales"]], by_hand(stored["codes"], stored["block_scales"], k)


def moe_by_hand(x, ids, rw, gate, up, down) -> torch.Tensor:
    """The float64 MoE specification (checked against a per-token loop in test_ops.py) on the by-hand weights."""
    return reference.moe_experts(x.double(), ids, rw.double(), gate, up, down)


def test_the_doc_names_the_one_registry():
    doc = (REPO_ROOT / "docs" / "quantization.md").read_text()
    section = doc.split("## How to add a quantization scheme", 1)[1].split("\n## ", 1)[0]
    assert "`register_scheme`" in section and "`kernels/schemes.py`" in section and "test_toy_scheme.py" in section


def test_convert_then_load(tmp_path, toy, caplog):
    config = PRESETS["tiny"]
    model = DeepseekForCausalLM(config)
    init_weights(model, seed=3)
    convert_checkpoint(save_pretrained(model, tmp_path / "src"), tmp_path / "q", "toy8")
    float_model = load_pretrained(tmp_path / "src")
    loaded = load_pretrained(tmp_path / "q")
    stored, expected = loaded.state_dict(), float_model.state_dict()
    for name, prefix in quantization_targets(config).items():
        w = expected[name]
        codes, scales = stored[f"{prefix}.codes"], stored[f"{prefix}.block_scales"]
        assert (codes.dtype, scales.dtype) == (torch.int8, torch.float32), prefix
        hand = by_hand(codes, scales, w.shape[-1])
        step = scales.double().repeat_interleave(BLOCK, dim=-1)[..., : w.shape[-1]]
        assert ((hand - w.double()).abs() <= step / 2 * 1.001).all(), prefix  # rounding: half a step at most
        expected[name] = hand.to(w.dtype)
    float_model.load_state_dict(expected)  # the float model with the toy's weights, by hand
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_implementation("cpu"):
        got = loaded(ids).logits
    torch.testing.assert_close(got, float_model(ids).logits.detach(), rtol=1e-4, atol=1e-4)
    assert len(fallback_records(caplog, "cpu")) == 1


def test_cpu_path_runs_the_reference_and_says_so_once(toy, caplog):
    weights, w = toy_weights(24, 40, seed=1)  # K = 40 -> 48 stored columns
    x = torch.randn(5, 40, requires_grad=True)
    with use_implementation("cpu"):
        assert prepack(weights, "toy8", 0, 40, torch.device("cpu")) == []
        y = quant_linear(x, weights, "toy8", 0, 40, packed=[])
        y.backward(dy := torch.randn(5, 24))
        few_rows = quant_linear(x[:1].detach().bfloat16(), weights, "toy8", 0, 40)
    torch.testing.assert_close(y.double(), x.detach().double() @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few_rows.double(), x[:1].detach().bfloat16().double() @ w.t(), rtol=2e-2, atol=2e-2)
    records = fallback_records(caplog, "cpu")
    assert len(records) == 1 and "toy8" in records[0].getMessage()


def test_cpu_moe_runs_the_reference(toy, caplog):
    gen = torch.Generator().manual_seed(2)
    (gate, gw), (up, uw), (down, dw) = (toy_weights(24, 40, 3, (3,)), toy_weights(24, 40, 4, (3,)),
                                        toy_weights(40, 24, 5, (3,)))
    x, ids = torch.randn(7, 40, generator=gen), torch.randint(0, 3, (7, 2), generator=gen)
    rw = torch.softmax(torch.randn(7, 2, generator=gen), dim=-1)
    with use_implementation("cpu"):
        y = moe_experts(x, ids, rw, gate, up, down, "toy8", 0)
    torch.testing.assert_close(y.double(), moe_by_hand(x, ids, rw, gw, uw, dw), rtol=1e-5, atol=1e-5)
    assert len(fallback_records(caplog, "cpu")) == 1


@pytest.mark.skipif(triton_ops.triton is None, reason="triton is not installed")
@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
def test_triton_path_runs_the_reference(toy, caplog):
    weights, w = toy_weights(24, 40, seed=6)
    dev = [t.to(DEVICE) for t in weights]
    x, dy = torch.randn(5, 40), torch.randn(5, 24)
    y = triton_ops.quant_linear_triton(x.to(DEVICE), dev, "toy8", 0, 40)
    dx = triton_ops.quant_linear_dx_triton(dy.to(DEVICE), dev, "toy8", 0, 40)
    torch.testing.assert_close(y.cpu().double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.cpu().double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
    (gate, gw), (down, dw) = toy_weights(24, 40, 7, (2,)), toy_weights(40, 24, 8, (2,))
    ids, rw = torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.full((3, 2), 0.5)
    out = triton_ops.moe_experts_triton(x[:3].to(DEVICE), ids.to(DEVICE), rw.to(DEVICE), [t.to(DEVICE) for t in gate],
                                        [t.to(DEVICE) for t in gate], [t.to(DEVICE) for t in down], "toy8", 0)
    torch.testing.assert_close(out.cpu().double(), moe_by_hand(x[:3], ids, rw, gw, gw, dw), rtol=1e-5, atol=1e-5)
    assert len(fallback_records(caplog, "triton")) == 1


@pytest.mark.slow  # a child interpreter importing torch and triton: seconds
@pytest.mark.skipif(triton_ops.triton is None, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="this is the interpreter run")
def test_triton_path_in_the_interpreter():
    run = subprocess.run([sys.executable, "-P", "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                          "-k", "test_triton_path_runs_the_reference"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0 and "1 passed" in tail and "skipped" not in tail.splitlines()[-1], tail
