"""The schedule's pure decisions and its state owner, alone (no model): exact expected values."""

from __future__ import annotations

import math

import pytest
import torch

from peft_roselora import RoseLoraConfig, sparsity
from peft_roselora.schedule import (
    AdapterSchedule,
    ScheduleStateError,
    clamp_bound,
    importance_still_used,
    replay_last_keep_ratio,
    selection_scores,
    should_mask_gradients,
    should_recompute_masks,
)


def test_final_prune_at_t_f_runs_even_off_the_interval_grid():
    # t_i = 2, t_f = 10, interval 3: grid steps 5, 8, 11; t_f = 10 is off the grid and must still select
    decisions = {
        step: should_recompute_masks(step, sparsity.keep_ratio_at(step, 0.1, 2, 10), 2, 10, 3, False, None)
        for step in range(1, 13)
    }
    assert [step for step, recompute in decisions.items() if recompute] == [5, 8, 10, 11]


def test_persistent_mode_skips_selection_at_an_unchanged_keep_ratio():
    assert should_recompute_masks(12, 0.1, 2, 10, 1, persistent=True, last_keep_ratio=0.1) is False
    assert should_recompute_masks(12, 0.1, 2, 10, 1, persistent=False, last_keep_ratio=0.1) is True
    assert should_recompute_masks(2, 1.0, 2, 10, 1, persistent=False, last_keep_ratio=None) is False  # dense


def test_clamp_starts_after_t_i_and_importance_stops_when_persistent_masks_are_final():
    assert [clamp_bound(step, 3, 3e-3) for step in (2, 3, 4)] == [None, None, 3e-3]
    assert clamp_bound(10, 3, None) is None
    assert importance_still_used(True, 0.1, 0.1) is False
    assert importance_still_used(True, 0.5, 0.1) is True
    assert importance_still_used(False, 0.1, 0.1) is True


def test_gradients_are_masked_in_persistent_mode_once_something_is_pruned():
    assert should_mask_gradients(True, [True, False]) is True
    assert should_mask_gradients(True, [True, True]) is False
    assert should_mask_gradients(False, [False, False]) is False


def test_pruned_entries_score_minus_one_in_persistent_mode_only():
    importance = torch.tensor([[5.0, 1.0, 3.0]])
    mask = torch.tensor([[False, True, True]])
    assert selection_scores(importance, mask, persistent=True).tolist() == [[-1.0, 1.0, 3.0]]
    assert selection_scores(importance, mask, persistent=False) is importance
    # the highest importance sits on a pruned entry: persistent selection keeps the kept ones
    top = sparsity.row_topk_masks([selection_scores(importance, mask, True)], [2])[0]
    assert top.tolist() == [[False, True, True]]


def _config(**overrides):
    values = dict(r=2, target_modules=["q"], keep_ratio=0.5, total_step=10, prune_start_step=2, prune_end_step=6)
    values.update(overrides)
    return RoseLoraConfig(**values)


def _record(schedule, grads_scale=1.0, nan=False):
    weight_a, weight_b = torch.ones(2, 4), torch.ones(4, 2)
    grad_a, grad_b = torch.full((2, 4), grads_scale), torch.full((4, 2), 2 * grads_scale)
    if nan:
        grad_a[0, 0] = math.nan
    return schedule.record_importance(["m"], [weight_a, weight_b], [grad_a, grad_b])


def test_ema_is_exact_and_a_non_finite_step_leaves_it_and_is_counted():
    schedule = AdapterSchedule(_config(importance_beta=0.5))
    assert _record(schedule, 1.0) is True
    schedule.advance()
    assert _record(schedule, 3.0) is True
    schedule.advance()
    assert schedule.importance_A["m"].unique().tolist() == [2.0]  # 0.5 * 1 + 0.5 * 3
    assert _record(schedule, 100.0, nan=True) is False
    plan = schedule.advance()
    assert schedule.importance_A["m"].unique().tolist() == [2.0] and schedule.importance_B["m"].unique().tolist() == [
        4.0
    ]
    assert (plan.step, plan.importance_was_finite, schedule.nonfinite_steps, schedule.skipped_steps) == (
        3,
        False,
        1,
        0,
    )


