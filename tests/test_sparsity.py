"""The pure math of peft_roselora.sparsity, tested alone."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_roselora import sparsity


def test_schedule_authors_editing_values():
    tau, start, end = 0.05, 3, 20
    values = [sparsity.keep_ratio_at(step, tau, start, end) for step in range(0, 26)]
    assert values[:4] == [1.0, 1.0, 1.0, 1.0]
    assert values[4] == pytest.approx(0.842, abs=1e-3)
    assert all(value == tau for value in values[20:])
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))
    # an interior point worked by hand: 0.05 + 0.95 * (10/17)^3 = 0.05 + 950/4913
    assert values[10] == pytest.approx(0.2433645, abs=1e-7)


@pytest.mark.parametrize(
    "value,total,round_up,expected",
    [
        (3, 25, False, 3),
        (0.1, 10, False, 1),
        (0.8, 10, True, 8),
        (0.7, 10, True, 7),
        (0.1, 25, False, 2),
        (0.8, 25, True, 20),
        (1.0, 7, True, 7),
        (0.0, 7, False, 0),
    ],
)
def test_resolve_step(value, total, round_up, expected):
    assert sparsity.resolve_step(value, total, round_up=round_up) == expected


def test_kept_count_rounds_up_ignoring_float_noise():
    assert sparsity.kept_count(0.1, 30) == 3  # 0.1 * 30 == 3.0000000000000004
    assert sparsity.kept_count(0.05, 64) == 4  # 3.2 -> 4
    assert sparsity.kept_count(0.001, 10) == 1  # at least one entry
    assert sparsity.kept_count(1.0, 10) == 10


def test_row_topk_masks_keep_the_largest_per_row_with_grouping():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(6, 9, generator=generator) for _ in range(3)] + [torch.rand(4, 5, generator=generator)]
    keeps = [3, 3, 2, 5]  # two tensors share a group, one differs by keep, one by shape (and keeps everything)
    masks = sparsity.row_topk_masks(scores, keeps)
    for score, keep, mask in zip(scores, keeps, masks):
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert (mask.sum(dim=1) == min(keep, score.shape[1])).all()
        # every kept score is >= every dropped score in the same row, and equals the per-tensor topk
        kept_min = score.masked_fill(~mask, math.inf).amin(dim=1)
        dropped_max = score.masked_fill(mask, -math.inf).amax(dim=1)
        assert (kept_min >= dropped_max).all()
        reference = torch.zeros_like(mask).scatter_(1, score.topk(min(keep, score.shape[1]), dim=1).indices, True)
        assert torch.equal(mask, reference)


def test_importance_emas_first_update_then_smoothing_for_many_factors():
    weights = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5], [3.0]])]
    grads = [torch.tensor([[3.0, 0.5]]), torch.tensor([[2.0], [-1.0]])]
    first = sparsity.update_importance_emas([None, None], weights, grads, beta=0.8)
    assert torch.equal(first[0], torch.tensor([[3.0, 1.0]])) and torch.equal(first[1], torch.tensor([[1.0], [3.0]]))
    kept = first[0]
    second = sparsity.update_importance_emas([first[0], None], weights, [torch.tensor([[0.0, 1.0]]), grads[1]], 0.8)
    assert second[0] is kept  # updated in place
    assert torch.allclose(second[0], torch.tensor([[0.8 * 3.0, 0.8 * 1.0 + 0.2 * 2.0]]))
    assert torch.equal(second[1], torch.tensor([[1.0], [3.0]]))
    half = sparsity.update_importance_emas([None], [weights[0].bfloat16()], [grads[0].bfloat16()], beta=0.8)
    assert half[0].dtype == torch.float32


def test_bfloat16_importance_is_the_fp32_update_rounded_once():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)]
    grads = [torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)]
    first = sparsity.update_importance_emas([None, None], weights, grads, 0.8, dtype=torch.bfloat16)
    assert all(ema.dtype == torch.bfloat16 for ema in first)
    assert all(torch.equal(ema, (w * g).abs().bfloat16()) for ema, w, g in zip(first, weights, grads))
    stored = [ema.clone() for ema in first]
    new_grads = [torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)]
    second = sparsity.update_importance_emas(first, weights, new_grads, 0.8, dtype=torch.bfloat16)
    assert second[0] is first[0]  # in place
    for ema, old, w, g in zip(second, stored, weights, new_grads):
        expected = ((w * g).abs() * 0.2 + old.float() * 0.8).bfloat16()
        assert ema.dtype == torch.bfloat16 and torch.equal(ema, expected)


@pytest.mark.parametrize(
    "value, finite",
    [(1.0, True), (1e30, True), (-3e38, True), (math.nan, False), (math.inf, False), (-math.inf, False)],
)
def test_all_finite_is_exact_also_where_the_two_norm_overflows(value, finite):
    # 1e30 and -3e38 are finite but their squares overflow the fast 2-norm check: the exact check must say finite
    tensors = [torch.ones(3, 4), torch.tensor([[0.5, value]]), torch.empty(0, 4)]
    assert sparsity.all_finite(tensors) is finite
    assert sparsity.all_finite([torch.empty(0)]) is True


def _random_factors(rank, in_features, out_features, row_densities, col_densities, seed):
    generator = torch.Generator().manual_seed(seed)
    weight_a = torch.zeros(rank, in_features)
    weight_b = torch.zeros(out_features, rank)
    for i in range(rank):  # building test inputs, not a hot path
        kept_a = max(1, round(row_densities[i] * in_features))
        kept_b = max(1, round(col_densities[i] * out_features))
        weight_a[i, torch.randperm(in_features, generator=generator)[:kept_a]] = torch.randn(
            kept_a, generator=generator
        )
        weight_b[torch.randperm(out_features, generator=generator)[:kept_b], i] = torch.randn(
            kept_b, generator=generator
        )
    return weight_a, weight_b


@settings(max_examples=150, deadline=None)
@given(
    rank=st.integers(1, 8),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    densities=st.lists(st.floats(0.0, 1.0), min_size=16, max_size=16),
    seed=st.integers(0, 10_000),
)
def test_proposition1_density_bound_holds(rank, in_features, out_features, densities, seed):
    weight_a, weight_b = _random_factors(rank, in_features, out_features, densities[:8], densities[8:], seed)
    product = weight_b @ weight_a
    density = torch.count_nonzero(product).item() / product.numel()
    bound = sparsity.proposition1_density_bound(weight_a, weight_b)
    assert density <= bound + 1e-12
    # the paper's form: s(BA) >= max(0, 1 + sum_i [s(A_i) + s(B_i) - s(A_i) s(B_i)] - r)
    zeros_a = 1 - sparsity.factor_density(weight_a, dim=1)
    zeros_b = 1 - sparsity.factor_density(weight_b, dim=0)
    lower = max(0.0, 1 + (zeros_a + zeros_b - zeros_a * zeros_b).sum().item() - rank)
    assert 1 - density >= lower - 1e-6


def test_nominal_bound_is_r_tau_squared_for_whole_counts():
    assert sparsity.nominal_density_bound(8, 0.05, 400, 200) == pytest.approx(8 * 0.05**2)
    # rounding up to whole entries: 0.05 * 64 = 3.2 -> 4 kept of 64
    assert sparsity.nominal_density_bound(8, 0.05, 64, 64) == pytest.approx(8 * (4 / 64) ** 2)
    assert sparsity.nominal_density_bound(64, 1.0, 4, 4) == 1.0


def test_module_sparsity_counts():
    weight_a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # (r=2, in=3)
    weight_b = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # (out=4, r=2)
    row = sparsity.module_sparsity("m", weight_a, weight_b, weight_b @ weight_a, keep_ratio=0.5)
    assert (row.nonzeros_a, row.nonzeros_b, row.factor_nonzeros, row.factor_numel) == (2, 2, 4, 14)
    assert row.delta_nonzeros == 2 and row.delta_numel == 12
    assert row.max_row_density_a == pytest.approx(1 / 3) and row.max_col_density_b == pytest.approx(1 / 4)
    assert row.proposition1_bound == pytest.approx(1 / 6)  # by hand: rows of A 1/3 each, columns of B 1/4 each
    assert row.delta_density == pytest.approx(1 / 6)  # the bound is tight here: B @ A has 2 of 12 entries


def test_the_ema_update_follows_the_processes_agreement_on_finiteness():
    """Under FSDP2 each process sees only its rows: a non-finite gradient on another process (``agree`` says not
    finite) must skip this process's update too, and an agreement of finite lets it run."""
    weights, grads = [torch.randn(2, 3), torch.randn(3, 2)], [torch.randn(2, 3), torch.randn(3, 2)]
    emas = [torch.rand(2, 3), torch.rand(3, 2)]
    before = [e.clone() for e in emas]
    seen = []

    def another_process_saw_a_nan(flag):
        seen.append(bool(flag))
        return False

    assert sparsity.update_importance_emas(emas, weights, grads, 0.85, agree=another_process_saw_a_nan) is None
    assert seen == [True] and all(torch.equal(e, b) for e, b in zip(emas, before))  # locally finite, not touched
    updated = sparsity.update_importance_emas(emas, weights, grads, 0.85, agree=lambda flag: flag)
    assert updated is not None and not torch.equal(updated[0], before[0])
