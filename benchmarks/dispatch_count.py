"""Ops dispatched per optimizer step, RoseLoRA against PEFT LoRA: what a GPU pays in kernel launches.

    python benchmarks/dispatch_count.py [--layers 10 30] [--output benchmarks/results/dispatch_count_cpu.json]

A ``TorchDispatchMode`` records every aten op dispatched inside ``optimizer.step()`` (RoseLoRA's importance update
and prune run in the optimizer's hooks, so they are inside it), a ``foreach`` op counting once, as a GPU launches it;
``aten._local_scalar_dense`` (``.item()``, ``bool(tensor)``) counts the host synchronisations (on CPU AdamW's own
step reads its step counters, two per parameter: the table gives RoseLoRA's syncs beyond LoRA's). Model: a Llama with
all 7 projections of every layer adapted (hidden 64, so the counts, not the times, matter), AdamW. Phases: during
the decay (masks recomputed every step) and after t_f, in ``reselect`` and ``persistent`` mode. Printed: the extra
ops over LoRA's step per phase and layer count, their growth from the smallest to the largest depth, and syncs.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _model(layers: int, method: str, prune_mode: str, total: int):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
        )
    )
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS)
    else:
        config = RoseLoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=PROJECTIONS,
            keep_ratio=0.25,
            total_step=total,
            prune_start_step=2,
            prune_end_step=6,
            prune_mode=prune_mode,
        )
    model = get_peft_model(base, config)
    # foreach=True: the multi-tensor AdamW a GPU uses by default (on CPU torch defaults to the per-parameter loop)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    if method != "lora":
        peft_roselora.register_optimizer_hooks(model, optimizer)
    return model, optimizer


def count_step_ops(layers: int, method: str, prune_mode: str = "reselect", at_step: int = 4) -> dict:
    """Ops of the optimizer step number ``at_step`` (1-based; 4: during the decay, 8: after t_f = 6)."""
    model, optimizer = _model(layers, method, prune_mode, total=10)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    counted = None
    for step in range(1, at_step + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        if step == at_step:
            counted = CountOps()
            with counted:
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad()
    return {
        "ops": sum(counted.ops.values()),
        "syncs": counted.ops.get("_local_scalar_dense", 0),
        "top": counted.ops.most_common(8),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=[10, 30])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    phases = {
        "reselect, decay": ("reselect", 4),
        "reselect, after t_f": ("reselect", 8),
        "persistent, decay": ("persistent", 4),
        "persistent, after t_f": ("persistent", 8),
    }
    report = {"layers": args.layers, "modules": {n: 7 * n for n in args.layers}, "lora": {}, "phases": {}}
    for layers in args.layers:
        report["lora"][layers] = count_step_ops(layers, "lora")
    for phase, (mode, step) in phases.items():
        report["phases"][phase] = {}
        for layers in args.layers:
            counts = count_step_ops(layers, "roselora", mode, step)
            counts["extra_ops"] = counts["ops"] - report["lora"][layers]["ops"]
            counts["extra_syncs"] = counts["syncs"] - report["lora"][layers]["syncs"]
            report["phases"][phase][layers] = counts
    low, high = min(args.layers), max(args.layers)
    print(f"| phase | extra ops over LoRA at {low} layers | at {high} layers | growth | extra host syncs |")
    print("|---|---|---|---|---|")
    for phase, rows in report["phases"].items():
        growth = rows[high]["extra_ops"] - rows[low]["extra_ops"]
        rows["growth"] = growth
        syncs = max(rows[n]["extra_syncs"] for n in args.layers)
        print(f"| {phase} | {rows[low]['extra_ops']} | {rows[high]['extra_ops']} | {growth} | {syncs} |")
    print(f"LoRA's step: {report['lora'][low]['ops']} ops at {low} layers, {report['lora'][high]['ops']} at {high}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
