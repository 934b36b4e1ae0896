"""The GPU check kit: one script, under 8 minutes on one GPU, writing ``check.json`` and ``check.md``.

    python benchmarks/gpu/check.py --output-dir benchmarks/results/gpu_check          # on a GPU machine
    python benchmarks/gpu/check.py --device cpu --quick --output-dir /tmp/gpu_check   # CI's CPU run

Checks, each reported with its numbers (or why it did not run):

1. step time, median of interleaved rounds, RoseLoRA (decay phase) and AdaLoRA against PEFT LoRA: on
   SmolLM2-135M-Instruct (``--model``, default ``smollm2``) in bf16, and on one Llama-2-7B-shaped decoder layer
   (hidden 4096, MLP 11008); ``--quick``: a tiny Llama in fp32 instead of both;
2. ops dispatched per optimizer step (``benchmarks/dispatch_count.py``) and, on CUDA, the CUDA kernels the profiler
   records in one RoseLoRA step against LoRA's;
3. fp16 with a GradScaler whose first steps overflow: the skipped steps are skipped by the schedule too (CUDA);
4. QLoRA: a bitsandbytes 4-bit base trains and keeps the keep ratio (CUDA; bitsandbytes also runs it on CPU);
5. ``torch.compile``: graphs and graph breaks of RoseLoRA against LoRA over 10 training steps;
6. peak memory of the training step (CUDA ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraCallback, RoseLoraConfig


HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _adapted(base, method: str, steps: int):
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    elif method == "adalora":
        config = AdaLoraConfig(init_r=8, target_r=4, target_modules=TARGETS, total_step=steps, tinit=1, tfinal=1)
    else:  # the decay phase the whole time: masks recomputed every step
        config = RoseLoraConfig(
            r=8, lora_alpha=16, target_modules=TARGETS, keep_ratio=0.1, total_step=steps * 100, prune_start_step=0.0
        )
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if method == "roselora":
        peft_roselora.register_optimizer_hooks(model, optimizer)
    return model, optimizer


def step_times(make_base, batch: tuple[int, int], device: str, dtype, rounds: int, vocab: int) -> dict:
    """Median step seconds per method over ``rounds`` interleaved rounds (2 steps each, after a warm-up)."""
    models = {}
    for method in ("lora", "roselora", "adalora"):
        torch.manual_seed(0)
        models[method] = _adapted(make_base().to(device=device, dtype=dtype), method, rounds * 2 + 2)
    ids = torch.randint(0, vocab, batch, device=device)
    samples = {method: [] for method in models}
    for round_index in range(rounds + 2):
        for method, (model, optimizer) in models.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                if method == "adalora":
                    model.base_model.update_and_allocate(len(samples[method]))
                optimizer.step()
                optimizer.zero_grad()
            _sync(device)
            if round_index >= 2:  # rounds 0 and 1 warm up
                samples[method].append((time.perf_counter() - start) / 2)
    medians = {method: statistics.median(values) for method, values in samples.items()}
    result = {"seconds": medians, "ratio_to_lora": {m: medians[m] / medians["lora"] for m in medians}}
    if device == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def cuda_kernels(device: str) -> dict:
    """CUDA kernels the profiler records in one optimizer step (forward, backward, step) of each method."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for method in ("lora", "roselora"):
        torch.manual_seed(0)
        model, optimizer = _adapted(_tiny_llama(10).to(device), method, 20)
        ids = torch.randint(0, 128, (2, 64), device=device)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()
        counts[method] = sum(event.count for event in prof.key_averages() if event.device_type.name == "CUDA")
    counts["extra_kernels"] = counts["roselora"] - counts["lora"]
    return counts


def fp16_grad_scaler(device: str) -> dict:
    """A GradScaler whose first steps overflow, through the Trainer: skipped steps are skipped by the schedule."""
    if device != "cuda":
        return {"skipped": "needs CUDA (fp16 autocast with a GradScaler)"}
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(
        _tiny_llama(2), RoseLoraConfig(r=4, target_modules=["q_proj", "v_proj"], keep_ratio=0.25, total_step=20)
    )
    rows = [{"input_ids": list(range(i, i + 16)), "labels": list(range(i, i + 16))} for i in range(80)]
    arguments = TrainingArguments(
        output_dir="/tmp/roselora-gpu-fp16", max_steps=20, per_device_train_batch_size=4, fp16=True,
        report_to="none", save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=arguments, train_dataset=Dataset.from_list(rows), callbacks=[RoseLoraCallback()]
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40, backoff_factor=2.0**-30)
    trainer.train()
    schedule = model.base_model.adapter_schedule()
    return {
        "skipped_steps": schedule.skipped_steps,
        "schedule_steps": schedule.step,
        "ok": schedule.skipped_steps >= 1,
    }


