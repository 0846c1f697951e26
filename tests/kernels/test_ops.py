"""The custom ops: CPU fast path against the reference, the reference against plain math,
gradients (gradcheck in float64), frozen weights, torch.compile, and the implementation switch.

Tolerances (relative Frobenius error against the fp32 reference on the same quantized weight):
- fp32 activations: 5e-3 — the packed int8/int4 CPU matmuls take bf16 activations and return
  bf16 (2^-8 relative rounding each way), the dequantize + fp32 GEMM route is exact to ~1e-6;
- bf16 activations: 1e-2 (the input itself is bf16).
MoE chains three such matmuls (gate, up, down), each rounding to bf16 on the packed route: 2x those.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedtune.kernels import (
    dequantize_weight,
    get_scheme,
    implementation_for,
    moe_experts,
    prepack,
    quant_linear,
    quantize_weight,
    use_implementation,
)
from fedtune.kernels.cpu_ops import SMALL_M

SCHEMES = [("int4", 128), ("int4", 32), ("int8", 0), ("nf4", 0), ("none", 0)]
TOL = {torch.float32: 5e-3, torch.bfloat16: 1e-2}
MOE_TOL = {dtype: 2 * tol for dtype, tol in TOL.items()}


def _quantized(w: torch.Tensor, scheme: str, group: int) -> list[torch.Tensor]:
    t = quantize_weight(w, scheme, group)
    return [t[n] for n in get_scheme(scheme).tensor_names]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("M", [1, SMALL_M, SMALL_M + 3])
@pytest.mark.parametrize("N,K", [(48, 256), (33, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_quant_linear_matches_reference(scheme, group, M, N, K, dtype):
    torch.manual_seed(M * 1000 + N + K)
    weights = _quantized(torch.randn(N, K) * 0.05, scheme, group)
    packed = prepack(weights, scheme, group, K, torch.device("cpu"))
    x = torch.randn(M, K).to(dtype)
    with use_implementation("reference"):
        expected = quant_linear(x, weights, scheme, group, K)
    with use_implementation("cpu"):
        got = quant_linear(x, weights, scheme, group, K, packed=packed)
        unpacked = quant_linear(x, weights, scheme, group, K)  # without prepack: derived on the fly
    assert got.dtype == dtype and got.shape == (M, N)
    assert _rel(got, expected) < TOL[dtype]
    assert _rel(unpacked, expected) < TOL[dtype]


def test_reference_is_dequantize_then_matmul_in_fp32():
    torch.manual_seed(0)
    weights = _quantized(torch.randn(16, 64), "int4", 32)
    x = torch.randn(3, 2, 64)  # leading dims are kept
    with use_implementation("reference"):
        y = quant_linear(x, weights, "int4", 32, 64)
    w = dequantize_weight(weights, "int4", 32, 64)
    torch.testing.assert_close(y, torch.einsum("abk,nk->abn", x, w), rtol=1e-5, atol=1e-5)


def test_input_width_is_checked():
    weights = _quantized(torch.randn(16, 64), "int8", 0)
    with pytest.raises(ValueError, match="input has 63 features, the weight expects 64"):
        quant_linear(torch.randn(2, 63), weights, "int8", 0, 64)


# ---------------------------------------------------------------------------------------------
# Gradients: dX only, exact (gradcheck, float64 reference path); nothing reaches the weights.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 0), ("nf4", 0)])
def test_quant_linear_gradcheck(scheme, group):
    torch.manual_seed(0)
    weights = _quantized(torch.randn(12, 40), scheme, group)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    with use_implementation("reference"):
        assert torch.autograd.gradcheck(lambda a: quant_linear(a, weights, scheme, group, 40), (x,), fast_mode=True)


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("nf4", 0)])
def test_cpu_dx_matches_reference(scheme, group):
    torch.manual_seed(0)
    weights = _quantized(torch.randn(48, 100), scheme, group)
    packed = prepack(weights, scheme, group, 100, torch.device("cpu"))
    grads = {}
    for impl in ("reference", "cpu"):
        x = torch.randn(5, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with use_implementation(impl):
            (quant_linear(x, weights, scheme, group, 100, packed=packed) ** 2).sum().backward()
        grads[impl] = x.grad
    assert _rel(grads["cpu"], grads["reference"]) < TOL[torch.float32]


def test_frozen_weights_get_no_gradient_and_trainable_ones_are_refused():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    weights = _quantized(w, "int4", 32)
    x = torch.randn(2, 32, requires_grad=True)
    quant_linear(x, weights, "int4", 32, 32).sum().backward()
    assert x.grad is not None and all(t.grad is None for t in weights)
    scales = weights[1].float().requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        quant_linear(x, [weights[0], scales, weights[2]], "int4", 32, 32)


def test_torch_compile_traces_through_both_ops():
    torch.manual_seed(0)
    weights = _quantized(torch.randn(16, 64), "int4", 32)
    gate, up, down = (_quantized(torch.randn(4, 24, 64) * 0.1, "int8", 0), _quantized(torch.randn(4, 24, 64) * 0.1,
                      "int8", 0), _quantized(torch.randn(4, 64, 24) * 0.1, "int8", 0))
    ids = torch.tensor([[0, 1], [3, 3], [2, 0]])
    rw = torch.rand(3, 2)

    def f(x):
        return moe_experts(quant_linear(x, weights, "int4", 32, 64).repeat(1, 4), ids, rw, gate, up, down, "int8")

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


# ---------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------
def _experts(scheme, group, E=6, H=64, I=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    float_w = (torch.randn(E, I, H, generator=g) * 0.1, torch.randn(E, I, H, generator=g) * 0.1,
               torch.randn(E, H, I, generator=g) * 0.1)
    return float_w, [_quantized(w, scheme, group) for w in float_w]


def _per_token_moe(x, ids, rw, w_gate, w_up, w_down):
    """The definition, one token and slot at a time (independent of the sort-based code)."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            h = F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])
            y[n] += rw[n, j] * (w_down[e] @ h)
    return y


