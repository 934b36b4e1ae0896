"""RoseLoRA with transformers.Trainer under DDP (one process per GPU, or per CPU core with gloo).

    torchrun --nproc_per_node 2 examples/trainer_ddp.py --output-dir out/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_ddp.py --output-dir out/ddp   # GPUs
    python examples/trainer_ddp.py --output-dir out/single                                         # one process

DDP averages gradients across ranks before the optimizer events, so every rank computes the same importance and
the same masks. Each rank writes its final adapter tensors to ``<output-dir>/rank<k>.safetensors`` so that they can
be compared (``tests/test_ddp.py`` does).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_roselora import RoseLoraCallback, RoseLoraConfig


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _distributed import leave_after_clean_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--cpu", action="store_true", help="force CPU (gloo) even where GPUs are present")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial adapter on every rank
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
        )
    )
    model = get_peft_model(
        model,
        RoseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], keep_ratio=args.keep_ratio),
    )
    ids = torch.randint(0, 128, (256, 16), generator=torch.Generator().manual_seed(0)).tolist()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=args.cpu or not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[RoseLoraCallback()],
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    save_file(tensors, os.path.join(args.output_dir, f"rank{rank}.safetensors"))
    if rank == 0:
        print(model.sparsity_report())
        print(f"world size {training_args.world_size}, schedule step {model.steps_taken()}")


if __name__ == "__main__":
    main()
    leave_after_clean_run()
