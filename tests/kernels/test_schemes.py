"""Quantization formats against hand computation and the published NF4 construction."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from fedtune.kernels import QuantizationError, dequantize_weight, get_scheme, quantize_weight
from fedtune.kernels.schemes import NF4_CODE, pack_nibbles, unpack_nibbles


def _roundtrip(w, scheme, group_size=0):
    s = get_scheme(scheme)
    g = s.check_group_size(group_size)
    t = quantize_weight(w, scheme, g)
    return t, dequantize_weight([t[n] for n in s.tensor_names], scheme, g, w.shape[-1])


def test_nibble_order_by_hand():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[1 + 2 * 16, 15 + 0 * 16]]  # even column low nibble, odd column high
    assert unpack_nibbles(packed).tolist() == codes.tolist()


def test_int4_exact_on_a_representable_group():
    # A group holding 16 evenly spaced values is exactly representable: scale 0.5, min -4.
    row = torch.arange(16, dtype=torch.float32) * 0.5 - 4.0
    w = row.repeat(2, 2)  # [2, 32], group 32
    t, back = _roundtrip(w, "int4", 32)
    assert t["scales"].float().unique().tolist() == [0.5]
    assert t["zeros"].float().unique().tolist() == [-4.0 + 8 * 0.5]  # w = (q - 8) * s + zero
    torch.testing.assert_close(back, w, rtol=0, atol=0)


def test_int4_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    t, back = _roundtrip(w, "int4", 64)
    step = t["scales"].float().repeat_interleave(64, dim=-1)
    assert ((back - w).abs() <= step / 2 + 1e-2 * step).all()  # bf16 scale/zero rounding adds a sliver


def test_int4_pads_k_to_the_group_and_cuts_back():
    torch.manual_seed(0)
    w = torch.randn(4, 100)
    t, back = _roundtrip(w, "int4", 32)
    assert t["qweight"].shape == (4, 64) and t["scales"].shape == (4, 4)  # 100 -> 128 columns
    assert back.shape == (4, 100)
    assert (back - w).abs().max() < 0.5


def test_int8_by_hand():
    w = torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, -2.54]])
    t, back = _roundtrip(w, "int8")
    # scale = absmax / 127 stored in bf16 (0.01 -> 0.0100098); -0.5 / 0.0100098 = -49.95 -> -50
    assert t["qweight"].tolist() == [[127, -50, 0], [0, 0, -127]]
    torch.testing.assert_close(t["scales"].float(), torch.tensor([0.01, 0.02]).bfloat16().float())
    torch.testing.assert_close(back, t["qweight"].float() * t["scales"].float()[:, None])


def test_nf4_code_book_matches_the_qlora_construction():
    # QLoRA appendix E: 8 positive quantiles and 7 negative ones of N(0, 1) at offset 0.9677,
    # normalised by their max, plus an exact zero.
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = sorted([*pos, 0.0, *neg])
    expected = torch.tensor(values) / max(values)
    torch.testing.assert_close(torch.tensor(NF4_CODE), expected, rtol=0, atol=1e-6)


def test_nf4_blocks_and_double_quantized_absmax():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 130) * 0.02  # stacked, K padded 130 -> 192
    t, back = _roundtrip(w, "nf4")
    assert t["qweight"].shape == (3, 5, 96) and t["absmax_q"].shape == (3, 5, 3)
    assert t["absmax_q"].dtype == torch.int8 and t["absmax_offset"].shape == (3,)
    # Each value is a code-book entry times its block's absmax; the stored absmax is within half an
    # int8 step (of its block of 256) of the true one.
    true_absmax = torch.cat((w, w[..., -1:].expand(3, 5, 62)), -1).unflatten(-1, (3, 64)).abs().amax(-1)
    from fedtune.kernels.schemes import _nf4_absmax

    stored = _nf4_absmax(t["absmax_q"], t["absmax_scale"], t["absmax_offset"])
    centred = true_absmax.flatten(1) - true_absmax.flatten(1).mean(-1, keepdim=True)  # 15 values: one block
    half_step = centred.abs().amax(-1) / 127 / 2  # [3]
    assert ((stored - true_absmax).abs().flatten(1) <= half_step[:, None] * 1.001).all()
    assert ((back - w).norm() / w.norm()) < 0.12


@pytest.mark.parametrize("scheme,expected_max", [("int8", 0.01), ("int4", 0.12), ("nf4", 0.12)])
def test_relative_error_of_gaussian_weights(scheme, expected_max):
    torch.manual_seed(1)
    w = torch.randn(64, 512) * 0.02
    _, back = _roundtrip(w, scheme, 128 if scheme == "int4" else 0)
    assert ((back - w).norm() / w.norm()) < expected_max


def test_bad_inputs_are_refused_with_names():
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'"):
        get_scheme("int3")
    with pytest.raises(QuantizationError, match="group sizes 32, 64, 128; got 100"):
        quantize_weight(torch.randn(4, 128), "int4", 100)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_weight(torch.tensor([[float("nan"), 1.0]]), "int8")
    with pytest.raises(QuantizationError, match="float weights"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), "int8")


def test_blocks_and_stored_k_by_hand():
    # int4 pads K to its group, nf4 to 64, int8 and none not at all (module docstring's table).
    assert [get_scheme("int4").stored_k(100, g) for g in (32, 64, 128)] == [128, 128, 128]
    assert get_scheme("int4").stored_k(130, 32) == 160
    assert get_scheme("nf4").stored_k(130, 0) == 192
    assert get_scheme("int8").stored_k(130, 0) == 130 and get_scheme("none").stored_k(130, 0) == 130
    assert get_scheme("nf4").stored_layout((3, 5, 130), 0)["absmax_q"] == ((3, 5, 3), torch.int8)


def test_the_registry_refuses_a_taken_name_and_an_unknown_path():
    from fedtune.kernels.schemes import SCHEMES, QuantScheme, register_scheme

    int8 = get_scheme("int8")
    with pytest.raises(ValueError, match="'int8' is already registered"):
        register_scheme(int8)
    with pytest.raises(ValueError, match="unknown fast paths \\['metal'\\]"):
        register_scheme(QuantScheme("int8_metal", int8.tensor_names, int8.quantize, int8.dequantize, int8.layout,
                                    fast_paths=("cpu", "metal")))
    assert "int8_metal" not in SCHEMES and SCHEMES["int8"] is int8