def test_reference_moe_matches_the_per_token_definition():
    torch.manual_seed(0)
    float_w, _ = _experts("none", 0)
    x, ids, rw = torch.randn(9, 64), torch.randint(0, 6, (9, 2)), torch.rand(9, 2)
    with use_implementation("reference"):
        got = moe_experts(x, ids, rw, [float_w[0]], [float_w[1]], [float_w[2]])
    torch.testing.assert_close(got, _per_token_moe(x, ids, rw, *float_w), rtol=1e-5, atol=1e-5)


ROUTINGS = {
    "random": lambda n: torch.randint(0, 6, (n, 2)),
    "empty experts": lambda n: torch.randint(0, 2, (n, 2)),
    "one hot expert": lambda n: torch.full((n, 2), 4),
}


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_moe_matches_reference(scheme, group, routing, T, dtype):
    torch.manual_seed(T)
    _, (gate, up, down) = _experts(scheme, group)
    packs = [prepack(w, scheme, group, k, torch.device("cpu")) for w, k in ((gate, 64), (up, 64), (down, 48))]
    x, ids, rw = torch.randn(T, 64).to(dtype), ROUTINGS[routing](T), torch.rand(T, 2)
    with use_implementation("reference"):
        expected = moe_experts(x, ids, rw, gate, up, down, scheme, group)
    with use_implementation("cpu"):
        got = moe_experts(x, ids, rw, gate, up, down, scheme, group, *packs)
    assert got.dtype == dtype and got.shape == (T, 64)
    assert _rel(got, expected) < MOE_TOL[dtype]


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("nf4", 0), ("none", 0)])
def test_moe_gradcheck_input_and_routing_weights(scheme, group):
    _, (gate, up, down) = _experts(scheme, group, E=4, H=16, I=8)
    gate, up, down = ([t.detach() for t in ws] for ws in (gate, up, down))
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    rw = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 1], [3, 0], [0, 3], [1, 0]])  # expert 2 empty
    with use_implementation("reference"):
        check = torch.autograd.gradcheck
        assert check(lambda a, r: moe_experts(a, ids, r, gate, up, down, scheme, group), (x, rw), fast_mode=True)


def test_moe_backward_agrees_with_autograd_through_the_definition():
    float_w, _ = _experts("none", 0, E=4, H=16, I=8)
    frozen = [w.clone() for w in float_w]
    x = torch.randn(7, 16, requires_grad=True)
    rw = torch.rand(7, 2, requires_grad=True)
    ids = torch.randint(0, 4, (7, 2))
    moe_experts(x, ids, rw, [frozen[0]], [frozen[1]], [frozen[2]]).pow(2).sum().backward()
    x2, rw2 = x.detach().clone().requires_grad_(), rw.detach().clone().requires_grad_()
    _per_token_moe(x2, ids, rw2, *float_w).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rw.grad, rw2.grad, rtol=1e-4, atol=1e-5)


def test_unquantized_trainable_experts_still_get_weight_gradients():
    float_w, _ = _experts("none", 0, E=4, H=16, I=8)
    params = [w.clone().requires_grad_() for w in float_w]
    x, ids, rw = torch.randn(3, 16), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    moe_experts(x, ids, rw, [params[0]], [params[1]], [params[2]]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------
def test_switch_by_context_and_environment(monkeypatch):
    cpu = torch.device("cpu")
    assert implementation_for(cpu) == "cpu"
    with use_implementation("reference"):
        assert implementation_for(cpu) == "reference"
    monkeypatch.setenv("FEDTUNE_KERNELS", "reference")
    assert implementation_for(cpu) == "reference"
    with use_implementation("cpu"):  # the context manager wins over the environment
        assert implementation_for(cpu) == "cpu"
    monkeypatch.setenv("FEDTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="FEDTUNE_KERNELS: unknown kernel implementation 'fast'"):
        implementation_for(cpu)
    monkeypatch.delenv("FEDTUNE_KERNELS")
    with use_implementation("triton"), pytest.raises(RuntimeError, match="'triton' was forced"):
        implementation_for(cpu)
