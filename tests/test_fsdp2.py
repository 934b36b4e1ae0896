"""FSDP2 (``fully_shard``) on CPU with gloo: 1, 2 and 3 real processes end equal, in a custom loop and in the
Trainer, also across a checkpoint and resume; and the sharding helpers and refusals on their own."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EXAMPLES,
    assert_every_rank_has_the_same_masks,
    assert_same_masked_adapter,
    make_tiny_llama,
    random_batch,
    run_example,
    token_dataset,
    trainer_args,
)
from peft import get_peft_model
from torch.distributed.tensor import DTensor

from peft_roselora import RoseLoraCallback, RoseLoraConfig, RoseLoraLayer, UnsupportedSetupError, sharding


CUSTOM_LOOP = EXAMPLES / "fsdp2_custom_loop.py"
TRAINER = EXAMPLES / "trainer_sharded.py"


# ---- custom loop ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process runs every sharded run is compared with."""
    root = tmp_path_factory.mktemp("fsdp2_reference")
    run_example(CUSTOM_LOOP, 1, root / "reselect")
    run_example(CUSTOM_LOOP, 1, root / "persistent", "--prune-mode", "persistent", "--clamp-value", "0.05")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_custom_loop_under_fsdp2_equals_one_process(tmp_path, one_process, processes):
    # 3 processes: r=5 and 48/100 output rows split unevenly; v_proj has r=2, so one process holds no row of lora_A
    result = run_example(CUSTOM_LOOP, processes, tmp_path)
    assert result["world_size"] == processes and result["schedule_step"] == 14
    assert result["collectives"] > 0 and result["bytes_received"] > 0
    assert_same_masked_adapter(tmp_path, one_process / "reselect")
    assert_every_rank_has_the_same_masks(tmp_path, processes)


@pytest.mark.slow
def test_fsdp2_with_a_4bit_bitsandbytes_base_equals_one_process(tmp_path):
    # FSDP + QLoRA: nf4 base with bnb_4bit_quant_storage=float32, sharded by fully_shard like any parameter
    run_example(CUSTOM_LOOP, 1, tmp_path / "single", "--qlora")
    result = run_example(CUSTOM_LOOP, 3, tmp_path / "sharded", "--qlora")
    assert result["schedule_step"] == 14
    assert_same_masked_adapter(tmp_path / "sharded", tmp_path / "single")


@pytest.mark.slow
def test_custom_loop_persistent_mode_with_clamp_under_fsdp2(tmp_path, one_process):
    run_example(CUSTOM_LOOP, 3, tmp_path, "--prune-mode", "persistent", "--clamp-value", "0.05")
    assert_same_masked_adapter(tmp_path, one_process / "persistent")


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_process_skips_the_update_on_every_process(tmp_path):
    # one NaN gradient entry at step 5 (mid decay) on the process holding that row only: every process must skip the
    # importance update as the single process does, else the shards of the EMAs diverge
    single = run_example(CUSTOM_LOOP, 1, tmp_path / "single", "--nan-grad-step", "5")
    sharded = run_example(CUSTOM_LOOP, 2, tmp_path / "sharded", "--nan-grad-step", "5")
    assert single["nonfinite_steps_per_rank"] == [1]
    assert sharded["nonfinite_steps_per_rank"] == [1, 1]
    assert_same_masked_adapter(tmp_path / "sharded", tmp_path / "single")


@pytest.mark.slow
@pytest.mark.parametrize(
    "checkpoint, resume_processes",
    [("sharded", 2), ("sharded", 3), ("full", 3)],
    ids=["dcp-2-to-2", "dcp-2-to-3", "full-2-to-3"],
)
def test_custom_loop_resume_mid_schedule_under_fsdp2(tmp_path, one_process, checkpoint, resume_processes):
    options = ["--full-checkpoint"] if checkpoint == "full" else []
    stopped = run_example(CUSTOM_LOOP, 2, tmp_path, "--stop-at", "7", *options)
    assert stopped["schedule_step"] == 7 and 0.3 < stopped["keep_ratio"] < 1.0  # mid decay
    resumed = run_example(CUSTOM_LOOP, resume_processes, tmp_path, "--resume", *options)
    assert resumed["schedule_step"] == 14
    assert_same_masked_adapter(tmp_path, one_process / "reselect")


