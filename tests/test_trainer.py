"""RoseLoraCallback in transformers.Trainer: schedule, gradient accumulation, logs, resume, unsupported setups."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_adapter_state, lora_state, make_tiny_llama, token_dataset, trainer_args
from peft import get_peft_model
from transformers import Trainer

from peft_roselora import RoseLoraCallback, RoseLoraConfig, RoseLoraLayer, UnsupportedSetupError


_dataset = token_dataset
_args = trainer_args


def _model(keep_ratio: float = 0.25, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "keep_ratio": keep_ratio, **config}
    return get_peft_model(make_tiny_llama(), RoseLoraConfig(**config))


@pytest.mark.parametrize("accumulation", [1, 4])
def test_trainer_reaches_target_sparsity_once_per_optimizer_step(tmp_path, accumulation):
    model = _model()
    callback = RoseLoraCallback()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=1.0),
        train_dataset=_dataset(),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.optimizer_steps == 20
    assert model.steps_taken() == 20
    assert model.peft_config["default"].total_step == 20  # taken from max_steps
    assert model.peft_config["default"].resolve_schedule() == (2, 16, 20)  # 10 % and 80 % defaults
    report = model.sparsity_report()
    assert report.keep_ratio_reached == pytest.approx(0.25)
    assert report.within_bounds
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("roselora_keep_ratio" in entry and "roselora_factor_density" in entry for entry in logged)
    assert logged[-1]["roselora_keep_ratio"] == pytest.approx(0.25)
    assert logged[-1]["roselora_factor_density"] == pytest.approx(0.25)


@pytest.mark.parametrize("attached", [False, True])
def test_metrics_in_log_history_and_for_reporters_once_attached(tmp_path, attached):
    seen = []

    class Reporter(RoseLoraCallback.__mro__[1]):  # a plain TrainerCallback placed *before* ours
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path, max_steps=10),
        train_dataset=_dataset(),
        callbacks=[Reporter()] + ([] if attached else [RoseLoraCallback()]),
    )
    if attached:
        RoseLoraCallback.attach(trainer)
        assert isinstance(trainer.callback_handler.callbacks[0], RoseLoraCallback)
    trainer.train()
    # t_i = 1, t_f = 8 of T = 10: keep ratio at step 5 is 0.25 + 0.75 * (1 - 4/7)^3; at step 10 it is 0.25
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["roselora_keep_ratio"] for entry in history] == pytest.approx([0.25 + 0.75 * (3 / 7) ** 3, 0.25])
    assert [entry["roselora_skipped_steps"] for entry in history] == [0, 0]
    assert [entry["roselora_nonfinite_steps"] for entry in history] == [0, 0]
    reported = [logs for logs in seen if "loss" in logs]
    assert len(reported) == 2
    assert all(("roselora_keep_ratio" in logs) == attached for logs in reported)


def test_resume_mid_decay_ends_where_an_uninterrupted_run_does(tmp_path):
    torch.manual_seed(0)
    full = _model()
    Trainer(
        model=full, args=_args(tmp_path / "full"), train_dataset=_dataset(), callbacks=[RoseLoraCallback()]
    ).train()
    expected = lora_state(full)

    # the interrupted run: checkpoint every 9 steps, stop after step 9 (mid decay: t_i = 2, t_f = 16)
    torch.manual_seed(0)
    interrupted = _model()
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=9)
    trainer = Trainer(model=interrupted, args=args, train_dataset=_dataset(), callbacks=[RoseLoraCallback()])

    class StopAt9(RoseLoraCallback.__mro__[1]):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 9:
                control.should_training_stop = True

    trainer.add_callback(StopAt9())
    trainer.train()
    assert interrupted.steps_taken() == 9
    assert 0.25 < interrupted.current_keep_ratio() < 1.0

    # a new process would build a fresh model and Trainer and resume from the checkpoint
    torch.manual_seed(123)
    resumed = _model()
    trainer = Trainer(model=resumed, args=args, train_dataset=_dataset(), callbacks=[RoseLoraCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-9"))
    assert resumed.steps_taken() == 20
    assert_same_adapter_state(lora_state(resumed), expected)


def test_resume_without_roselora_state_is_an_error(tmp_path):
    # a checkpoint written without RoseLoraCallback: its optimizer state holds no schedule state
    args = _args(tmp_path, save_strategy="steps", save_steps=5, max_steps=5)
    Trainer(model=_model(), args=args, train_dataset=_dataset()).train()
    trainer = Trainer(
        model=_model(), args=_args(tmp_path, max_steps=10), train_dataset=_dataset(), callbacks=[RoseLoraCallback()]
    )
    with pytest.raises(RuntimeError, match="the optimizer state holds no RoseLoRA schedule state and no 0.1.0"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))


def test_frozen_adapter_fails_loudly(tmp_path):
    model = _model()
    for layer in (m for m in model.modules() if isinstance(m, RoseLoraLayer)):
        layer.lora_B["default"].weight.requires_grad_(False)
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(), callbacks=[RoseLoraCallback()]
    )
    with pytest.raises(RuntimeError, match="found no gradient on lora_B"):
        trainer.train()


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, r"RoseLoRA does not support FSDP1.*Use FSDP2"),  # the launcher's default
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"RoseLoRA does not support FSDP1.*Use FSDP2"),
    ],
)
def test_fsdp1_is_refused_at_train_begin(tmp_path, monkeypatch, environment, message):
    model = _model()
    before = copy.deepcopy(lora_state(model))
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(), callbacks=[RoseLoraCallback()]
    )
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(UnsupportedSetupError, match=message):
        trainer.train()
    after = lora_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained


def test_training_without_the_schedule_warns(tmp_path):
    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=25), train_dataset=_dataset())
    with pytest.warns(UserWarning, match="the sparsity\\s+schedule never did, so this is training plain"):
        trainer.train()
