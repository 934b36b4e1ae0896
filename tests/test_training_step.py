"""The training step (spec section 5): kept counts, reference equivalence with the authors' step, API errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama, random_batch, train_steps
from peft import LoraConfig, get_peft_model

import peft_roselora
from peft_roselora import RoseLoraConfig, RoseLoraLayer


EDIT_SCHEDULE = {"keep_ratio": 0.05, "prune_start_step": 3, "prune_end_step": 20, "total_step": 25}


def _roselora(model, **overrides):
    kwargs = {
        "r": 8,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.1,
        "init_lora_weights": "gaussian",
        **EDIT_SCHEDULE,
    }
    kwargs.update(overrides)
    return get_peft_model(model, RoseLoraConfig(**kwargs))


def _rose_layers(model):
    return [m for m in model.modules() if isinstance(m, RoseLoraLayer)]


@pytest.mark.parametrize("prune_mode", ["reselect", "persistent"])
def test_kept_counts_after_every_prune(prune_mode):
    model = _roselora(make_tiny_llama(), prune_mode=prune_mode)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    model.train()
    for step in range(1, 26):
        ids = random_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keep_ratio = model.current_keep_ratio()
        for layer in _rose_layers(model):
            weight_a = layer.lora_A["default"].weight
            weight_b = layer.lora_B["default"].weight
            max_a = math.ceil(keep_ratio * layer.in_features)
            max_b = math.ceil(keep_ratio * layer.out_features)
            row_counts = torch.count_nonzero(weight_a, dim=1)
            col_counts = torch.count_nonzero(weight_b, dim=0)
            assert (row_counts <= max_a).all() and (col_counts <= max_b).all(), step
            assert (layer.lora_mask_A["default"].sum(dim=1) == max_a).all()
            assert (layer.lora_mask_B["default"].sum(dim=0) == max_b).all()
            if step > 3:
                assert (row_counts >= 1).all() and (col_counts >= 1).all()
            # pruned entries are exactly zero in the weights after every prune
            assert not weight_a[~layer.lora_mask_A["default"]].any()
            assert not weight_b[~layer.lora_mask_B["default"]].any()
    assert model.steps_taken() == 25
    assert model.current_keep_ratio() == 0.05
    report = model.sparsity_report()
    assert report.keep_ratio_reached == pytest.approx(math.ceil(0.05 * 64) / 64)
    assert report.within_bounds


def _reference_authors_training(model, steps, lr, clamp_value=None):
    """An independent, straightforward implementation of the authors' step on plain PEFT LoRA (spec section 5)."""
    tau, t_i, t_f, beta = 0.05, 3, 20, 0.8
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    ema = {}
    model.train()
    for t in range(1, steps + 1):
        torch.manual_seed(1000 + t)  # dropout
        ids = random_batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                importance = (p * p.grad).abs()
                ema[name] = importance if name not in ema else beta * ema[name] + (1 - beta) * importance
        optimizer.step()
        optimizer.zero_grad()
        if t <= t_i:
            current = 1.0
        elif t >= t_f:
            current = tau
        else:
            current = tau + (1 - tau) * (1 - (t - t_i) / (t_f - t_i)) ** 3
        with torch.no_grad():
            for name, p in params.items():
                if current < 1.0:
                    if "lora_A" in name:  # rows of A, shape (r, in)
                        keep = math.ceil(current * p.shape[1])
                        keep_idx = ema[name].topk(keep, dim=1).indices
                        mask = torch.zeros_like(p).scatter_(1, keep_idx, 1.0)
                    else:  # columns of B, shape (out, r)
                        keep = math.ceil(current * p.shape[0])
                        keep_idx = ema[name].topk(keep, dim=0).indices
                        mask = torch.zeros_like(p).scatter_(0, keep_idx, 1.0)
                    p.mul_(mask)
                if clamp_value is not None and t > t_i:
                    p.clamp_(-clamp_value, clamp_value)
    return params


@pytest.mark.parametrize("clamp_value", [None, 3e-3])
def test_matches_independent_reference_of_the_authors_step(clamp_value):
    base = make_tiny_llama(seed=3)
    rose = _roselora(copy.deepcopy(base), clamp_value=clamp_value)
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    # the same random initialisation for both
    lora.load_state_dict({k: v for k, v in rose.state_dict().items() if "lora_mask" not in k}, strict=False)
    for name, p in lora.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, rose.get_parameter(name))
    lr = 2e-2
    reference = _reference_authors_training(lora, steps=25, lr=lr, clamp_value=clamp_value)

    optimizer = torch.optim.Adam([p for p in rose.parameters() if p.requires_grad], lr=lr)
    rose.train()
    for t in range(1, 26):
        torch.manual_seed(1000 + t)
        ids = random_batch(t)
        rose(input_ids=ids, labels=ids).loss.backward()
        rose.update_importance()
        optimizer.step()
        rose.prune_step()
        optimizer.zero_grad()

    compared = 0
    for name, expected in reference.items():
        actual = rose.get_parameter(name)
        assert torch.equal(actual == 0, expected == 0), name
        assert torch.allclose(actual, expected, atol=1e-6, rtol=0), name
        compared += 1
    assert compared == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # the reference reached the final sparsity too, so the comparison is not between two dense adapters
    assert all(torch.count_nonzero(p) <= math.ceil(0.05 * 64) * 8 for p in reference.values())