# ---- Trainer --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_trainer_reference")
    result = run_example(TRAINER, 1, root, "--cpu")
    assert not result["sharded"]
    return root, result


@pytest.mark.slow
def test_trainer_under_fsdp2_on_3_processes_equals_one_process(tmp_path, trainer_one_process):
    result = run_example(TRAINER, 3, tmp_path, "--cpu")
    assert result["sharded"] and result["schedule_step"] == 14 and result["callback_steps"] == 14
    assert_same_masked_adapter(tmp_path, trainer_one_process[0])


@pytest.mark.slow
def test_trainer_under_fsdp2_equals_one_process_and_resumes_exactly(tmp_path, trainer_one_process):
    reference, single = trainer_one_process
    sharded = run_example(TRAINER, 2, tmp_path / "sharded", "--cpu")
    assert sharded["sharded"] and sharded["schedule_step"] == 14 and sharded["callback_steps"] == 14
    assert_same_masked_adapter(tmp_path / "sharded", reference)
    logged = [entry["roselora_factor_density"] for entry in sharded["log_history"] if "loss" in entry]
    expected = [entry["roselora_factor_density"] for entry in single["log_history"] if "loss" in entry]
    assert logged == pytest.approx(expected, abs=1e-12)

    # stop at the checkpoint of step 7 (mid decay) and resume in new processes
    stopped = run_example(TRAINER, 2, tmp_path / "resumed", "--cpu", "--save-steps", "7", "--stop-after-save")
    assert stopped["schedule_step"] == 7
    resumed = run_example(TRAINER, 2, tmp_path / "resumed", "--cpu", "--resume")
    assert resumed["schedule_step"] == 14
    assert_same_masked_adapter(tmp_path / "resumed", tmp_path / "sharded", atol=1e-6)


def test_fsdp2_from_the_launcher_environment_is_not_refused(tmp_path, monkeypatch):
    # accelerate launch with fsdp_version: 2 sets these; in one CPU process nothing is sharded and training runs
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    from transformers import Trainer

    model = get_peft_model(make_tiny_llama(), RoseLoraConfig(r=4, target_modules=["q_proj"], keep_ratio=0.5))
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=token_dataset(), callbacks=[]
    )
    RoseLoraCallback.attach(trainer)
    trainer.train()
    assert model.steps_taken() == 4


# ---- the helpers, in one process (a process group of one) -----------------------------------------------------------


@pytest.fixture
def process_group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    torch.distributed.destroy_process_group()


def test_sharding_helpers_in_one_process(process_group):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    weight = distribute_tensor(torch.randn(5, 3), process_group, [Shard(0)])
    assert sharding.is_sharded(weight) and not sharding.is_sharded(weight.to_local())
    assert sharding.shard_rows(weight) == slice(0, 5)
    stats = sharding.CommunicationStats()
    local = torch.arange(15.0).view(5, 3)
    gathered = sharding.gather_full([local, torch.ones(2)], [weight, torch.ones(2)], stats)
    assert torch.equal(gathered[0], local) and torch.equal(gathered[1], torch.ones(2))
    assert stats.collectives == 1 and stats.bytes_sent == 15 * 4 and stats.bytes_received == 0
    assert sharding.agree_all_true(False, [weight]) is False and sharding.agree_all_true(True, [weight]) is True
    assert sharding.sum_over_processes(7, [weight]) == 7
    as_dtensor = sharding.as_sharded_like(local.clone(), weight)
    assert isinstance(as_dtensor, DTensor) and torch.equal(as_dtensor.full_tensor(), local)
    assert torch.equal(sharding.local_rows_of(as_dtensor, weight), local)
    assert torch.equal(sharding.local_rows_of(local, weight), local)
    assert sharding.share_from_first_process({"a": 1}, [weight]) == {"a": 1}

    replicated = distribute_tensor(torch.randn(5, 3), process_group, [Replicate()])
    with pytest.raises(NotImplementedError, match=r"Shard\(dim=0\).*got placements \(Replicate\(\),\)"):
        sharding.shard_rows(replicated)


