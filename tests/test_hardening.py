"""Faults and misuse: non-finite gradients, GradScaler skips, double-driven schedules, bad steps, resume checks,
and exact resume from whatever checkpoints the optimizer (plain torch.save, accelerate, Trainer, 0.1.0 files)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import (
    assert_same_adapter_state,
    lora_state,
    make_tiny_llama,
    random_batch,
    token_dataset,
    train_steps,
    trainer_args,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

import peft_roselora
from peft_roselora import RoseLoraCallback, RoseLoraConfig, RoseLoraLayer, sparsity
from peft_roselora.schedule import ScheduleStateError
from peft_roselora.training import OPTIMIZER_STATE_KEY


def _model(seed=0, **overrides):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], keep_ratio=0.25)
    config.update(total_step=12, prune_start_step=2, prune_end_step=8)
    config.update(overrides)
    return get_peft_model(make_tiny_llama(seed), RoseLoraConfig(**config))


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoseLoraLayer)]


_lora_state = lora_state
_assert_same = assert_same_adapter_state


def _assert_masks_are_topk_of_importance(model):
    """In reselect mode the masks after the final prune are exactly the row top-k of the importance."""
    tuner = model.base_model
    schedule = tuner.adapter_schedule("default")
    keep = tuner.current_keep_ratio()
    assert keep < 1.0
    for name, layer in _layers(tuner.model):
        ema_a, ema_b = schedule.importance_A[name], schedule.importance_B[name]
        assert torch.isfinite(ema_a).all() and torch.isfinite(ema_b).all()
        expected_a, expected_b = sparsity.row_topk_masks(
            [ema_a, ema_b.T], [sparsity.kept_count(keep, ema_a.shape[1]), sparsity.kept_count(keep, ema_b.shape[0])]
        )
        assert torch.equal(layer.lora_mask_A["default"], expected_a), name
        assert torch.equal(layer.lora_mask_B["default"], expected_b.T), name


# ---- numerical faults ---------------------------------------------------------------------------------------------


def _train_with_nan_at(model, optimizer, steps, nan_step, where):
    model.train()
    for step in range(steps):
        ids = random_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == nan_step:
            for _, layer in _layers(model):
                grad = layer.lora_A["default"].weight.grad
                grad[where(layer)] = math.nan
                layer.lora_B["default"].weight.grad[0, 0] = math.inf
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_a_nan_gradient_never_enters_the_importance_and_masks_keep_following_it():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)

    def pruned_entry(layer):  # an entry pruned by the step-4 masks (mid decay)
        return ~layer.lora_mask_A["default"]

    with pytest.warns(RuntimeWarning, match="non-finite gradients at step 5"):
        _train_with_nan_at(model, optimizer, 12, nan_step=4, where=pruned_entry)
    report = model.sparsity_report()
    assert (report.step, report.nonfinite_steps, report.skipped_steps) == (12, 1, 0)
    assert "with non-finite gradients 1" in str(report)
    _assert_masks_are_topk_of_importance(model)
    for _, layer in _layers(model):  # pruned entries exactly zero, kept ones finite
        for factor, mask in (("lora_A", layer.lora_mask_A), ("lora_B", layer.lora_mask_B)):
            weight = getattr(layer, factor)["default"].weight
            assert torch.isfinite(weight).all() and (weight[~mask["default"]] == 0).all()


def test_persistent_mode_zeroes_non_finite_gradients_of_pruned_entries():
    model = _model(prune_mode="persistent")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 5)  # masks are sparse from step 3 on
    model.train()
    ids = random_batch(99)
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in _layers(model):
        mask = layer.lora_mask_A["default"]
        layer.lora_A["default"].weight.grad[~mask] = math.nan
    model.base_model.update_importance()
    for _, layer in _layers(model):
        grad, mask = layer.lora_A["default"].weight.grad, layer.lora_mask_A["default"]
        assert (grad[~mask] == 0).all() and torch.isfinite(grad).all()
    assert model.base_model.adapter_schedule().nonfinite_steps == 0  # nothing non-finite reached the importance


def test_after_t_f_in_persistent_mode_a_nan_kept_gradient_is_named_at_the_prune():
    # no importance is computed there: the check of the masked gradients is the step's one sync, and a kept NaN
    # makes the prune check the factors the optimizer wrote (pruned ones exactly zero, the divergence named)
    model = _model(prune_mode="persistent")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 10)  # t_f = 8
    model.train()
    ids = random_batch(99)
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in _layers(model):
        mask = layer.lora_mask_A["default"]
        grad = layer.lora_A["default"].weight.grad
        grad[~mask] = math.nan
        grad[tuple(mask.nonzero()[0].tolist())] = math.nan  # one kept entry
    with pytest.warns(RuntimeWarning, match="kept factor entries are NaN or inf after optimizer step 11"):
        optimizer.step()
    for _, layer in _layers(model):
        weight, mask = layer.lora_A["default"].weight, layer.lora_mask_A["default"]
        assert (weight[~mask] == 0).all() and weight[mask].isnan().sum() == 1


def _dataset():
    return token_dataset(rows=96)


def _args(folder, **overrides):
    return trainer_args(folder, **{"logging_steps": 10, **overrides})


class _SkipProbe(TrainerCallback):
    """Records whether the GradScaler skipped each optimizer step: the factors did not change (the scaler skips the
    whole step: no parameter moves)."""

    def __init__(self):
        self.skipped = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        after = [p.detach() for n, p in model.named_parameters() if "lora_B" in n]
        self.skipped.append(all(torch.equal(a, b) for a, b in zip(self.before, after)))


@pytest.mark.parametrize(
    "max_grad_norm,fp16_autocast,init_scale",
    [
        # no clipping: the callback itself must unscale before taking the importance. 2^126 overflows the fp32
        # gradients of the first step with every accelerate release (2^68 no longer does with accelerate 1.16); the
        # scaler's backoff then drops the scale far enough that only the first steps are skipped
        (0.0, False, 2.0**126),
        (1.0, True, 2.0**26),  # fp16 autocast and clipping: accelerate unscales for the clip, the callback reuses it
    ],
    ids=["fp32-no-clip", "fp16-autocast-clip"],
)
def test_trainer_with_a_real_grad_scaler_skips_overflowed_steps_entirely(
    tmp_path, monkeypatch, max_grad_norm, fp16_autocast, init_scale
):
    model = _model(total_step=None, prune_start_step=0.1, prune_end_step=0.8)
    probe = _SkipProbe()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=_dataset(),
        callbacks=[probe, RoseLoraCallback()],
    )
    # fp16 mixed precision's loss scaling on CPU (accelerate refuses fp16 without a GPU): a real GradScaler whose
    # initial scale overflows the first steps of this model
    backoff = 2.0**-60 if init_scale > 2.0**64 else 0.5
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff)
    trainer.accelerator.native_amp = True
    if fp16_autocast:  # what fp16=True sets on a GPU: autocast to fp16 and unscaling before clipping
        monkeypatch.setattr(trainer.accelerator.state, "_mixed_precision", "fp16")  # shared state: restored after
    trainer.train()
    skipped = sum(probe.skipped)
    assert len(probe.skipped) == 20 and skipped >= 1 and probe.skipped[0]
    schedule = model.base_model.adapter_schedule()
    assert (schedule.skipped_steps, schedule.step, schedule.nonfinite_steps) == (skipped, 20 - skipped, 0)
    assert model.sparsity_report().skipped_steps == skipped
    _assert_masks_are_topk_of_importance(model)  # not a contiguous block: the EMA never saw the overflow
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["roselora_skipped_steps"] == skipped


# ---- misuse -------------------------------------------------------------------------------------------------------


def test_hooks_registered_twice_on_one_optimizer_are_refused():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = peft_roselora.register_optimizer_hooks(model, optimizer)
    with pytest.raises(RuntimeError, match="already registered on this optimizer: a second registration"):
        peft_roselora.register_optimizer_hooks(model, optimizer)
    handle.remove()
    peft_roselora.register_optimizer_hooks(model, optimizer)  # after remove() it is allowed again


@pytest.mark.parametrize("prune_mode", ["reselect", "persistent"])
def test_hooks_on_two_optimizers_stepping_each_iteration_are_an_error_not_two_steps(prune_mode):
    model = _model(prune_mode=prune_mode, prune_start_step=0, prune_end_step=1)  # sparse masks from step 1 on
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(lora, lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    _steps(model, optimizer, 0, 2)  # persistent mode now masks gradients in place
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    first, second = torch.optim.SGD(lora_a, lr=1e-2), torch.optim.SGD(lora_b, lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, first)
    peft_roselora.register_optimizer_hooks(model, second)
    ids = random_batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    first.step()
    with pytest.raises(RuntimeError, match="driven twice on the same gradients"):
        second.step()
    assert model.steps_taken() == 3


def test_hooks_on_an_optimizer_without_the_factors_are_refused():
    model = _model()
    head = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
    with pytest.raises(RuntimeError, match="the optimizer does not update the RoseLoRA factors"):
        peft_roselora.register_optimizer_hooks(model, head)


def test_update_and_allocate_refuses_negative_and_decreasing_steps():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for global_step in (0, 1, 2):
        ids = random_batch(global_step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(global_step)
        optimizer.zero_grad()
    assert model.steps_taken() == 3
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="`global_step` must increase from call to call: got 1 after"):
        model.base_model.update_and_allocate(1)
    with pytest.raises(ValueError, match="`global_step` must be an integer >= 0, got -1"):
        model.base_model.update_and_allocate(-1)
    assert model.steps_taken() == 3


# ---- resume -------------------------------------------------------------------------------------------------------


def _hooked(model):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    return optimizer


def _steps(model, optimizer, first, last):
    model.train()
    for step in range(first, last):
        ids = random_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(
    "prune_mode, importance_dtype",
    [("reselect", "float32"), ("persistent", "float32"), ("reselect", "bfloat16")],
)
def test_plain_torch_save_of_optimizer_and_adapter_resumes_exactly(tmp_path, prune_mode, importance_dtype):
    full = _model(prune_mode=prune_mode, importance_dtype=importance_dtype)
    _steps(full, _hooked(full), 0, 12)

    run = _model(prune_mode=prune_mode, importance_dtype=importance_dtype)
    optimizer = _hooked(run)
    _steps(run, optimizer, 0, 5)  # mid decay
    run.save_pretrained(tmp_path / "adapter")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert OPTIMIZER_STATE_KEY in torch.load(tmp_path / "optimizer.pt", weights_only=True)["param_groups"][0]

    resumed = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "adapter", is_trainable=True)
    optimizer = _hooked(resumed)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert resumed.steps_taken() == 5 and OPTIMIZER_STATE_KEY not in optimizer.param_groups[0]
    emas = resumed.base_model.adapter_schedule("default").importance_A.values()
    assert {ema.dtype for ema in emas} == {getattr(torch, importance_dtype)}
    _steps(resumed, optimizer, 5, 12)
    assert resumed.steps_taken() == 12
    _assert_same(_lora_state(resumed), _lora_state(full))


def test_accelerate_save_state_and_load_state_resume_exactly(tmp_path):
    from accelerate import Accelerator

    def prepared():
        accelerator = Accelerator(cpu=True)
        model = _model()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        peft_roselora.register_optimizer_hooks(model, optimizer)
        return accelerator, model, optimizer

    _, full, optimizer = prepared()
    _steps(full, optimizer, 0, 12)
    accelerator, run, optimizer = prepared()
    _steps(run, optimizer, 0, 6)
    accelerator.save_state(str(tmp_path / "state"))
    accelerator, resumed, optimizer = prepared()
    accelerator.load_state(str(tmp_path / "state"))
    assert resumed.steps_taken() == 6
    _steps(resumed, optimizer, 6, 12)
    _assert_same(_lora_state(resumed), _lora_state(full))


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer_model(**overrides):
    torch.manual_seed(0)
    values = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], keep_ratio=0.25)
    values.update(overrides)
    return get_peft_model(make_tiny_llama(), RoseLoraConfig(**values))


@pytest.fixture(scope="module")
def interrupted_trainer_run(tmp_path_factory):
    """An uninterrupted 20-step Trainer run, and a run checkpointed at step 9 (mid decay) and stopped."""
    root = tmp_path_factory.mktemp("trainer_resume")
    full = _trainer_model()
    Trainer(model=full, args=_args(root / "full"), train_dataset=_dataset(), callbacks=[RoseLoraCallback()]).train()
    run = _trainer_model()
    args = _args(root / "run", save_strategy="steps", save_steps=9)
    trainer = Trainer(model=run, args=args, train_dataset=_dataset(), callbacks=[RoseLoraCallback(), _StopAt(9)])
    trainer.train()
    assert run.steps_taken() == 9
    return root, _lora_state(full), run


def _resume(output_dir, checkpoint, callback=None, **config):
    torch.manual_seed(123)
    model = _trainer_model(**config)
    trainer = Trainer(
        model=model,
        args=_args(output_dir, save_strategy="steps", save_steps=9),
        train_dataset=_dataset(),
        callbacks=[callback or RoseLoraCallback()],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return model


def test_trainer_resumes_exactly_from_a_checkpoint_in_another_folder(interrupted_trainer_run, tmp_path):
    root, expected, _ = interrupted_trainer_run
    moved = tmp_path / "elsewhere" / "my-checkpoint"
    shutil.copytree(root / "run" / "checkpoint-9", moved)
    resumed = _resume(tmp_path / "new-output", moved)
    assert resumed.steps_taken() == 20
    _assert_same(_lora_state(resumed), expected)


def test_trainer_resumes_exactly_from_a_0_1_0_checkpoint(interrupted_trainer_run, tmp_path):
    root, expected, run = interrupted_trainer_run
    legacy = tmp_path / "legacy-checkpoint"
    shutil.copytree(root / "run" / "checkpoint-9", legacy)
    # what 0.1.0 wrote: no schedule state in the optimizer, a roselora_state.safetensors with step, flag and EMAs
    optimizer_state = torch.load(legacy / "optimizer.pt", weights_only=True)
    optimizer_state["param_groups"][0].pop(OPTIMIZER_STATE_KEY)
    torch.save(optimizer_state, legacy / "optimizer.pt")
    with pytest.warns(FutureWarning, match="roselora_state_dict\\(\\) is deprecated"):
        save_file(run.base_model.roselora_state_dict(), legacy / "roselora_state.safetensors")
    resumed = _resume(tmp_path / "new-output", legacy, callback=RoseLoraCallback(resume_from_checkpoint=str(legacy)))
    assert resumed.steps_taken() == 20
    _assert_same(_lora_state(resumed), expected)


def test_resuming_with_a_different_schedule_is_refused_naming_the_field(interrupted_trainer_run, tmp_path):
    root, _, _ = interrupted_trainer_run
    with pytest.raises(ScheduleStateError, match="written with keep_ratio=0.25, this adapter has keep_ratio=0.5"):
        _resume(tmp_path / "out", root / "run" / "checkpoint-9", keep_ratio=0.5)


def test_a_schedule_state_restores_the_last_keep_ratio_and_every_counter():
    model = _model(prune_mode="persistent")
    _steps(model, _hooked(model), 0, 5)  # mid decay: the last selection's keep ratio is neither None nor final
    saved = model.base_model.adapter_schedule()
    assert saved.last_keep_ratio is not None and 0.25 < saved.last_keep_ratio < 1.0
    fresh = _model(prune_mode="persistent")
    fresh.base_model.load_schedule_state_dict(model.base_model.schedule_state_dict())
    loaded = fresh.base_model.adapter_schedule()
    for name in ("step", "last_keep_ratio", "skipped_steps", "nonfinite_steps", "importance_pending"):
        assert getattr(loaded, name) == getattr(saved, name), name


def test_persistent_scores_put_pruned_entries_of_both_factors_last():
    from peft_roselora.schedule import PRUNED_SCORE, AdapterSchedule

    importance_a, importance_b = torch.rand(4, 6), torch.rand(4, 5)
    mask_a, mask_b = torch.rand(4, 6) > 0.5, torch.rand(4, 5) > 0.5
    for mode, expected in (
        (
            "persistent",
            (importance_a.masked_fill(~mask_a, PRUNED_SCORE), importance_b.masked_fill(~mask_b, PRUNED_SCORE)),
        ),
        ("reselect", (importance_a, importance_b)),
    ):
        config = RoseLoraConfig(r=4, target_modules=["q_proj"], keep_ratio=0.5, total_step=10, prune_mode=mode)
        scores = AdapterSchedule(config).selection_scores(importance_a, importance_b, mask_a, mask_b)
        assert all(torch.equal(got, want) for got, want in zip(scores, expected)), mode


def test_schedule_state_with_a_wrong_key_or_shape_is_refused_naming_it():
    model = _model()
    optimizer = _hooked(model)
    _steps(model, optimizer, 0, 3)
    state = model.base_model.schedule_state_dict()
    name = next(iter(state["adapters"]["default"]["importance_A"]))
    bad = {"adapters": {"default": {**state["adapters"]["default"]}}}
    bad["adapters"]["default"]["importance_A"] = {name: torch.zeros(3, 3)}
    with pytest.raises(ScheduleStateError, match=f"'importance_A' of module '{name}' has shape \\(3, 3\\)"):
        model.base_model.load_schedule_state_dict(bad)
    with pytest.raises(ScheduleStateError, match="names adapter 'other', which is not a RoseLoRA adapter"):
        model.base_model.load_schedule_state_dict({"adapters": {"other": state["adapters"]["default"]}})
    with pytest.raises(ScheduleStateError, match="state key 'default::bogus' is not"):
        model.base_model.load_roselora_state_dict({"default::bogus": torch.zeros(1)})


def test_a_checkpoint_with_a_non_finite_importance_ema_is_refused_naming_the_tensor(interrupted_trainer_run, tmp_path):
    from peft_roselora.training import OPTIMIZER_STATE_KEY

    root, _, _ = interrupted_trainer_run
    corrupt = tmp_path / "checkpoint-9"
    shutil.copytree(root / "run" / "checkpoint-9", corrupt)
    optimizer_state = torch.load(corrupt / "optimizer.pt", weights_only=True)
    emas = optimizer_state["param_groups"][0][OPTIMIZER_STATE_KEY]["adapters"]["default"]["importance_B"]
    name = sorted(emas)[1]
    emas[name][0, 0] = float("nan")
    torch.save(optimizer_state, corrupt / "optimizer.pt")
    with pytest.raises(ScheduleStateError, match=f"'importance_B' of module '{name}' holds non-finite values"):
        _resume(tmp_path / "out", corrupt)


# ---- mutation-check regressions ------------------------------------------------------------------------------------


def test_merged_delta_uses_the_masked_factors_even_when_factors_changed_outside_the_masks():
    model = _model()
    _steps(model, _hooked(model), 0, 6)
    for _, layer in _layers(model):
        with torch.no_grad():  # an optimizer step not followed by prune_step(): non-zero values outside the masks
            layer.lora_A["default"].weight.add_(0.5)
            layer.lora_B["default"].weight.add_(0.5)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        masked = (b * layer.lora_mask_B["default"]) @ (a * layer.lora_mask_A["default"]) * layer.scaling["default"]
        unmasked = b @ a * layer.scaling["default"]
        delta = layer.get_delta_weight("default")
        assert torch.allclose(delta, masked, atol=1e-7) and not torch.allclose(delta, unmasked, atol=1e-3)
