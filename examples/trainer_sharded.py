"""RoseLoRA with transformers.Trainer under FSDP2 or DeepSpeed ZeRO, driven by RoseLoraCallback, with checkpoints.

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/trainer_sharded.py --output-dir out/fsdp2
    torchrun --nproc_per_node 2 examples/trainer_sharded.py --output-dir out/fsdp2          # FSDP2 from the arguments
    torchrun --nproc_per_node 2 examples/trainer_sharded.py --deepspeed examples/deepspeed_zero3.json --output-dir z3
    torchrun --nproc_per_node 2 examples/trainer_sharded.py --deepspeed 2 --output-dir out/z2   # ZeRO stage 2
    python examples/trainer_sharded.py --output-dir out/single                               # one process, same run

With several processes and no ``--deepspeed``, ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``
(FSDP2 is transformers' default version) shards every decoder layer with ``fully_shard``; ``RoseLoraCallback`` runs
the schedule on the shards and the optimizer checkpoints carry its (sharded) state, so ``--resume`` continues
exactly. With ``--deepspeed`` (a config file, or a ZeRO stage 1, 2 or 3) the Trainer runs DeepSpeed and the callback
attaches the schedule to the ZeRO optimizer (``peft_roselora.zero``). The global batch is the same whatever the
number of processes and the data order is sequential, so every run ends with the same masks and, to float rounding,
the same factors (``tests/test_fsdp2.py`` and ``tests/test_deepspeed.py`` check it against one process).

Gradient clipping is off (``max_grad_norm=0``) so that the DeepSpeed runs compare exactly with one process:
DeepSpeed clips inside its step, after RoseLoRA has taken the step's importance (see docs/training.md).

CPU emulation of FSDP2 (``--cpu``): accelerate enables FSDP only on accelerators (on CPU it silently trains with
DDP), so with ``--cpu`` this script declares the CPU processes multi-device to accelerate before the Trainer builds
its ``Accelerator``; that is the only way to run accelerate's FSDP2 code path on a machine without GPUs, and it is
for testing, not for production. DeepSpeed needs no emulation: it runs on CPU with its CPU accelerator and gloo.

Writes the gathered adapter to ``<output-dir>/adapter.safetensors`` and ``result.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from peft_roselora import RoseLoraCallback, RoseLoraConfig


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _distributed import leave_after_clean_run  # noqa: E402


GLOBAL_BATCH = 6


class SequentialTrainer(Trainer):
    """A Trainer whose data order does not depend on the number of processes (for the comparison)."""

    def __init__(self, *args, emulate_fsdp_on_cpu: bool = False, **kwargs) -> None:
        self.emulate_fsdp_on_cpu = emulate_fsdp_on_cpu
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def create_accelerator_and_postprocess(self) -> None:
        if self.emulate_fsdp_on_cpu:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType

            # accelerate takes the FSDP path only for multi-accelerator runs: declare the CPU processes as such
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--save-steps", type=int, default=None, help="write a checkpoint every N steps")
    parser.add_argument("--stop-after-save", action="store_true", help="end the run at the first checkpoint")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo), FSDP2 emulated (see above)")
    parser.add_argument("--logging-steps", type=int, default=7)
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH, help="rows per step, all processes")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config file, or a ZeRO stage: 1, 2 or 3")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)  # the same base model and initial adapter on every process
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=100,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    model = get_peft_model(
        model,
        RoseLoraConfig(
            r=5,
            lora_alpha=10,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            keep_ratio=args.keep_ratio,
            prune_start_step=2,
            prune_end_step=args.max_steps - 2,
        ),
    )
    ids = torch.randint(0, 128, (args.global_batch * args.max_steps, 12), generator=torch.Generator().manual_seed(0))
    deepspeed = None
    if args.deepspeed in ("1", "2", "3"):
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": int(args.deepspeed)},
        }
    elif args.deepspeed:
        deepspeed = args.deepspeed
    sharded = world > 1 and deepspeed is None
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.global_batch // world,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=deepspeed is None and (args.cpu or not torch.cuda.is_available()),  # DeepSpeed picks its device
        max_grad_norm=0.0,
        deepspeed=deepspeed,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        fsdp=sharded,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if sharded else None,
    )
    callback = RoseLoraCallback()
    trainer = SequentialTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
        callbacks=[callback],
        emulate_fsdp_on_cpu=sharded and training_args.use_cpu,
    )
    if args.stop_after_save:
        trainer.add_callback(StopAtFirstSave())
    trainer.train(resume_from_checkpoint=args.resume or None)

    tuner = trainer.model.base_model
    density = tuner.factor_density()  # collective under FSDP2
    adapter = tuner.masked_adapter_state()  # gathered whole (collective under FSDP2 and ZeRO)
    # the global rank, not accelerate's view: on CPU accelerate sees a DeepSpeed run as one process (every process
    # would think it is the main one and write the same files at once)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_file(adapter, os.path.join(args.output_dir, "adapter.safetensors"))
        result = {
            "world_size": world,
            "sharded": trainer.is_fsdp_enabled,
            "deepspeed": trainer.is_deepspeed_enabled,
            "schedule_step": tuner.steps_taken(),
            "callback_steps": callback.optimizer_steps,
            "factor_density": density,
            "log_history": trainer.state.log_history,
        }
        Path(args.output_dir, "result.json").write_text(json.dumps(result, indent=2))
        print(
            f"world size {world}, FSDP {trainer.is_fsdp_enabled}, DeepSpeed {trainer.is_deepspeed_enabled}, "
            f"schedule step {tuner.steps_taken()}"
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class StopAtFirstSave(TrainerCallback):
    """Ends training at the first checkpoint, as an interrupted run would."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


if __name__ == "__main__":
    main()
    leave_after_clean_run()