def test_skip_keeps_t_and_counts_and_double_drive_is_refused():
    schedule = AdapterSchedule(_config())
    _record(schedule)
    schedule.skip()
    assert (schedule.step, schedule.skipped_steps, schedule.importance_pending) == (0, 1, False)
    _record(schedule)
    with pytest.raises(RuntimeError, match="ran twice in one optimizer step"):
        _record(schedule)
    schedule.advance()
    with pytest.raises(RuntimeError, match="without a preceding update_importance"):
        schedule.advance()
    gradient = torch.zeros(3)
    schedule.check_new_gradients(gradient)
    schedule.remember_gradient(gradient)
    with pytest.raises(RuntimeError, match="driven twice on the same gradients"):
        schedule.check_new_gradients(gradient)
    gradient.add_(1.0)  # a new backward accumulating into the same tensor bumps its version
    schedule.check_new_gradients(gradient)


def test_set_step_refuses_negative_and_decreasing_steps():
    schedule = AdapterSchedule(_config())
    schedule.set_step(4)
    with pytest.raises(
        ValueError, match="`global_step` must increase from call to call: got 3 after the schedule reached step 4"
    ):
        schedule.set_step(3)
    with pytest.raises(ValueError, match="`global_step` must be an integer >= 0, got -1"):
        schedule.set_step(-1)


def test_state_dict_round_trip_and_named_refusals():
    schedule = AdapterSchedule(_config())
    for _ in range(4):
        _record(schedule)
        schedule.advance()
    state = schedule.state_dict()
    assert (state["step"], state["last_keep_ratio"]) == (4, sparsity.keep_ratio_at(4, 0.5, 2, 6))
    shapes, devices = {"m": ((2, 4), (4, 2))}, {"m": torch.device("cpu")}
    restored = AdapterSchedule(_config())
    restored.load_state_dict(state, shapes, devices)
    assert restored.state_dict()["step"] == 4 and torch.equal(restored.importance_B["m"], schedule.importance_B["m"])
    with pytest.raises(ScheduleStateError, match=r"'importance_A' of module 'm' has shape \(3, 4\), expected"):
        restored.load_state_dict({**state, "importance_A": {"m": torch.zeros(3, 4)}}, shapes, devices)
    with pytest.raises(ScheduleStateError, match="names module 'other', which this adapter does not have"):
        restored.load_state_dict({**state, "importance_B": {"other": torch.zeros(4, 2)}}, shapes, devices)
    with pytest.raises(ScheduleStateError, match="has keys"):
        restored.load_state_dict({**state, "extra": 1}, shapes, devices)
    with pytest.raises(ScheduleStateError, match="'step' must be an int >= 0, got -2"):
        restored.load_state_dict({**state, "step": -2}, shapes, devices)
    different = AdapterSchedule(_config(keep_ratio=0.25))
    with pytest.raises(ScheduleStateError, match="written with keep_ratio=0.5, this adapter has keep_ratio=0.25"):
        different.load_state_dict(state, shapes, devices)
    longer = AdapterSchedule(_config(total_step=20))
    with pytest.raises(ScheduleStateError, match="written with total_step=10, this adapter has total_step=20"):
        longer.load_state_dict(state, shapes, devices)


@pytest.mark.parametrize("mode,interval", [("reselect", 1), ("persistent", 1), ("persistent", 3)])
def test_replayed_last_keep_ratio_equals_the_live_one(mode, interval):
    config = _config(prune_mode=mode, prune_interval=interval, total_step=12, prune_end_step=9)
    schedule = AdapterSchedule(config)
    for step in range(1, 13):
        _record(schedule) if schedule.importance_needed() else schedule.mark_importance_not_needed()
        schedule.advance()
        assert replay_last_keep_ratio(config, step) == schedule.last_keep_ratio, step
    # persistent masks are final from t_f on: the EMAs are released (memory), and the state says so
    assert (schedule.importance_A == {}) is (mode == "persistent")
    assert (schedule.state_dict()["importance_B"] == {}) is (mode == "persistent")


def test_apply_masks_zeroes_nan_and_inf_in_pruned_entries_exactly():
    weight = torch.tensor([[math.nan, 1.0, math.inf], [2.0, -math.inf, 3.0]])
    mask = torch.tensor([[False, True, False], [True, False, True]])
    assert sparsity.apply_masks_([weight], [mask]) == 0
    assert weight.tolist() == [[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]
    kept_nan = torch.tensor([[math.nan, 1.0]])
    assert sparsity.apply_masks_([kept_nan], [torch.tensor([[True, False]])]) == 1  # named, not hidden
    assert math.isnan(kept_nan[0, 0]) and kept_nan[0, 1] == 0.0


def test_importance_update_refuses_non_finite_values_without_touching_the_emas():
    previous = [torch.ones(2, 2)]
    grads = [torch.tensor([[1.0, math.inf], [1.0, 1.0]])]
    assert sparsity.update_importance_emas(previous, [torch.ones(2, 2)], grads, 0.8) is None
    assert previous[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