def qlora(device: str) -> dict:
    """A bitsandbytes 4-bit base: RoseLoRA trains 12 steps and reaches its keep ratio."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:  # pragma: no cover
        return {"skipped": "transformers without bitsandbytes support"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "needs bitsandbytes"}
    import tempfile

    folder = tempfile.mkdtemp(prefix="roselora-qlora-")
    _tiny_llama(2, hidden=128).save_pretrained(folder)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map={"": device})
    config = RoseLoraConfig(r=4, target_modules=["q_proj", "v_proj"], keep_ratio=0.25, total_step=12)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    ids = torch.randint(0, 128, (2, 16), device=device)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    keep = model.base_model.current_keep_ratio()
    return {"device": device, "keep_ratio": keep, "first_loss": losses[0], "last_loss": losses[-1], "ok": keep == 0.25}


def compile_graphs(device: str) -> dict:
    """Graphs and graph breaks over 10 training steps with ``torch.compile`` (backend aot_eager on CPU)."""
    from torch._dynamo.utils import counters

    result = {}
    for method in ("lora", "roselora"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model, optimizer = _adapted(_tiny_llama(2).to(device), method, 10)
        compiled = torch.compile(model, backend="inductor" if device == "cuda" else "aot_eager")
        ids = torch.randint(0, 128, (2, 16), device=device)
        for _ in range(10):
            compiled(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result[method] = {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }
    result["ok"] = result["roselora"]["graphs"] <= result["lora"]["graphs"] + 1
    return result


def _tiny_llama(layers: int, hidden: int = 64) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128,
        )
    )  # fmt: skip


def _llama2_7b_layer() -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=128,
        )
    )  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}, {report['torch']}{', quick' if report['quick'] else ''})", ""]
    lines += ["| check | result |", "|---|---|"]
    for name, result in report["step_time"].items():
        ratios = result["ratio_to_lora"]
        memory = f", peak {result['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in result else ""
        lines.append(
            f"| step time, {name} | LoRA {result['seconds']['lora'] * 1e3:.1f} ms; RoseLoRA / LoRA "
            f"{ratios['roselora']:.3f}, AdaLoRA / LoRA {ratios['adalora']:.3f}{memory} |"
        )
    dispatch = report["dispatch"]["phases"]
    lines.append(
        "| extra ops per step over LoRA (reselect decay / persistent decay / persistent after t_f) | "
        + " / ".join(str(dispatch[p][max(report["dispatch"]["layers"])]["extra_ops"]) for p in
                     ("reselect, decay", "persistent, decay", "persistent, after t_f"))
        + f" at {7 * max(report['dispatch']['layers'])} modules |"
    )  # fmt: skip
    for name in ("cuda_kernels", "fp16_grad_scaler", "qlora", "compile"):
        lines.append(f"| {name.replace('_', ' ')} | {json.dumps(report[name])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny models, few rounds (CI's CPU run)")
    parser.add_argument("--model", default="smollm2", help="the real model of the step-time check (not in --quick)")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check.py: --device cuda, but no CUDA device is available (use --device cpu --quick)", file=sys.stderr)
        raise SystemExit(2)
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "quick": args.quick}
    report["torch"] = torch.__version__
    if args.quick:
        dtype = torch.float32
        report["step_time"] = {
            "tiny Llama (4 layers, hidden 64), fp32": step_times(
                lambda: _tiny_llama(4), (2, 32), args.device, dtype, 3, 128
            )
        }
    else:
        from peft_roselora.pretrained import resolve_model

        folder = resolve_model(args.model)
        dtype = torch.bfloat16
        report["step_time"] = {
            f"{args.model}, bf16, batch 8 x 256": step_times(
                lambda: AutoModelForCausalLM.from_pretrained(folder), (8, 256), args.device, dtype, 10, 1000
            ),
            "one Llama-2-7B-shaped layer, bf16, batch 1 x 1024": step_times(
                _llama2_7b_layer, (1, 1024), args.device, dtype, 10, 128
            ),
        }
    dispatch = _load("dispatch_count")
    report["dispatch"] = dispatch.main(["--layers", "2", "4"] if args.quick else ["--layers", "10", "30"])
    report["cuda_kernels"] = cuda_kernels(args.device)
    report["fp16_grad_scaler"] = fp16_grad_scaler(args.device)
    report["qlora"] = qlora(args.device)
    report["compile"] = compile_graphs(args.device)
    report["seconds"] = time.perf_counter() - start
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "check.json").write_text(json.dumps(report, indent=1, default=str))
    (output / "check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {output} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
