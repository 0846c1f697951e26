"""The two ops the quantized base runs on, as `torch.library` custom ops.

- `quant_linear(x, weights, scheme, ...)`: y = x · W^T with W stored quantized;
- `moe_experts(x, expert_ids, routing_weights, gate, up, down, scheme, ...)`: routed SwiGLU experts.

Each has a fake implementation (so `torch.compile` traces through it) and an autograd formula
for its inputs only: the base is frozen, LoRA training backpropagates through it, so no
gradient ever reaches a stored weight (a weight that requires grad is refused). The
implementation that runs is chosen per device by `fedtune.kernels.dispatch`.
"""

from __future__ import annotations

import torch

from fedtune.kernels import cpu_ops, reference
from fedtune.kernels.dispatch import implementation_for
from fedtune.kernels.schemes import get_scheme

Tensors = list[torch.Tensor]


def _triton():
    from fedtune.kernels import triton_ops

    return triton_ops


# ---------------------------------------------------------------------------------------------
# quant_linear
# ---------------------------------------------------------------------------------------------
def _linear_rows(
    a: torch.Tensor, weights: Tensors, packed: Tensors, scheme: str, group_size: int, in_features: int, *, dx: bool
) -> torch.Tensor:
    """y = a · W^T ([M, K] -> [M, N]), or with `dx` its input gradient a · W ([M, N] -> [M, K]),
    by the implementation that runs for a's device."""
    impl = implementation_for(a.device)
    if impl == "cpu":
        op = cpu_ops.quant_linear_dx if dx else cpu_ops.quant_linear
        return op(a, weights, packed, scheme, group_size, in_features)
    if impl == "triton":
        op = _triton().quant_linear_dx_triton if dx else _triton().quant_linear_triton
    else:
        op = reference.quant_linear_dx if dx else reference.quant_linear
    return op(a, weights, scheme, group_size, in_features)


def _run_quant_linear(
    x: torch.Tensor, weights: Tensors, packed: Tensors, scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    y = _linear_rows(x.reshape(-1, x.shape[-1]), weights, packed, scheme, group_size, in_features, dx=False)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., N]


_quant_linear = torch.library.custom_op("fedtune::quant_linear", _run_quant_linear, mutates_args=())


@_quant_linear.register_fake
def _(x, weights, packed, scheme, group_size, in_features):
    return x.new_empty(*x.shape[:-1], weights[0].shape[-2])


@torch.library.custom_op("fedtune::quant_linear_dx", mutates_args=())
def _quant_linear_dx(
    dy: torch.Tensor, weights: Tensors, packed: Tensors, scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    dx = _linear_rows(dy.reshape(-1, dy.shape[-1]), weights, packed, scheme, group_size, in_features, dx=True)
    return dx.reshape(*dy.shape[:-1], in_features)


@_quant_linear_dx.register_fake
def _(dy, weights, packed, scheme, group_size, in_features):
    return dy.new_empty(*dy.shape[:-1], in_features)


def _quant_linear_setup(ctx, inputs, output):
    _, weights, packed, scheme, group_size, in_features = inputs
    ctx.weights, ctx.packed, ctx.args = weights, packed, (scheme, group_size, in_features)


def _quant_linear_backward(ctx, dy):
    dx = _quant_linear_dx(dy, ctx.weights, ctx.packed, *ctx.args) if ctx.needs_input_grad[0] else None
    return dx, [None] * len(ctx.weights), [None] * len(ctx.packed), None, None, None


_quant_linear.register_autograd(_quant_linear_backward, setup_context=_quant_linear_setup)


def _eager_without_grad(*inputs: torch.Tensor) -> bool:
    """True when nothing needs the custom op: no autograd through the inputs and no tracing."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))


def _check_frozen(weights: Tensors, what: str) -> None:
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        raise ValueError(f"{what}: quantized base weights are frozen and get no gradient; "
                         f"call requires_grad_(False) on them (train adapters instead)")


def quant_linear(
    x: torch.Tensor, weights: Tensors, scheme: str, group_size: int, in_features: int, packed: Tensors | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W^T, W given by a scheme's stored tensors (see kernels/schemes.py).

    Args:
        x: activations, any float dtype; the result has the same dtype.
        weights: the scheme's tensors in `tensor_names` order.
        scheme, group_size: the quantization format (group_size 0 where the scheme has none).
        in_features: K, the unpadded input width.
        packed: device layouts from `prepack`, computed once per weight; optional.
    Raises:
        ValueError: x's last dim is not in_features, or a weight requires grad.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"quant_linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    _check_frozen(weights, "quant_linear")
    if _eager_without_grad(x):  # skip the op's dispatch (~0.4 ms): it matters at decode shapes
        return _run_quant_linear(x, weights, packed or [], scheme, group_size, in_features)
    return _quant_linear(x, weights, packed or [], scheme, group_size, in_features)


def prepack(weights: Tensors, scheme: str, group_size: int, in_features: int, device: torch.device) -> Tensors:
    """Extra layouts the device's fast path reads (torch's int4 CPU pack, fp32 scales); may be []."""
    get_scheme(scheme)
    if torch.device(device).type == "cpu":
        return cpu_ops.prepack(weights, scheme, group_size, in_features)
    return []


# ---------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------
def _run_moe_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
    gate: Tensors, up: Tensors, down: Tensors, packed_gate: Tensors, packed_up: Tensors, packed_down: Tensors,
    scheme: str, group_size: int,
) -> torch.Tensor:
    impl = implementation_for(x.device)
    if impl == "cpu":
        return cpu_ops.moe_experts(x, expert_ids, routing_weights, gate, up, down,
                                   packed_gate, packed_up, packed_down, scheme, group_size)
    if impl == "triton":
        return _triton().moe_experts_triton(x, expert_ids, routing_weights, gate, up, down, scheme, group_size)
    return reference.quant_moe_experts(x, expert_ids, routing_weights, gate, up, down, scheme, group_size)


_moe_experts = torch.library.custom_op("fedtune::moe_experts", _run_moe_experts, mutates_args=())


@_moe_experts.register_fake
def _(x, expert_ids, routing_weights, gate, up, down, packed_gate, packed_up, packed_down, scheme, group_size):
    return torch.empty_like(x)


@torch.library.custom_op("fedtune::moe_experts_backward", mutates_args=())
def _moe_experts_backward(
    dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
    gate: Tensors, up: Tensors, down: Tensors, scheme: str, group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, H], d routing_weights [N, k]) for y = sum_j r_j · down(silu(gate(x)) * up(x)).

    Per expert, with its weights dequantized once: o = down(h), h = silu(g) * u;
    dr = <dy, o>; dh = r · dy W_down; dg = dh * u * silu'(g); du = dh * silu(g);
    dx = dg W_gate + du W_up. Runs in fp32 (fp64 for fp64 inputs) on any device.
    """
    n_tokens, top_k = expert_ids.shape
    hidden = x.shape[-1]
    n_experts, intermediate = gate[0].shape[0], gate[0].shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    order, token_of_slot, counts = reference.sort_slots_by_expert(expert_ids, n_experts)
    xs, dys = x[token_of_slot].to(compute), dy[token_of_slot].to(compute)  # [N*k, H]
    rs = routing_weights.reshape(-1)[order].to(compute)  # [N*k]
    dx_slots = torch.zeros_like(xs)
    dr_slots = torch.zeros_like(rs)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        sl = slice(start, start + count)
        w_gate = reference.dequantized(cpu_ops.expert_slice(gate, e), scheme, group_size, hidden, xs)  # [I, H]
        w_up = reference.dequantized(cpu_ops.expert_slice(up, e), scheme, group_size, hidden, xs)
        w_down = reference.dequantized(cpu_ops.expert_slice(down, e), scheme, group_size, intermediate, xs)  # [H, I]
        g, u = xs[sl] @ w_gate.t(), xs[sl] @ w_up.t()  # [n_e, I]
        sig = torch.sigmoid(g)
        silu = g * sig
        dr_slots[sl] = ((silu * u) @ w_down.t() * dys[sl]).sum(-1)
        dh = rs[sl, None] * (dys[sl] @ w_down)  # [n_e, I]
        dg = dh * u * sig * (1 + g * (1 - sig))
        dx_slots[sl] = dg @ w_gate + (dh * silu) @ w_up
        start += count
    dx = torch.zeros(n_tokens, hidden, dtype=compute, device=x.device).index_add_(0, token_of_slot, dx_slots)
    dr = torch.empty_like(dr_slots).scatter_(0, order, dr_slots).view(n_tokens, top_k)
    return dx.to(x.dtype), dr.to(routing_weights.dtype)


