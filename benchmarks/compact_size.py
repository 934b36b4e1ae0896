"""Size of the compact RoseLoRA adapter file against PEFT's dense file, per keep ratio.

    python benchmarks/compact_size.py [--keep-ratios 0.05 0.1 0.3] [--hidden 512 --layers 4 --rank 8]

A Llama-shaped model (random weights, all linear projections adapted) is trained for two steps with the final keep
ratio from the first step, then saved both ways; the compact file is loaded back and compared entry by entry.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from peft import get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(keep_ratio: float, args) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    base = LlamaForCausalLM(config)
    model = get_peft_model(
        base,
        RoseLoraConfig(
            r=args.rank,
            target_modules=TARGETS,
            keep_ratio=keep_ratio,
            prune_start_step=0,
            prune_end_step=1,
            total_step=2,
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    ids = torch.randint(0, 1000, (2, 32))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with tempfile.TemporaryDirectory() as folder:
        dense_dir, compact_dir = os.path.join(folder, "dense"), os.path.join(folder, "compact")
        model.save_pretrained(dense_dir)
        peft_roselora.save_compact(model, compact_dir)
        dense = os.path.getsize(os.path.join(dense_dir, "adapter_model.safetensors"))
        compact = os.path.getsize(os.path.join(compact_dir, peft_roselora.compact.COMPACT_WEIGHTS_NAME))
        state = peft_roselora.compact.load_compact_state_dict(compact_dir)
    original = get_peft_model_state_dict(model)
    exact = original.keys() == state.keys() and all(torch.equal(original[k], v) for k, v in state.items())
    factor_density = model.base_model.factor_density()
    return {
        "keep_ratio": keep_ratio,
        "factor_density": factor_density,
        "dense_bytes": dense,
        "compact_bytes": compact,
        "ratio": compact / dense,
        "exact_round_trip": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/compact_size.json")
    args = parser.parse_args()
    rows = [measure(keep_ratio, args) for keep_ratio in args.keep_ratios]
    print(f"{'keep ratio':>10} {'density':>8} {'dense (B)':>11} {'compact (B)':>12} {'ratio':>7} {'exact':>6}")
    for row in rows:
        print(
            f"{row['keep_ratio']:>10} {row['factor_density']:>8.4f} {row['dense_bytes']:>11} "
            f"{row['compact_bytes']:>12} {row['ratio']:>7.4f} {str(row['exact_round_trip']):>6}"
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"config": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
