"""Aggregation strategies against values computed by hand, FFA exactness, DP-FedAvg noise,
server optimizers (FedAvgM / FedAdam / FedYogi) and their state across rounds, the weight cap."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtune.coordinator.aggregation import (
    AGGREGATORS,
    AggregationConfig,
    AggregationError,
    ClientUpdate,
    aggregate,
    cap_weights,
    client_level_epsilon,
    lora_b_only,
)


def _u(client: str, weight: float = 1.0, **tensors: list[float]) -> ClientUpdate:
    return ClientUpdate(client, {name: torch.tensor(v) for name, v in tensors.items()}, weight)


def _run(method: str, updates, current, server_state=None, **config):
    return aggregate(updates, current=current, config=AggregationConfig(method=method, **config),
                     server_state=server_state)


def test_registry_names():
    assert set(AGGREGATORS) == {"fedavg", "ffa", "clipped_fedavg", "trimmed_mean", "median", "dp_fedavg",
                                "fedavgm", "fedadam", "fedyogi"}
    with pytest.raises(AggregationError, match="unknown aggregation 'krum'"):
        _run("krum", [], {})


def test_fedavg_is_weighted_by_records_and_keeps_untouched_tensors():
    current = {"w": torch.zeros(2), "other": torch.tensor([9.0])}
    # (1 * [1, 2] + 3 * [5, -2]) / 4 = [16, -4] / 4
    result = _run("fedavg", [_u("a", 1, w=[1.0, 2.0]), _u("b", 3, w=[5.0, -2.0])], current)
    assert result.tensors["w"].tolist() == [4.0, -1.0]
    assert result.tensors["other"].tolist() == [9.0]
    assert result.tensors["w"].dtype == torch.float32
    assert (result.num_clients, result.total_weight) == (2, 4.0)


def test_fedavg_streams_a_generator():
    current = {"w": torch.zeros(1)}
    updates = (_u(f"c{i}", 1, w=[float(i)]) for i in range(1, 5))  # consumed once, never listed
    assert _run("fedavg", updates, current).tensors["w"].tolist() == [2.5]  # (1+2+3+4)/4


def test_clipped_fedavg_clips_each_update_delta():
    current = {"w": torch.tensor([1.0, 1.0])}
    # deltas [3, 4] (norm 5 -> scaled by 2/5 to [1.2, 1.6]) and [0.6, 0.8] (norm 1, kept)
    result = _run("clipped_fedavg", [_u("a", w=[4.0, 5.0]), _u("b", w=[1.6, 1.8])], current, clip_norm=2.0)
    assert result.tensors["w"].tolist() == pytest.approx([1.0 + 0.9, 1.0 + 1.2])
    assert result.clipped_clients == ("a",) and result.clip_norm == 2.0
    with pytest.raises(AggregationError, match="positive clip_norm"):
        _run("clipped_fedavg", [_u("a", w=[1.0, 1.0])], current)


FIVE = [_u("c1", w=[100.0, 0.0]), _u("c2", w=[1.0, 3.0]), _u("c3", w=[3.0, -50.0]), _u("c4", w=[2.0, 2.0]),
        _u("c5", w=[4.0, 1.0])]


def test_trimmed_mean_is_coordinate_wise():
    # coordinate 0: 1 2 3 4 100 -> drop 1 and 100 -> mean(2, 3, 4) = 3
    # coordinate 1: -50 0 1 2 3 -> drop -50 and 3 -> mean(0, 1, 2) = 1
    result = _run("trimmed_mean", iter(FIVE), {"w": torch.zeros(2)}, trim_fraction=0.2)
    assert result.tensors["w"].tolist() == [3.0, 1.0]
    untrimmed = _run("trimmed_mean", FIVE, {"w": torch.zeros(2)}, trim_fraction=0.0)
    assert untrimmed.tensors["w"].tolist() == pytest.approx([110 / 5, -44 / 5])


def test_median_is_coordinate_wise_and_averages_the_middle_pair():
    assert _run("median", FIVE, {"w": torch.zeros(2)}).tensors["w"].tolist() == [3.0, 1.0]
    # four clients: coordinate 0: 1 2 3 100 -> (2 + 3) / 2; coordinate 1: -50 0 2 3 -> (0 + 2) / 2
    assert _run("median", FIVE[:4], {"w": torch.zeros(2)}).tensors["w"].tolist() == [2.5, 1.0]


def test_dp_fedavg_without_noise_is_the_unweighted_mean_of_clipped_deltas():
    current = {"w": torch.zeros(2)}
    updates = [_u("a", 1, w=[3.0, 4.0]), _u("b", 100, w=[0.6, 0.8])]  # weights are ignored
    result = _run("dp_fedavg", updates, current, clip_norm=2.0, noise_multiplier=0.0)
    assert result.tensors["w"].tolist() == pytest.approx([0.9, 1.2])  # ([1.2, 1.6] + [0.6, 0.8]) / 2
    assert (result.noise_multiplier, result.clip_norm, result.clipped_clients) == (0.0, 2.0, ("a",))


@pytest.mark.parametrize("secure_rng", [False, True])
def test_dp_fedavg_noise_has_std_sigma_c_over_n(secure_rng):
    n, size, sigma, clip = 2, 40_000, 1.5, 2.0
    current = {"w": torch.zeros(size)}
    updates = [ClientUpdate(f"c{i}", {"w": torch.zeros(size)}, 1.0) for i in range(n)]
    result = _run("dp_fedavg", updates, current, clip_norm=clip, noise_multiplier=sigma, secure_rng=secure_rng,
                  seed=0)
    noise = result.tensors["w"].double()
    expected_std = sigma * clip / n  # 1.5
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(size)
    within_one_std = (noise.abs() < expected_std).double().mean().item()
    assert within_one_std == pytest.approx(0.6827, abs=0.01)  # Gaussian, not just the right variance
    again = _run("dp_fedavg", updates, current, clip_norm=clip, noise_multiplier=sigma, secure_rng=secure_rng, seed=0)
    assert torch.equal(again.tensors["w"], result.tensors["w"]) is (not secure_rng)


def test_client_level_epsilon_uses_opacus_rdp():
    # Reference measured with Opacus' RDP accountant (NOTES.md): q=0.01, sigma=1.0, 1000 steps, delta=1e-5.
    assert client_level_epsilon([(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(2.101, abs=0.002)
    assert client_level_epsilon([(1.0, 0.01, 500)] * 2, delta=1e-5) == pytest.approx(2.101, abs=0.002)
    assert client_level_epsilon([], delta=1e-5) == 0.0
    assert client_level_epsilon([(0.0, 0.5, 1)], delta=1e-5) == math.inf


def _lora_clients(n: int, *, shared_a: bool):
    g = torch.Generator().manual_seed(7)
    a0 = torch.randn(2, 5, generator=g)  # A: [r, in]
    clients = []
    for i in range(n):
        a = a0 if shared_a else a0 + torch.randn(2, 5, generator=g)
        b = torch.randn(4, 2, generator=g) * (i + 1)  # B: [out, r], heterogeneous clients
        clients.append((a, b, float(10 * (i + 1))))
    return a0, clients


def test_ffa_average_of_b_is_exactly_the_average_of_the_clients_deltas():
    a, clients = _lora_clients(3, shared_a=True)
    current = {"q.lora_A.weight": a, "q.lora_B.weight": torch.zeros(4, 2)}
    updates = [ClientUpdate(f"c{i}", lora_b_only({"q.lora_A.weight": a, "q.lora_B.weight": b}), w)
               for i, (_, b, w) in enumerate(clients)]
    result = _run("ffa", updates, current)
    total = sum(w for _, _, w in clients)
    mean_delta = sum(w * (b @ a) for _, b, w in clients) / total  # mean_i B_i A, weighted by records
    assert torch.equal(result.tensors["q.lora_A.weight"], a)  # A stays frozen
    assert torch.allclose(result.tensors["q.lora_B.weight"] @ a, mean_delta, atol=1e-6, rtol=0)


def test_plain_fedavg_of_a_and_b_is_not_the_average_of_products():
    a0, clients = _lora_clients(3, shared_a=False)
    current = {"q.lora_A.weight": a0, "q.lora_B.weight": torch.zeros(4, 2)}
    updates = [ClientUpdate(f"c{i}", {"q.lora_A.weight": a, "q.lora_B.weight": b}, w)
               for i, (a, b, w) in enumerate(clients)]
    result = _run("fedavg", updates, current)
    total = sum(w for _, _, w in clients)
    mean_delta = sum(w * (b @ a) for a, b, w in clients) / total
    product = result.tensors["q.lora_B.weight"] @ result.tensors["q.lora_A.weight"]
    assert (product - mean_delta).norm() / mean_delta.norm() > 0.05


def test_ffa_refuses_updates_that_carry_a():
    a, clients = _lora_clients(1, shared_a=True)
    current = {"q.lora_A.weight": a, "q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(AggregationError, match="FFA mode"):
        _run("ffa", [ClientUpdate("c0", {"q.lora_A.weight": a, "q.lora_B.weight": clients[0][1]}, 1.0)], current)


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_every_strategy_refuses_no_updates_and_mismatched_names(method):
    current = {"w": torch.zeros(1), "v": torch.zeros(1)}
    config = {"clip_norm": 1.0} if method in ("clipped_fedavg", "dp_fedavg") else {}
    with pytest.raises(AggregationError, match="no updates"):
        _run(method, [], current, **config)
    with pytest.raises(AggregationError):
        _run(method, [_u("a", w=[1.0]), _u("b", v=[1.0])], current, **config)


# ---------------------------------------------------------------------------------------------
# Server learning rate and server optimizers (Reddi et al. 2021, Algorithm 2)


def test_server_lr_scales_the_step_of_the_weighted_strategies():
    current = {"w": torch.tensor([1.0, 1.0]), "other": torch.tensor([9.0])}
    # average (1 * [2, 4] + 1 * [4, 6]) / 2 = [3, 5]; x + 0.5 * ([3, 5] - [1, 1]) = [2, 3]
    result = _run("fedavg", [_u("a", w=[2.0, 4.0]), _u("b", w=[4.0, 6.0])], current, server_lr=0.5)
    assert result.tensors["w"].tolist() == [2.0, 3.0]
    assert result.tensors["other"].tolist() == [9.0]
    assert result.server_state == {}  # stateless
    # FFA: B average [3, 5] -> 0 + 2 * [3, 5]; A stays frozen
    ffa_current = {"q.lora_A.weight": torch.ones(2), "q.lora_B.weight": torch.zeros(2)}
    ffa = _run("ffa", [_u("a", **{"q.lora_B.weight": [3.0, 5.0]})], ffa_current, server_lr=2.0)
    assert ffa.tensors["q.lora_B.weight"].tolist() == [6.0, 10.0]
    assert ffa.tensors["q.lora_A.weight"].tolist() == [1.0, 1.0]
    # clipped: delta [0.5, 0.5] is within C = 2, so x = [1, 1] + 0.5 * [0.5, 0.5] = [1.25, 1.25]
    clipped = _run("clipped_fedavg", [_u("a", w=[1.5, 1.5])], current, clip_norm=2.0, server_lr=0.5)
    assert clipped.tensors["w"].tolist() == [1.25, 1.25]


@pytest.mark.parametrize("server_lr", [0.0, -1.0, math.nan, math.inf])
def test_server_lr_must_be_positive_and_finite(server_lr):
    for method in ("fedavg", "fedadam"):
        with pytest.raises(AggregationError, match="server_lr"):
            _run(method, [_u("a", w=[1.0])], {"w": torch.zeros(1)}, server_lr=server_lr)


def test_fedavgm_two_rounds_with_momentum():
    current = {"w": torch.tensor([1.0, 0.0]), "other": torch.tensor([9.0])}
    config = {"server_momentum": 0.5, "server_lr": 0.5}
    # round 1: avg (1 * [3, 4] + 3 * [3, 0]) / 4 = [3, 1]; delta = [2, 1]; m = 0.5 * 0 + [2, 1] = [2, 1];
    #          x = [1, 0] + 0.5 * [2, 1] = [2, 0.5]
    first = _run("fedavgm", [_u("a", 1, w=[3.0, 4.0]), _u("b", 3, w=[3.0, 0.0])], current, **config)
    assert first.tensors["w"].tolist() == [2.0, 0.5]
    assert first.tensors["other"].tolist() == [9.0]
    assert set(first.server_state) == {"m/w"} and first.server_state["m/w"].tolist() == [2.0, 1.0]
    # round 2: avg (2 * [4, 2] + 2 * [4, -1]) / 4 = [4, 0.5]; delta = [2, 0]; m = 0.5 * [2, 1] + [2, 0] = [3, 0.5];
    #          x = [2, 0.5] + 0.5 * [3, 0.5] = [3.5, 0.75] (the second coordinate moves on momentum alone)
    second = _run("fedavgm", [_u("a", 2, w=[4.0, 2.0]), _u("b", 2, w=[4.0, -1.0])], first.tensors,
                  first.server_state, **config)
    assert second.tensors["w"].tolist() == [3.5, 0.75]
    assert second.server_state["m/w"].tolist() == [3.0, 0.5]
    assert second.server_state["m/w"].dtype == torch.float32


def test_fedadam_two_rounds_starts_v_at_tau_squared():
    current = {"w": torch.zeros(2)}
    config = {"beta1": 0.5, "beta2": 0.75, "tau": 1.0, "server_lr": 1.0}
    # round 1: avg (1 * [3, -1] + 2 * [0, -1]) / 3 = [1, -1]; delta = [1, -1]
    #          m = 0.5 * 0 + 0.5 * delta = [0.5, -0.5]; v = 0.75 * tau^2 + 0.25 * delta^2 = [1, 1]
    #          x = 0 + m / (sqrt(1) + 1) = [0.25, -0.25]     (v0 = 0 would give m / (0.5 + 1) instead)
    first = _run("fedadam", [_u("a", 1, w=[3.0, -1.0]), _u("b", 2, w=[0.0, -1.0])], current, **config)
    assert first.tensors["w"].tolist() == [0.25, -0.25]
    assert first.server_state["m/w"].tolist() == [0.5, -0.5]
    assert first.server_state["v/w"].tolist() == [1.0, 1.0]
    # round 2: avg ([3.25, -1.25] + [1.25, -1.25]) / 2 = [2.25, -1.25]; delta = [2, -1]
    #          m = 0.5 * [0.5, -0.5] + 0.5 * [2, -1] = [1.25, -0.75]; v = 0.75 * [1, 1] + 0.25 * [4, 1] = [1.75, 1]
    #          x = [0.25 + 1.25 / (sqrt(1.75) + 1), -0.25 - 0.75 / 2]
    second = _run("fedadam", [_u("a", w=[3.25, -1.25]), _u("b", w=[1.25, -1.25])], first.tensors,
                  first.server_state, **config)
    assert second.tensors["w"].tolist() == pytest.approx([0.25 + 1.25 / (math.sqrt(1.75) + 1), -0.625], rel=1e-6)
    assert second.server_state["m/w"].tolist() == [1.25, -0.75]
    assert second.server_state["v/w"].tolist() == [1.75, 1.0]


def test_fedyogi_two_rounds_moves_v_by_a_fixed_step():
    current = {"w": torch.zeros(2)}
    config = {"beta1": 0.5, "beta2": 0.5, "tau": 1.0}
    # round 1: avg (1 * [6, 1] + 2 * [3, 1]) / 3 = [4, 1]; delta = [4, 1]; m = 0.5 * delta = [2, 0.5]
    #          v0 = tau^2 = 1: coordinate 0: delta^2 = 16 > 1 -> v = 1 + 0.5 * 16 = 9
    #                          coordinate 1: delta^2 = 1 = v -> sign 0 -> v = 1
    #          x = [2 / (3 + 1), 0.5 / (1 + 1)] = [0.5, 0.25]
    first = _run("fedyogi", [_u("a", 1, w=[6.0, 1.0]), _u("b", 2, w=[3.0, 1.0])], current, **config)
    assert first.tensors["w"].tolist() == [0.5, 0.25]
    assert first.server_state["m/w"].tolist() == [2.0, 0.5]
    assert first.server_state["v/w"].tolist() == [9.0, 1.0]
    # round 2: avg [2.5, 0.25]; delta = [2, 0]; m = 0.5 * [2, 0.5] + 0.5 * [2, 0] = [2, 0.25]
    #          coordinate 0: delta^2 = 4 < 9 -> v = 9 - 0.5 * 4 = 7 (Adam would give 0.5 * 9 + 0.5 * 4 = 6.5)
    #          coordinate 1: delta^2 = 0 -> v = 1
    #          x = [0.5 + 2 / (sqrt(7) + 1), 0.25 + 0.25 / 2]
    second = _run("fedyogi", [_u("a", 5, w=[2.5, 0.25])], first.tensors, first.server_state, **config)
    assert second.tensors["w"].tolist() == pytest.approx([0.5 + 2 / (math.sqrt(7) + 1), 0.375], rel=1e-6)
    assert second.server_state["v/w"].tolist() == [7.0, 1.0]
    adam = _run("fedadam", [_u("a", 5, w=[2.5, 0.25])], first.tensors, first.server_state, **config)
    assert adam.server_state["v/w"].tolist() == [6.5, 0.5]  # 0.5 * [9, 1] + 0.5 * [4, 0]


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_on_ffa_updates_step_b_and_leave_a_untouched(method):
    a = torch.tensor([[0.5, -1.0]])  # A: [r=1, in=2]
    current = {"q.lora_A.weight": a, "q.lora_B.weight": torch.zeros(2, 1)}  # B: [out=2, r=1]
    updates = [_u("a", **{"q.lora_B.weight": [[2.0], [-4.0]]}), _u("b", **{"q.lora_B.weight": [[0.0], [0.0]]})]
    result = _run(method, updates, current)  # default settings
    assert torch.equal(result.tensors["q.lora_A.weight"], a)
    slots = {"fedavgm": ["m"], "fedadam": ["m", "v"], "fedyogi": ["m", "v"]}[method]
    assert sorted(result.server_state) == [f"{slot}/q.lora_B.weight" for slot in slots]
    # delta = avg - 0 = [1, -2]; first step from m = 0 (and v = tau^2 = 1e-6):
    #   fedavgm: x = 1.0 * (0.9 * 0 + delta) = delta
    #   fedadam: m = 0.1 * delta, v = 0.99 * 1e-6 + 0.01 * delta^2, x = m / (sqrt(v) + 1e-3)
    #   fedyogi: delta^2 > v0, so v = 1e-6 + 0.01 * delta^2
    def expected(d: float) -> float:
        if method == "fedavgm":
            return d
        v = (0.99 * 1e-6 if method == "fedadam" else 1e-6) + 0.01 * d * d
        return 0.1 * d / (math.sqrt(v) + 1e-3)

    assert result.tensors["q.lora_B.weight"].flatten().tolist() == pytest.approx([expected(1.0), expected(-2.0)],
                                                                                 rel=1e-6)


def test_server_optimizer_on_plain_lora_keeps_state_for_a_and_b():
    current = {"q.lora_A.weight": torch.zeros(1, 2), "q.lora_B.weight": torch.zeros(2, 1)}
    updates = [_u("a", **{"q.lora_A.weight": [[1.0, 1.0]], "q.lora_B.weight": [[1.0], [1.0]]})]
    result = _run("fedadam", updates, current)
    assert sorted(result.server_state) == ["m/q.lora_A.weight", "m/q.lora_B.weight",
                                           "v/q.lora_A.weight", "v/q.lora_B.weight"]
    assert not torch.equal(result.tensors["q.lora_A.weight"], current["q.lora_A.weight"])


def _round_updates(round_index: int, job: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(100 * job + round_index)
    return [ClientUpdate(f"c{i}", {"q.lora_B.weight": torch.randn(4, 2, generator=g),
                                   "k.lora_B.weight": torch.randn(3, 2, generator=g)}, float(10 + i))
            for i in range(3)]


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi"])
def test_resumed_rounds_equal_uninterrupted_rounds(method):
    config = AggregationConfig(method=method, server_lr=0.7)
    start = {"q.lora_A.weight": torch.ones(2, 5), "q.lora_B.weight": torch.zeros(4, 2),
             "k.lora_A.weight": torch.ones(2, 5), "k.lora_B.weight": torch.zeros(3, 2)}

    # rounds 1..3 in one go: adapter and state handed on in memory
    adapter, state = start, None
    for r in range(1, 4):
        result = aggregate(_round_updates(r), current=adapter, config=config, server_state=state)
        adapter, state = result.tensors, result.server_state

    # the same job, restarted before every round from what the round engine stores (adapter version and
    # state, as safetensors bytes), with another job aggregated in between
    stored_adapter, stored_state = save_safetensors(start), b""
    for r in range(1, 4):
        aggregate(_round_updates(r, job=1), current=start, config=config)  # an unrelated job
        previous = load_safetensors(stored_state) if stored_state else None
        kept = {name: t.clone() for name, t in (previous or {}).items()}
        result = aggregate(_round_updates(r), current=load_safetensors(stored_adapter), config=config,
                           server_state=previous)
        assert all(torch.equal(previous[name], kept[name]) for name in kept)  # the input state is not modified
        stored_adapter, stored_state = save_safetensors(result.tensors), save_safetensors(result.server_state)

    resumed_adapter, resumed_state = load_safetensors(stored_adapter), load_safetensors(stored_state)
    assert adapter.keys() == resumed_adapter.keys() and state.keys() == resumed_state.keys()
    assert all(torch.equal(adapter[name], resumed_adapter[name]) for name in adapter)
    assert all(torch.equal(state[name], resumed_state[name]) for name in state)
    assert torch.equal(adapter["q.lora_A.weight"], start["q.lora_A.weight"])  # A was never sent


def test_empty_state_is_a_fresh_start():
    updates = [_u("a", w=[2.0])]
    fresh = _run("fedadam", updates, {"w": torch.zeros(1)})
    assert torch.equal(_run("fedadam", updates, {"w": torch.zeros(1)}, {}).tensors["w"], fresh.tensors["w"])


def test_server_state_that_does_not_match_the_updates_is_refused():
    current = {"w": torch.zeros(2), "u": torch.zeros(1)}
    updates = [_u("a", w=[1.0, 1.0])]
    good = {"m/w": torch.zeros(2), "v/w": torch.ones(2)}
    with pytest.raises(AggregationError, match=r"'m/w' has shape \[3\], the update \[2\]"):
        _run("fedadam", updates, current, {**good, "m/w": torch.zeros(3)})
    with pytest.raises(AggregationError, match="lacks 'v/w'"):  # a FedAvgM state fed to FedAdam
        _run("fedadam", updates, current, {"m/w": torch.zeros(2)})
    with pytest.raises(AggregationError, match="'m/u'"):  # state of a tensor this round's updates do not carry
        _run("fedadam", updates, current, {**good, "m/u": torch.zeros(1)})
    with pytest.raises(AggregationError, match="'v/w' holds non-finite"):
        _run("fedyogi", updates, current, {**good, "v/w": torch.tensor([1.0, math.nan])})


@pytest.mark.parametrize(("method", "setting", "value"), [
    ("fedavgm", "server_momentum", 1.0),
    ("fedavgm", "server_momentum", -0.1),
    ("fedadam", "beta1", 1.0),
    ("fedadam", "beta2", math.nan),
    ("fedyogi", "beta2", 1.5),
    ("fedyogi", "tau", 0.0),
    ("fedadam", "tau", math.inf),
])
def test_server_optimizer_settings_are_checked(method, setting, value):
    with pytest.raises(AggregationError, match=setting):
        _run(method, [_u("a", w=[1.0])], {"w": torch.zeros(1)}, **{setting: value})


def test_server_optimizer_refuses_a_shape_the_adapter_does_not_have():
    with pytest.raises(AggregationError, match=r"'w' of shape \[2\], the adapter \[1, 2\]"):
        _run("fedavgm", [_u("a", w=[1.0, 1.0])], {"w": torch.zeros(1, 2)})


# ---------------------------------------------------------------------------------------------
# Weight cap


def test_cap_weights_lowers_a_huge_claim_to_its_capped_share():
    weights = {"a": 100.0, "b": 100.0, "c": 100.0, "big": 1e12}
    capped = cap_weights(weights, 1.5)
    # cap c = 1.5 * (300 + c) / 4  ->  c = 1.5 * 300 / (4 - 1.5) = 180; share 180 / 480 = 0.375 = 1.5 / 4
    assert capped == {"a": 100.0, "b": 100.0, "c": 100.0, "big": 180.0}
    assert capped["big"] / sum(capped.values()) == 0.375
    assert list(capped) == list(weights)


def test_cap_weights_at_the_boundary_and_without_a_cap_leaves_weights_unchanged():
    weights = {"a": 100.0, "b": 200.0, "c": 300.0}
    assert cap_weights(weights, 1.5) == weights  # 300 / 600 = 0.5 = 1.5 / 3 exactly: not above the cap
    assert cap_weights({"a": 1.0, "big": 1e12}, None) == {"a": 1.0, "big": 1e12}
    assert cap_weights({"a": 1.0, "b": 5.0, "c": 9.0}, 3.0) == {"a": 1.0, "b": 5.0, "c": 9.0}  # 3 >= K
    assert cap_weights({}, 1.5) == {}


def test_cap_weights_two_outliers_need_a_second_pass():
    weights = {"a": 100.0, "b": 100.0, "c": 100.0, "big": 1e9, "huge": 1e10}
    # pass 1: c = 1.5 * (1.1e10 + 300) / 5 ~ 3.3e9: only "huge" is above
    # pass 2: c = 1.5 * (1e9 + 300) / (5 - 1.5) ~ 4.3e8: "big" is above too
    # pass 3: c = 1.5 * 300 / (5 - 1.5 * 2) = 225; 100 < 225. Shares: 225 / 750 = 0.3 = 1.5 / 5
    capped = cap_weights(weights, 1.5)
    assert capped == {"a": 100.0, "b": 100.0, "c": 100.0, "big": 225.0, "huge": 225.0}
    assert capped["huge"] / sum(capped.values()) == pytest.approx(0.3)


def test_cap_weights_of_one_equal_share_makes_every_client_equal():
    # pass 1: c = 6 / 3 = 2 -> cap 3; pass 2: c = 3 / (3 - 1) = 1.5 -> cap 2; pass 3: c = 1 / (3 - 2) = 1
    assert cap_weights({"a": 1.0, "b": 2.0, "c": 3.0}, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}


@pytest.mark.parametrize(("weights", "max_multiple", "match"), [
    ({"a": 1.0, "b": 0.0}, 1.5, "'b': weight 0.0"),
    ({"a": 1.0, "b": -2.0}, None, "'b': weight -2.0"),
    ({"a": math.inf, "b": 1.0}, 1.5, "'a': weight inf"),
    ({"a": math.nan, "b": 1.0}, 1.5, "'a': weight nan"),
    ({"a": 1.0, "b": 1.0}, 0.5, "max_weight_multiple 0.5"),
    ({"a": 1.0, "b": 1.0}, math.nan, "max_weight_multiple nan"),
])
def test_cap_weights_refuses_bad_input(weights, max_multiple, match):
    with pytest.raises(AggregationError, match=match):
        cap_weights(weights, max_multiple)


def test_new_settings_defaults():
    config = AggregationConfig()
    assert (config.server_lr, config.server_momentum, config.beta1, config.beta2, config.tau) == (
        1.0, 0.9, 0.9, 0.99, 1e-3)
    assert config.max_weight_multiple == 1.5
