"""RoseLoRA in a custom training loop with Hugging Face accelerate (CPU here; the same code runs on GPUs).

    python examples/custom_loop_accelerate.py [--steps 60] [--accumulation 2]
    accelerate launch --multi_gpu --num_processes 2 examples/custom_loop_accelerate.py   # DDP on GPUs

``register_optimizer_hooks`` attaches the RoseLoRA step to the optimizer: the importance update runs right before
every real optimizer step, pruning right after it. Under ``accelerator.accumulate`` the prepared optimizer only
steps when gradients are synchronised, so the hooks fire once per optimizer step, as the schedule counts.
For exact resumption ``accelerator.save_state()`` is enough: the optimizer's state dict carries the RoseLoRA schedule.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation)
    torch.manual_seed(0)
    base = LlamaForCausalLM(
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
        base,
        RoseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], keep_ratio=0.25, total_step=args.steps),
    )
    ids = torch.randint(0, 128, (args.steps * args.accumulation * 4, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=4, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    peft_roselora.register_optimizer_hooks(model, optimizer)

    prepared_model.train()
    for (batch,) in loader:
        with accelerator.accumulate(prepared_model):
            loss = prepared_model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    accelerator.print(model.sparsity_report())
    accelerator.print(f"optimizer steps {model.steps_taken()}, keep ratio {model.current_keep_ratio():.3f}")


if __name__ == "__main__":
    main()
