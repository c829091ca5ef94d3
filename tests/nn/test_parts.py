"""Interaction parts: FM, DCN-V2 cross network, DIN target attention, checked against their formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from recforge.nn import CrossNetwork, FactorizationMachine, TargetAttention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a loaded 2-core machine, OpenMP threads spinning for each other
    cost 50x more than the math, so the file runs single-threaded (and restores the setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ---------------------------------------------------------------- factorization machine


def test_fm_equals_sum_over_field_pairs():
    torch.manual_seed(0)
    fields = torch.randn(5, 4, 3, dtype=torch.float64)
    expected = torch.zeros(5, dtype=torch.float64)
    for i, j in itertools.combinations(range(4), 2):
        expected += (fields[:, i] * fields[:, j]).sum(-1)
    out = FactorizationMachine()(fields)
    assert out.shape == (5, 1)
    torch.testing.assert_close(out[:, 0], expected)


def test_fm_single_field_has_no_pairs():
    assert torch.equal(FactorizationMachine()(torch.randn(3, 1, 8)), torch.zeros(3, 1))


# ---------------------------------------------------------------- cross network


def test_cross_layers_follow_dcn_v2_formula():
    torch.manual_seed(0)
    net = CrossNetwork(6, num_layers=2).double()
    x0 = torch.randn(4, 6, dtype=torch.float64)
    x = x0
    for layer in net.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x0), x)


def test_low_rank_cross_is_u_v_transpose_with_fewer_parameters():
    torch.manual_seed(0)
    dim, rank = 32, 4
    low = CrossNetwork(dim, num_layers=1, low_rank=rank).double()
    v_t, u = low.layers[0][0], low.layers[0][1]
    w = u.weight @ v_t.weight  # [dim, rank] @ [rank, dim]
    x0 = torch.randn(3, dim, dtype=torch.float64)
    torch.testing.assert_close(low(x0), x0 * (x0 @ w.T + u.bias) + x0)
    full = CrossNetwork(dim, num_layers=1)
    assert sum(p.numel() for p in low.parameters()) == 2 * dim * rank + dim
    assert sum(p.numel() for p in full.parameters()) == dim * dim + dim


def test_one_cross_layer_learns_a_product_a_linear_model_cannot():
    torch.manual_seed(0)
    x = torch.randn(2048, 2)
    y = x[:, 0] * x[:, 1]

    def fit(model: nn.Module) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            loss = ((model(x).squeeze(-1) - y) ** 2).mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    assert fit(nn.Sequential(CrossNetwork(2, 1), nn.Linear(2, 1))) < 0.01
    assert fit(nn.Linear(2, 1)) > 0.5  # var(x1 * x2) = 1: no linear function explains it


@pytest.mark.parametrize("args", [(0, 1), (4, 0)])
def test_cross_network_rejects_empty_shapes(args):
    with pytest.raises(ValueError):
        CrossNetwork(*args)
    with pytest.raises(ValueError, match="low_rank"):
        CrossNetwork(4, 1, low_rank=0)


# ---------------------------------------------------------------- target attention


def _naive_attention(unit: TargetAttention, query: torch.Tensor, history: torch.Tensor, offsets: list[int]):
    """One user at a time, exactly as the DIN paper writes the activation unit."""
    rows = []
    for b in range(query.shape[0]):
        h = history[offsets[b] : offsets[b + 1]]
        q = query[b].expand_as(h)
        w = unit.score(unit.mlp(torch.cat([h, q, h - q, h * q], dim=1)))
        rows.append((w * h).sum(0))
    return torch.stack(rows)


def _jagged(seed: int, lengths: list[int], dim: int):
    g = torch.Generator().manual_seed(seed)
    offsets = [0, *itertools.accumulate(lengths)]
    query = torch.randn(len(lengths), dim, generator=g, dtype=torch.float64)
    history = torch.randn(offsets[-1], dim, generator=g, dtype=torch.float64)
    return query, history, offsets


def test_target_attention_matches_per_user_loop_including_empty_histories():
    torch.manual_seed(0)
    unit = TargetAttention(8, hidden=[16, 8]).double()
    lengths = [3, 0, 1, 7, 0, 2]
    query, history, offsets = _jagged(1, lengths, 8)
    out = unit(query, history, torch.tensor(offsets))
    torch.testing.assert_close(out, _naive_attention(unit, query, history, offsets))
    assert torch.equal(out[1], torch.zeros(8, dtype=torch.float64)) and torch.equal(out[4], out[1])
    # Lengths are the same jagged layout said differently.
    torch.testing.assert_close(unit(query, history, lengths=torch.tensor(lengths)), out)


def test_target_attention_scripts_and_backpropagates():
    torch.manual_seed(0)
    unit = TargetAttention(4)
    query, history, offsets = _jagged(2, [2, 5, 0], 4)
    query, history = query.float().requires_grad_(), history.float().requires_grad_()
    scripted = torch.jit.script(unit)
    out = unit(query, history, torch.tensor(offsets))
    torch.testing.assert_close(scripted(query, history, torch.tensor(offsets)), out, rtol=0, atol=0)
    out.sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert unit.mlp.layers[0].weight.grad.abs().sum() > 0


def test_target_attention_weights_are_not_normalized():
    """DIN drops softmax: the same history given twice pools to twice the vector (softmax would not)."""
    torch.manual_seed(0)
    unit = TargetAttention(4)
    query, history, _ = _jagged(3, [3], 4)
    query, history = query.float(), history.float()
    once = unit(query, history, lengths=torch.tensor([3]))
    twice = unit(query, torch.cat([history, history]), lengths=torch.tensor([6]))
    torch.testing.assert_close(twice, 2 * once)


def test_target_attention_all_histories_empty_and_bad_layouts():
    unit = TargetAttention(4)
    query = torch.randn(3, 4)
    assert torch.equal(unit(query, torch.zeros(0, 4), lengths=torch.zeros(3, dtype=torch.long)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="needs offsets"):
        unit(query, torch.zeros(0, 4))
    with pytest.raises(ValueError, match="batch \\+ 1"):
        unit(query, torch.randn(5, 4), torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="history rows"):
        unit(query, torch.randn(5, 4), lengths=torch.tensor([1, 1, 1]))