def test_fully_shard_in_one_process_runs_the_sharded_code_path(process_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = get_peft_model(
        make_tiny_llama(), RoseLoraConfig(r=4, target_modules=["q_proj", "up_proj"], keep_ratio=0.5, total_step=6)
    )
    torch.manual_seed(0)
    model = get_peft_model(
        make_tiny_llama(), RoseLoraConfig(r=4, target_modules=["q_proj", "up_proj"], keep_ratio=0.5, total_step=6)
    )
    fully_shard(model)
    runs = []
    for candidate in (plain, model):
        optimizer = torch.optim.SGD([p for p in candidate.parameters() if p.requires_grad], lr=0.1)
        candidate.train()
        for step in range(6):
            ids = random_batch(seed=step)
            candidate(input_ids=ids, labels=ids).loss.backward()
            candidate.update_importance()
            optimizer.step()
            candidate.prune_step()
            optimizer.zero_grad()
        runs.append(candidate)
    assert model.base_model.factors_sharded() and not plain.base_model.factors_sharded()
    assert model.base_model.communication_stats.collectives > 0
    layers = [m for m in model.modules() if isinstance(m, RoseLoraLayer)]
    expected = [m for m in plain.modules() if isinstance(m, RoseLoraLayer)]
    for layer, reference in zip(layers, expected):
        assert torch.equal(layer.lora_mask_A["default"], reference.lora_mask_A["default"])
        assert torch.equal(layer.lora_mask_B["default"], reference.lora_mask_B["default"])
        assert isinstance(layer.lora_A["default"].weight, DTensor)
        assert torch.allclose(
            layer.lora_A["default"].weight.full_tensor(), reference.lora_A["default"].weight, atol=1e-6
        )
    assert model.base_model.factor_density() == pytest.approx(plain.base_model.factor_density(), abs=1e-12)
    schedule_state = model.base_model.schedule_state_dict()["adapters"]["default"]
    assert all(isinstance(v, DTensor) for v in schedule_state["importance_A"].values())
    report = model.base_model.sparsity_report(support_only=True)
    assert report.within_bounds and report.keep_ratio_reached == 0.5


def test_factors_flattened_like_fsdp1_are_refused():
    # FSDP1 (use_orig_params=True) presents each factor as a 1-D view of its flat shard; FSDP1 cannot run on these CPU
    # machines (torch: "FSDP needs a non-CPU accelerator device"), so the layout it produces is built here by hand
    model = get_peft_model(
        make_tiny_llama(), RoseLoraConfig(r=4, target_modules=["q_proj"], keep_ratio=0.5, total_step=4)
    )
    layer = next(m for m in model.modules() if isinstance(m, RoseLoraLayer))
    flat = layer.lora_A["default"].weight.detach().reshape(-1)[:10].clone()
    layer.lora_A["default"].weight = torch.nn.Parameter(flat)
    with pytest.raises(NotImplementedError, match=r"lora_A of adapter 'default' has shape \(10,\).*Use FSDP2"):
        layer.factors_and_masks("default")


def test_fsdp1_wrapped_model_is_refused_by_the_callback(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import TrainerControl, TrainerState

    class FakeFsdp1(FullyShardedDataParallel):  # FSDP1 cannot be constructed on CPU; the type is what is checked
        def __init__(self):
            torch.nn.Module.__init__(self)

    with pytest.raises(UnsupportedSetupError, match="RoseLoRA does not support FSDP1.*Use FSDP2"):
        RoseLoraCallback().on_train_begin(trainer_args(tmp_path), TrainerState(), TrainerControl(), model=FakeFsdp1())


def test_the_accelerate_fsdp2_config_asks_for_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(EXAMPLES / "accelerate_fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
