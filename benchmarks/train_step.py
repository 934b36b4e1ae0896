"""Training-step cost of RoseLoRA against PEFT LoRA and AdaLoRA, measured side by side.

    python benchmarks/train_step.py                       # the documented CPU configuration (a few minutes)
    python benchmarks/train_step.py --preset smoke        # tiny, seconds (CI)
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 ...   # GPU

One process builds a Llama-shaped model from a config (random weights, nothing downloaded) and one copy per method,
all linear projections adapted at the same rank:

- ``lora``: PEFT LoRA;
- ``roselora-decay``: RoseLoRA inside the cubic decay (masks recomputed every step);
- ``roselora-final``: RoseLoRA after t_f (keep ratio final; the authors' semantics still re-select every step);
- ``roselora-final-persistent``: after t_f with ``prune_mode="persistent"`` (masks fixed once final);
- ``adalora``: PEFT AdaLoRA with ``update_and_allocate`` every step (budgeting phase).

Steps run interleaved with the order rotated every round (A B C ..., B C ... A, ...), warm-up rounds excluded;
every sample is the wall time of ``--steps-per-sample`` full training steps (forward, backward, optimizer, schedule
update). The table gives medians, their ratios to LoRA, and the paired ratio (median over rounds of each round's
ratio to LoRA's sample); the RoseLoRA schedule update (importance + top-k + masking) is timed on its own too. Peak
memory is measured per method in a fresh subprocess (heap in use on CPU, ``max_memory_allocated`` on GPU).
Inference: merged RoseLoRA against the base model, unmerged RoseLoRA against unmerged LoRA. Results go to
``--output`` (JSON). ``--preset llama2-7b`` / ``llama3-8b``: one decoder layer at those models' projection shapes.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "cpu": dict(
        hidden=512,
        intermediate=1376,
        layers=4,
        heads=8,
        vocab=8000,
        seq=128,
        batch=4,
        rank=8,
        rounds=12,
        warmup=2,
        steps_per_sample=2,
    ),
    # one decoder layer with the projection shapes of Llama-2-7B (MHA) and Llama-3-8B (GQA: 8 key/value heads); the
    # vocabulary is small on purpose (the projections are what is measured); few samples: the ratio is what counts
    "llama2-7b": dict(
        hidden=4096,
        intermediate=11008,
        layers=1,
        heads=32,
        kv_heads=32,
        vocab=1024,
        seq=512,
        batch=1,
        rank=8,
        rounds=5,
        warmup=1,
        steps_per_sample=1,
    ),
    "smoke": dict(
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        vocab=256,
        seq=16,
        batch=2,
        rank=4,
        rounds=3,
        warmup=1,
        steps_per_sample=1,
    ),
}
# Llama-3-8B: the same layer with a wider MLP and grouped-query attention (8 key/value heads)
PRESETS["llama3-8b"] = {**PRESETS["llama2-7b"], "intermediate": 14336, "kv_heads": 8}
METHODS = ["lora", "roselora-decay", "roselora-final", "roselora-final-persistent", "adalora"]
FAR = 10**6  # a total_step no run reaches: the schedule phase stays where it is put


def build_base(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=getattr(args, "kv_heads", None) or args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 64),
    )
    return LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))


def adapter_config(method: str, rank: int):
    common = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    if method == "lora":
        return LoraConfig(**common)
    if method == "adalora":
        return AdaLoraConfig(
            init_r=rank,
            target_r=max(1, rank // 2),
            lora_alpha=2 * rank,
            target_modules=TARGETS,
            tinit=1,
            tfinal=1,
            deltaT=1,
            total_step=FAR,
        )
    if method in ("roselora-decay", "roselora-decay-bf16-importance"):
        dtype = "bfloat16" if method.endswith("bf16-importance") else "float32"
        return RoseLoraConfig(
            **common, keep_ratio=0.1, prune_start_step=0, prune_end_step=FAR, total_step=FAR, importance_dtype=dtype
        )
    mode = "persistent" if method.endswith("persistent") else "reselect"
    return RoseLoraConfig(
        **common, keep_ratio=0.1, prune_start_step=0, prune_end_step=1, total_step=FAR, prune_mode=mode
    )


class Runner:
    """One method: its model, optimizer and step function (schedule driven the way users drive it)."""

    def __init__(self, method: str, base, args, copy_base: bool = True):
        self.method = method
        self.model = get_peft_model(copy.deepcopy(base) if copy_base else base, adapter_config(method, args.rank))
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.step_index = 0
        self.schedule_seconds: list[float] = []
        self._pending_schedule = 0.0
        if method.startswith("roselora"):
            tuner = self.model.base_model
            self._wrap_timed(tuner, "update_importance")
            self._wrap_timed(tuner, "prune_step")
            peft_roselora.register_optimizer_hooks(self.model, self.optimizer)
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
        self.device = args.device

    def _wrap_timed(self, tuner, name):
        original = getattr(tuner, name)

        def timed(*a, **k):
            _sync(self.device)
            start = time.perf_counter()
            result = original(*a, **k)
            _sync(self.device)
            self._pending_schedule += time.perf_counter() - start
            return result

        setattr(tuner, name, timed)

    def step(self) -> None:
        self._pending_schedule = 0.0
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(self.step_index)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        if self.method.startswith("roselora"):
            self.schedule_seconds.append(self._pending_schedule)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(runner: Runner, steps: int) -> float:
    _sync(runner.device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    _sync(runner.device)
    return (time.perf_counter() - start) / steps


def time_forward(model, input_ids, repeats: int, device: str) -> list[float]:
    samples = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(input_ids=input_ids)
            _sync(device)
            samples.append(time.perf_counter() - start)
    return samples


def adapter_bytes(model) -> dict[str, int]:
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    masks = sum(b.numel() for n, b in model.named_buffers() if "lora_mask" in n)
    return {"adapter_params": params, "fp32_importance_bytes": 4 * params, "mask_bytes": masks}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use_bytes() -> int | None:
    """Bytes currently allocated through glibc malloc (CPU tensors included): far less noisy than RSS."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def memory_probe(args) -> dict:
    """Run in a fresh process: build one method, train a few steps, report its memory.

    GPU: ``max_memory_allocated`` over the training steps. CPU: ``train_bytes`` is the most heap memory in use
    (glibc ``mallinfo2``, which CPU tensors go through) sampled after every forward, backward and optimizer step;
    the resident set (``train_rss_bytes``) and the process peak (``peak_rss_bytes``, usually set while the model is
    built) are reported too but are dominated by allocator noise at this scale.
    """
    runner = Runner(args.memory_probe, build_base(args), args, copy_base=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    samples, heap = [], []
    for _ in range(6):
        loss = runner.model(input_ids=runner.input_ids, labels=runner.input_ids).loss
        heap.append(_heap_in_use_bytes())  # activations alive
        loss.backward()
        del loss
        samples.append(_rss_bytes())
        heap.append(_heap_in_use_bytes())
        runner.optimizer.step()
        if args.memory_probe == "adalora":
            runner.model.base_model.update_and_allocate(runner.step_index)
        heap.append(_heap_in_use_bytes())
        runner.optimizer.zero_grad(set_to_none=False)  # keep gradient buffers, as most trainers do
        runner.step_index += 1
        samples.append(_rss_bytes())
    result = {"method": args.memory_probe, **adapter_bytes(runner.model)}
    if args.device.startswith("cuda"):
        result["train_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["train_bytes"] = max(heap) if heap[0] is not None else max(samples)
        # the last three steps: after t_f in persistent mode the importance EMAs are released
        result["steady_train_bytes"] = max(heap[-9:]) if heap[0] is not None else max(samples[-6:])
        result["train_rss_bytes"] = max(samples)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return result


def schedule_scaling(args) -> list[dict]:
    """Schedule-update milliseconds as a function of the number of adapted modules and of the rank."""
    rows = []
    for layers, rank in [(2, 8), (4, 8), (8, 8), (4, 4), (4, 16), (4, 32)]:
        scaled = argparse.Namespace(**{**vars(args), "layers": layers, "rank": rank})
        base = build_base(scaled)
        runner = Runner("roselora-decay", base, scaled)
        for _ in range(2 + args.rounds // 2):
            runner.step()
        samples = runner.schedule_seconds[2:]
        rows.append(
            {
                "layers": layers,
                "adapted_modules": layers * len(TARGETS),
                "rank": rank,
                "schedule_ms": 1000 * statistics.median(samples),
            }
        )
        del base, runner
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in (
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "vocab",
        "seq",
        "batch",
        "rank",
        "rounds",
        "warmup",
        "steps_per_sample",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--no-scaling", action="store_true", help="skip the schedule scaling sweep")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return

    base = build_base(args)
    runners = {method: Runner(method, base, args) for method in METHODS}
    samples = {method: [] for method in METHODS}
    for round_index in range(args.warmup + args.rounds):
        # interleaved, and the order rotated every round (A B C ..., B C ... A, ...) so that no method always runs
        # first or after the same neighbour
        shift = round_index % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            seconds = time_steps(runners[method], args.steps_per_sample)
            if round_index >= args.warmup:
                samples[method].append(seconds)
    medians = {method: statistics.median(values) for method, values in samples.items()}
    # the median over rounds of each round's ratio to LoRA's sample: paired, so slow drifts of the machine cancel
    paired = {m: statistics.median(a / b for a, b in zip(samples[m], samples["lora"])) for m in METHODS}
    schedule = {
        method: 1000 * statistics.median(runner.schedule_seconds[args.warmup * args.steps_per_sample :])
        for method, runner in runners.items()
        if method.startswith("roselora")
    }

    ids = runners["lora"].input_ids
    merged = copy.deepcopy(runners["roselora-final"].model).merge_and_unload().eval()
    base.eval()
    unmerged_rose = runners["roselora-final"].model.eval()
    unmerged_lora = runners["lora"].model.eval()
    inference = {"base": [], "roselora-merged": [], "lora-unmerged": [], "roselora-unmerged": []}
    for _ in range(args.warmup + args.rounds):
        for name, model in (
            ("base", base),
            ("roselora-merged", merged),
            ("lora-unmerged", unmerged_lora),
            ("roselora-unmerged", unmerged_rose),
        ):
            inference[name].extend(time_forward(model, ids, 1, args.device))
    inference = {name: statistics.median(values[args.warmup :]) for name, values in inference.items()}

    memory = {}
    if not args.no_memory:
        for method in (
            "lora",
            "roselora-decay",
            "roselora-decay-bf16-importance",
            "roselora-final-persistent",
            "adalora",
        ):
            command = [
                sys.executable,
                __file__,
                "--memory-probe",
                method,
                "--preset",
                args.preset,
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            for key in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq", "batch", "rank"):
                if getattr(args, key) is not None:
                    command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory[method] = json.loads(out)

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "config": {k: getattr(args, k) for k in (*PRESETS["cpu"], "kv_heads", "preset")},
        "step_seconds_median": medians,
        "step_ratio_to_lora": {m: medians[m] / medians["lora"] for m in METHODS},
        "step_ratio_to_lora_paired": paired,
        "schedule_update_ms_median": schedule,
        "schedule_share_of_step": {m: schedule[m] / 1000 / medians[m] for m in schedule},
        "inference_seconds_median": inference,
        "merged_over_base": inference["roselora-merged"] / inference["base"],
        "unmerged_roselora_over_lora": inference["roselora-unmerged"] / inference["lora-unmerged"],
        "memory": memory,
        "samples": samples,
    }
    if memory:
        extra = memory["roselora-decay"]["train_bytes"] - memory["lora"]["train_bytes"]
        allowed = memory["roselora-decay"]["fp32_importance_bytes"] + memory["roselora-decay"]["mask_bytes"]
        result["memory_roselora_minus_lora_bytes"] = extra
        result["memory_allowed_bytes"] = allowed
        # the allowance of issue "Performance at real model shapes": one fp32 copy of the adapter
        result["memory_extra_in_fp32_adapter_copies"] = extra / memory["roselora-decay"]["fp32_importance_bytes"]
        bf16 = memory["roselora-decay-bf16-importance"]["train_bytes"] - memory["lora"]["train_bytes"]
        result["memory_bf16_importance_minus_lora_bytes"] = bf16
        result["memory_bf16_importance_in_fp32_adapter_copies"] = (
            bf16 / memory["roselora-decay"]["fp32_importance_bytes"]
        )
        if "steady_train_bytes" in memory["lora"]:
            steady = memory["roselora-final-persistent"]["steady_train_bytes"] - memory["lora"]["steady_train_bytes"]
            result["memory_persistent_after_tf_minus_lora_bytes"] = steady
            result["memory_persistent_after_tf_in_fp32_adapter_copies"] = (
                steady / memory["roselora-decay"]["fp32_importance_bytes"]
            )
    if not args.no_scaling:
        result["schedule_scaling"] = schedule_scaling(args)

    print(f"\n{'method':<28}{'step (s)':>10}{'ratio':>8}{'paired':>8}{'schedule (ms)':>15}{'share':>8}")
    for method in METHODS:
        sched = schedule.get(method)
        share = f"{sched / 1000 / medians[method]:>8.3f}" if sched is not None else f"{'':>8}"
        sched_text = f"{sched:>15.2f}" if sched is not None else f"{'':>15}"
        ratio = medians[method] / medians["lora"]
        print(f"{method:<28}{medians[method]:>10.4f}{ratio:>8.3f}{paired[method]:>8.3f}{sched_text}{share}")
    print(
        f"inference: merged RoseLoRA / base {result['merged_over_base']:.3f}; unmerged RoseLoRA / LoRA "
        f"{result['unmerged_roselora_over_lora']:.3f}"
    )
    if memory:
        print(
            f"training memory: RoseLoRA - LoRA = {result['memory_roselora_minus_lora_bytes'] / 2**20:.1f} MiB "
            f"(allowed: fp32 importance + masks = {result['memory_allowed_bytes'] / 2**20:.1f} MiB); AdaLoRA - LoRA "
            f"= {(memory['adalora']['train_bytes'] - memory['lora']['train_bytes']) / 2**20:.1f} MiB; RoseLoRA - LoRA "
            f"= {result['memory_extra_in_fp32_adapter_copies']:.2f} fp32 copies of the adapter "
            f"({result['memory_bf16_importance_in_fp32_adapter_copies']:.2f} with importance_dtype='bfloat16')"
        )
    for row in result.get("schedule_scaling", []):
        modules, rank, ms = row["adapted_modules"], row["rank"], row["schedule_ms"]
        print(f"schedule update: {modules:>3} modules, rank {rank:>2}: {ms:.2f} ms")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