def test_update_and_allocate_is_importance_then_prune():
    model = _roselora(make_tiny_llama())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for global_step in range(25):
        ids = random_batch(global_step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        ratios = model.update_and_allocate(global_step)
        optimizer.zero_grad()
    assert ratios == {"default": 0.05}
    assert model.steps_taken() == 25
    assert model.sparsity_report().within_bounds


def test_optimizer_hooks_can_be_removed():
    model = _roselora(make_tiny_llama())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 2)
    assert model.steps_taken() == 2
    handle.remove()
    train_steps(model, optimizer, 2)
    assert model.steps_taken() == 2


def test_persistent_mode_never_revives_a_pruned_entry():
    model = _roselora(make_tiny_llama(), prune_mode="persistent")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    previous = None
    for step in range(25):
        train_steps(model, optimizer, 1, seed=step)
        masks = [layer.lora_mask_A["default"].clone() for layer in _rose_layers(model)]
        if previous is not None:
            for before, after in zip(previous, masks):
                assert not (after & ~before).any()
        previous = masks


def test_update_importance_without_gradients_is_an_error():
    model = _roselora(make_tiny_llama())
    with pytest.raises(RuntimeError, match="found no gradient on lora_A"):
        model.update_importance()
    with pytest.raises(RuntimeError, match="found no gradient"):
        model.update_and_allocate(0)


def test_prune_step_without_importance_is_an_error():
    model = _roselora(make_tiny_llama())
    with pytest.raises(RuntimeError, match="without a preceding update_importance"):
        model.prune_step()


def test_schedule_without_total_step_is_an_error():
    model = _roselora(make_tiny_llama(), total_step=None)
    ids = random_batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    model.update_importance()
    with pytest.raises(ValueError, match="RoseLoRA's schedule needs `total_step`"):
        model.prune_step()
    with pytest.raises(ValueError, match="RoseLoRA's schedule needs `total_step`"):
        model.current_keep_ratio()
    model.set_total_step(25)
    assert model.prune_step() == {"default": 1.0}


def test_prune_interval_recomputes_masks_on_the_grid_and_at_t_f():
    model = _roselora(make_tiny_llama(), prune_interval=4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    layer = _rose_layers(model)[0]
    kept = []
    for step in range(25):
        train_steps(model, optimizer, 1, seed=step)
        kept.append(int(layer.lora_mask_A["default"].sum()))
    # masks change only at t = 7, 11, 15, 19 (grid from t_i = 3) and t_f = 20, then stay at the final ratio
    changes = [t + 1 for t in range(1, 25) if kept[t] != kept[t - 1]]
    assert set(changes) <= {7, 11, 15, 19, 20, 23}
    assert kept[-1] == 8 * math.ceil(0.05 * 64)
    assert model.sparsity_report().within_bounds


def test_forward_applies_the_masks_to_factors_modified_after_the_last_prune():
    model = _roselora(make_tiny_llama(), lora_dropout=0.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 25)
    ids = random_batch(7)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        layer = _rose_layers(model)[0]
        weight = layer.lora_A["default"].weight
        weight.add_(0.5)  # e.g. an optimizer step without prune_step(): pruned entries become non-zero
        weight.sub_(0.5 * layer.lora_mask_A["default"])  # kept entries restored, pruned ones now 0.5
        assert weight[~layer.lora_mask_A["default"]].abs().min() > 0.4
        actual = model(input_ids=ids).logits
    assert torch.allclose(actual, expected, atol=1e-6)
    assert not weight[~layer.lora_mask_A["default"]].any()  # zeroed in place before use


def test_the_schedule_step_dispatches_a_constant_number_of_ops_whatever_the_depth():
    """benchmarks/dispatch_count.py's count, at 1 and 3 layers (7 and 21 adapted modules): RoseLoRA's ops beyond
    LoRA's do not grow with the modules, in every mode and phase, and stay within 64, with at most one host
    synchronisation beyond LoRA's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dispatch_count.py"
    spec = importlib.util.spec_from_file_location("dispatch_count", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lora = {layers: module.count_step_ops(layers, "lora") for layers in (1, 3)}
    for mode, step in (("reselect", 4), ("reselect", 8), ("persistent", 4), ("persistent", 8)):
        counts = {layers: module.count_step_ops(layers, "roselora", mode, step) for layers in (1, 3)}
        extra = {layers: counts[layers]["ops"] - lora[layers]["ops"] for layers in (1, 3)}
        assert extra[1] == extra[3] <= 64, (mode, step, extra)
        syncs = {layers: counts[layers]["syncs"] - lora[layers]["syncs"] for layers in (1, 3)}
        assert syncs[1] == syncs[3] == 1, (mode, step, syncs)