@_moe_experts_backward.register_fake
def _(dy, x, expert_ids, routing_weights, gate, up, down, scheme, group_size):
    return torch.empty_like(x), torch.empty_like(routing_weights)


def _moe_setup(ctx, inputs, output):
    x, expert_ids, routing_weights, gate, up, down, packed_gate, packed_up, packed_down, scheme, group_size = inputs
    ctx.save_for_backward(x, expert_ids, routing_weights)
    ctx.weights, ctx.packed, ctx.args = (gate, up, down), (packed_gate, packed_up, packed_down), (scheme, group_size)


def _moe_backward(ctx, dy):
    x, expert_ids, routing_weights = ctx.saved_tensors
    dx, dr = _moe_experts_backward(dy, x, expert_ids, routing_weights, *ctx.weights, *ctx.args)
    nones = [[None] * len(t) for t in (*ctx.weights, *ctx.packed)]
    return dx, None, dr, *nones, None, None


_moe_experts.register_autograd(_moe_backward, setup_context=_moe_setup)


def moe_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
    gate: Tensors, up: Tensors, down: Tensors, scheme: str = "none", group_size: int = 0,
    packed_gate: Tensors | None = None, packed_up: Tensors | None = None, packed_down: Tensors | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts: y[n] = sum_j r[n, j] · down_e(silu(gate_e(x_n)) * up_e(x_n)), e = ids[n, j].

    Args:
        x: [N, H] tokens. expert_ids: [N, k] int64. routing_weights: [N, k].
        gate, up: stacked [E, I, H] expert weights in the scheme's stored form; down: [E, H, I].
        scheme, group_size: the quantization format ("none": plain float tensors).
        packed_*: `prepack` layouts of each stacked weight; optional.
    Returns:
        [N, H] in x's dtype. Gradients flow to x and routing_weights, never to the weights;
        unquantized ("none") weights that require grad take the plain differentiable reference.
    """
    if scheme == "none" and torch.is_grad_enabled() and any(w.requires_grad for w in (*gate, *up, *down)):
        return reference.moe_experts(x, expert_ids, routing_weights, gate[0], up[0], down[0])
    _check_frozen([*gate, *up, *down], "moe_experts")
    if _eager_without_grad(x, routing_weights):
        return _run_moe_experts(x, expert_ids, routing_weights, gate, up, down,
                                packed_gate or [], packed_up or [], packed_down or [], scheme, group_size)
    return _moe_experts(x, expert_ids, routing_weights, gate, up, down,
                        packed_gate or [], packed_up or [], packed_down or [], scheme, group_size)

