"""Training-step cost of RoseLoRA against PEFT LoRA under FSDP2, and the communication the schedule adds.

    torchrun --nproc_per_node 2 benchmarks/fsdp2_step.py                    # the documented CPU configuration (gloo)
    torchrun --nproc_per_node 2 benchmarks/fsdp2_step.py --preset smoke     # seconds (CI)
    torchrun --nproc_per_node 8 benchmarks/fsdp2_step.py --hidden 4096 ...  # GPUs (nccl), any shape

Every process builds the same Llama-shaped model from a config (random weights, nothing downloaded) and one copy per
method, all seven projections adapted at the same rank, each copy sharded with ``fully_shard`` (every decoder layer,
then the root): ``lora`` (PEFT LoRA), ``roselora-decay`` (inside the cubic decay: masks re-selected every step),
``roselora-final`` (after t_f, the authors' per-step re-selection), ``roselora-final-persistent`` (after t_f, masks
fixed). Steps run interleaved (A B C D A B C D ...), warm-up rounds excluded, processes aligned by a barrier before
every sample; a sample is the wall time of ``--steps-per-sample`` full training steps on process 0. The table gives
medians and the median of the per-round ratios to LoRA. The communication RoseLoRA adds is counted by the schedule
itself (``RoseLoraModel.communication_stats``: the importance gather at each mask selection, the one-int finiteness
agreement each step), per optimizer step and per adapted module, next to what FSDP2 itself moves per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import TARGETS, adapter_config, build_base  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from _distributed import leave_after_clean_run  # noqa: E402

import peft_roselora  # noqa: E402


PRESETS = {
    "cpu": dict(
        hidden=512, intermediate=1376, layers=4, heads=8, vocab=8000, seq=128, batch=4, rank=8, rounds=10, warmup=2,
        steps_per_sample=2,
    ),
    "smoke": dict(
        hidden=64, intermediate=128, layers=2, heads=4, vocab=256, seq=16, batch=2, rank=4, rounds=3, warmup=1,
        steps_per_sample=1,
    ),
}  # fmt: skip
METHODS = ["lora", "roselora-decay", "roselora-final", "roselora-final-persistent"]


class ShardedRunner:
    """One method's sharded model, optimizer and training step (the schedule driven by optimizer hooks)."""

    def __init__(self, method: str, base, args, device: torch.device):
        self.method = method
        self.model = get_peft_model(copy.deepcopy(base), adapter_config(method, args.rank)).to(device)
        for layer in self.model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        if method.startswith("roselora"):
            peft_roselora.register_optimizer_hooks(self.model, self.optimizer)
        generator = torch.Generator().manual_seed(1 + dist.get_rank())
        self.input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
        self.steps = 0

    def step(self) -> None:
        self.model(input_ids=self.input_ids, labels=self.input_ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


def timed_sample(runner: ShardedRunner, steps: int, device: torch.device) -> float:
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def parameter_bytes(model) -> tuple[int, int]:
    """Bytes of all parameters and of the trainable ones (global shapes)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", default=None, help="JSON results (process 0)")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    args.device = "cpu"  # build on CPU, move after wrapping
    base = build_base(args)
    runners = [ShardedRunner(method, base, args, device) for method in METHODS]
    del base

    samples = {method: [] for method in METHODS}
    for round_index in range(args.warmup + args.rounds):
        for runner in runners:
            seconds = timed_sample(runner, args.steps_per_sample, device)
            if round_index >= args.warmup:
                samples[runner.method].append(seconds)

    modules = len(runners[1].model.base_model._rose_layers("default"))
    rows = []
    for runner in runners:
        median = statistics.median(samples[runner.method])
        ratios = [s / b for s, b in zip(samples[runner.method], samples["lora"])]
        row = {"method": runner.method, "median_s": median, "ratio_to_lora": statistics.median(ratios)}
        if runner.method.startswith("roselora"):
            stats = runner.model.base_model.communication_stats
            row.update(
                collectives_per_step=stats.collectives / runner.steps,
                bytes_received_per_step_per_module=stats.bytes_received / runner.steps / modules,
                bytes_sent_per_step_per_module=stats.bytes_sent / runner.steps / modules,
            )
        rows.append(row)
    total_bytes, trainable_bytes = parameter_bytes(runners[0].model)
    # FSDP2 itself per step and process: all-gather of every parameter in forward and again in backward
    # (reshard_after_forward), reduce-scatter of the trainable gradients
    fsdp_bytes_received = (2 * total_bytes + trainable_bytes) * (world - 1) // world
    if rank == 0:
        shape = (
            f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, seq {args.seq}, "
            f"batch {args.batch} per process, r {args.rank}, {modules} adapted modules"
        )
        print(f"FSDP2, {world} processes ({device.type}, {dist.get_backend()}), {shape}")
        print(f"{'method':<28} {'median s/step':>14} {'ratio to LoRA':>14} {'added bytes/step/module':>24}")
        for row in rows:
            added = row.get("bytes_received_per_step_per_module")
            added = f"{added:>24.0f}" if added is not None else f"{'-':>24}"
            print(f"{row['method']:<28} {row['median_s']:>14.4f} {row['ratio_to_lora']:>14.3f} {added}")
        per_module = fsdp_bytes_received / modules
        print(f"FSDP2 itself receives about {fsdp_bytes_received} bytes per step ({per_module:.0f} per module)")
        if args.output:
            result = {
                "config": {k: v for k, v in vars(args).items() if k not in ("output",)},
                "world_size": world,
                "device": device.type,
                "backend": dist.get_backend(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "rows": rows,
                "fsdp_bytes_received_per_step": fsdp_bytes_received,
                "modules": modules,
                "targets": TARGETS,
                "samples": samples,
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as handle:
                json.dump(result, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_after_clean_run()
