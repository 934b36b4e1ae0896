"""DeepSpeed ZeRO-1/2/3 for real on CPU (DeepSpeed's CPU accelerator, gloo, 2 processes): a ZeRO engine in a custom
loop and the Trainer with RoseLoraCallback end equal to one process, and a ZeRO checkpoint resumes exactly."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import (
    EXAMPLES,
    assert_every_rank_has_the_same_masks,
    assert_same_masked_adapter,
    assert_same_trajectory_up_to_near_ties,
    run_example,
)


# a test dependency (the dev extra): the suite fails without it rather than skipping. Not imported here: importing
# DeepSpeed selects an accelerator for the whole test process; the runs below import it in their own processes.
if importlib.util.find_spec("deepspeed") is None:
    raise ImportError("tests/test_deepspeed.py needs DeepSpeed: pip install -e '.[dev]' installs it.")


CUSTOM_LOOP = EXAMPLES / "fsdp2_custom_loop.py"
TRAINER = EXAMPLES / "trainer_sharded.py"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed_reference")
    run_example(CUSTOM_LOOP, 1, root / "loop", "--trace", str(root / "loop" / "trace"))
    # accelerate treats a DeepSpeed run on CPU as one process and does not shard the data: every process gets the
    # same 3 rows per step (DeepSpeed still partitions across both), so the Trainer reference is one process, 3 rows
    run_example(TRAINER, 1, root / "trainer", "--global-batch", "3")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_engine_in_a_custom_loop_equals_one_process(tmp_path, one_process, stage):
    result = run_example(CUSTOM_LOOP, 2, tmp_path, "--deepspeed", str(stage), "--trace", str(tmp_path / "trace"))
    assert result["world_size"] == 2 and result["schedule_step"] == 14
    # step by step equal to one process; a near-tie that the other reduction order decides the other way ends the
    # comparison there (ZeRO-3 computes in another order: it happens on some machines), else the final adapters
    if assert_same_trajectory_up_to_near_ties(tmp_path / "trace", one_process / "loop" / "trace", 14) is None:
        assert_same_masked_adapter(tmp_path, one_process / "loop")
    assert_every_rank_has_the_same_masks(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resumes_mid_schedule(tmp_path, one_process, stage):
    full = run_example(CUSTOM_LOOP, 2, tmp_path / "full", "--deepspeed", str(stage))
    assert full["schedule_step"] == 14
    trace = ("--trace", str(tmp_path / "trace"))
    stopped = run_example(CUSTOM_LOOP, 2, tmp_path / "resumed", "--deepspeed", str(stage), "--stop-at", "7", *trace)
    assert stopped["schedule_step"] == 7 and 0.3 < stopped["keep_ratio"] < 1.0
    resumed = run_example(CUSTOM_LOOP, 2, tmp_path / "resumed", "--deepspeed", str(stage), "--resume", *trace)
    assert resumed["schedule_step"] == 14
    # the resumed run ends where the uninterrupted one (same processes, same reduction order) does
    assert_same_masked_adapter(tmp_path / "resumed", tmp_path / "full", atol=1e-6)
    if assert_same_trajectory_up_to_near_ties(tmp_path / "trace", one_process / "loop" / "trace", 14) is None:
        assert_same_masked_adapter(tmp_path / "resumed", one_process / "loop")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_with_deepspeed_zero_equals_one_process(tmp_path, one_process, stage):
    result = run_example(TRAINER, 2, tmp_path, "--deepspeed", str(stage))
    assert result["deepspeed"] and result["schedule_step"] == 14 and result["callback_steps"] == 14
    assert_same_masked_adapter(tmp_path, one_process / "trainer")


def test_the_deepspeed_config_is_zero3_with_trainer_values():
    import json

    config = json.loads((EXAMPLES / "deepspeed_zero3.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in from TrainingArguments


@pytest.mark.slow
def test_trainer_with_deepspeed_zero3_checkpoints_and_resumes_exactly(tmp_path, one_process):
    # a checkpoint mid-run (the model card is written by the main process alone: it must not gather the factors)
    full = run_example(TRAINER, 2, tmp_path / "full", "--deepspeed", "3", "--save-steps", "7")
    assert full["schedule_step"] == 14
    assert_same_masked_adapter(tmp_path / "full", one_process / "trainer")
    card = (tmp_path / "full" / "checkpoint-7" / "README.md").read_text()
    assert "mask non-zeros" in card and "(at most, from the masks)" in card
    stopped = run_example(
        TRAINER, 2, tmp_path / "resumed", "--deepspeed", "3", "--save-steps", "7", "--stop-after-save"
    )
    assert stopped["schedule_step"] == 7
    resumed = run_example(TRAINER, 2, tmp_path / "resumed", "--deepspeed", "3", "--resume")
    assert resumed["schedule_step"] == 14
    assert_same_masked_adapter(tmp_path / "resumed", tmp_path / "full", atol=1e-6)
