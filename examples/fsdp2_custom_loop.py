"""RoseLoRA under FSDP2 (``torch.distributed.fsdp.fully_shard``) or a DeepSpeed ZeRO engine, in a plain training
loop, with checkpoints.

    torchrun --nproc_per_node 2 examples/fsdp2_custom_loop.py --output-dir out/fsdp2          # 2 GPUs, or 2 CPU
    torchrun --nproc_per_node 2 examples/fsdp2_custom_loop.py --deepspeed 3 --output-dir out/z3   # ZeRO-3 engine
    python examples/fsdp2_custom_loop.py --output-dir out/single                               # one process, same run

FSDP2: every decoder layer and then the whole model are sharded with ``fully_shard``; ``register_optimizer_hooks``
drives the schedule exactly as in one process (the importance EMAs stay sharded like the factors; each mask
selection gathers them once). DeepSpeed (``--deepspeed 1|2|3``): ``deepspeed.initialize`` builds a ZeRO engine and
``register_optimizer_hooks(model, engine.optimizer)`` attaches the schedule to its step (``peft_roselora.zero``).
The global batch is the same whatever the number of processes, so every run ends with the same masks and (to float
rounding) the same factors: ``tests/test_fsdp2.py`` checks it for 1, 2 and 3 processes, and that a run stopped at
``--stop-at N`` and resumed with ``--resume`` ends where the uninterrupted one does, with sharded
(``torch.distributed.checkpoint``) and full checkpoints, and with a 4-bit bitsandbytes base (``--qlora``: FSDP2 +
QLoRA, ``bnb_4bit_quant_storage=torch.float32`` so that FSDP2 can shard the packed weights);
``tests/test_deepspeed.py`` checks ZeRO-1/2/3.

Writes ``<output-dir>/adapter.safetensors`` (the masked factors and masks, gathered whole) and ``result.json`` on
rank 0, and ``masks_rank<k>.safetensors`` on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import get_peft_model
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from peft_roselora import RoseLoraConfig, register_optimizer_hooks, sharding


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _distributed import leave_after_clean_run  # noqa: E402


GLOBAL_BATCH = 6  # rows per optimizer step, split evenly over 1, 2 or 3 processes
SEQUENCE = 12
VOCAB = 128


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same base model and initial adapter on every process
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=100,  # output rows that 2 and 3 processes do not divide evenly
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
    )
    if args.qlora:  # QLoRA: the same base, saved once and loaded 4-bit (nf4) with a quant storage FSDP2 can shard
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        folder = Path(args.output_dir) / "base"
        if dist.get_rank() == 0:
            model.save_pretrained(folder)
        dist.barrier()
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
        torch.manual_seed(1)  # the same initial adapter on every process
    config = RoseLoraConfig(
        r=5,
        lora_alpha=10,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"v_proj": 2},  # r=2: with 3 processes one holds no rows of lora_A
        keep_ratio=args.keep_ratio,
        prune_mode=args.prune_mode,
        total_step=args.max_steps,
        prune_start_step=2,
        prune_end_step=args.max_steps - 2,
        clamp_value=args.clamp_value,
    )
    return get_peft_model(model, config)


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    rows = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1000 + step))
    share = GLOBAL_BATCH // world
    return rows[rank * share : (rank + 1) * share]


def adapter_only(state: dict) -> dict:
    return {key: value for key, value in state.items() if "lora_" in key}


def save_checkpoint(model, optimizer, step: int, folder: Path, full: bool) -> None:
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    state = {
        "model": adapter_only(get_model_state_dict(model, options=options)),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),  # carries the schedule state
        "step": step,
    }
    if full:
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / "checkpoint.pt")
        dist.barrier()
    else:
        dcp.save(state, checkpoint_id=str(folder))


def load_checkpoint(model, optimizer, folder: Path, full: bool) -> int:
    if full:
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True, strict=False)
    else:
        state = {
            "model": adapter_only(get_model_state_dict(model)),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "step": 0,
        }
        dcp.load(state, checkpoint_id=str(folder))
        options = StateDictOptions(strict=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)  # restores the schedule
    return int(state["step"])


def write_trace(tuner, folder: Path, step: int) -> None:
    """The masks and masked factors after ``step`` (gathered: collective), and in one process the importance EMAs
    (``importance_A.<module>``, ``importance_B.<module>``) that selected the masks."""
    state = tuner.masked_adapter_state()
    if dist.get_world_size() == 1:
        schedule = tuner.adapter_schedule()
        for factor, store in (("A", schedule.importance_A), ("B", schedule.importance_B)):
            for name, ema in store.items():
                state[f"importance_{factor}.{name}"] = ema.detach().cpu().contiguous()
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, folder / f"step{step}.safetensors")


def poison_one_gradient_entry(model) -> None:
    """Set the last output row's first entry of the last layer's ``up_proj`` ``lora_B`` gradient to NaN, on the
    process that holds that row (every row in one process; one shard's under FSDP2)."""
    factor = model.base_model.model.model.layers[-1].mlp.up_proj.lora_B["default"].weight
    last = factor.shape[0] - 1
    held = sharding.shard_rows(factor.grad) if sharding.is_sharded(factor.grad) else slice(0, last + 1)
    if held.start <= last < held.stop:
        sharding.local_tensor(factor.grad)[last - held.start, 0] = float("nan")


def zero_non_finite_gradients(model) -> None:
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.nan_to_num_(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--prune-mode", choices=["reselect", "persistent"], default="reselect")
    parser.add_argument("--clamp-value", type=float, default=None)
    parser.add_argument("--stop-at", type=int, default=None, help="save a checkpoint after this step and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <output-dir>/checkpoint")
    parser.add_argument("--full-checkpoint", action="store_true", help="full state dict on rank 0, not sharded DCP")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--qlora", action="store_true", help="a bitsandbytes 4-bit base (FSDP2 + QLoRA)")
    parser.add_argument("--deepspeed", type=int, choices=[1, 2, 3], default=None, help="a ZeRO engine, not FSDP2")
    parser.add_argument(
        "--trace",
        default=None,
        help="write the gathered masks and factors (and, in one process, the importance EMAs) after every step to "
        "<trace>/step<t>.safetensors",
    )
    parser.add_argument(
        "--nan-grad-step",
        type=int,
        default=None,
        help="make one gradient entry NaN at this step (the last output row of the last up_proj's lora_B: one "
        "process holds it under FSDP2), then zero it after the importance update, before the optimizer",
    )
    args = parser.parse_args()
    if args.nan_grad_step is not None and args.deepspeed is not None:
        parser.error("--nan-grad-step is for FSDP2 and one process, not --deepspeed")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:  # one process: a process group of one (in-memory store), so that checkpoints use the same API
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = build_model(args).to(device)
    if distributed and args.deepspeed is None:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    engine = None
    if args.deepspeed is not None:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": args.deepspeed},
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    register_optimizer_hooks(model, optimizer)  # with DeepSpeed: engine.optimizer, the ZeRO optimizer
    if args.nan_grad_step is not None:  # runs after the schedule's pre-hook: the importance update sees the NaN
        optimizer.register_step_pre_hook(lambda *_: zero_non_finite_gradients(model))

    output = Path(args.output_dir)
    checkpoint = Path(args.checkpoint_dir) if args.checkpoint_dir else output / "checkpoint"
    if engine is not None and args.resume:  # DeepSpeed's own checkpoint; the optimizer state carries the schedule
        _, client_state = engine.load_checkpoint(str(checkpoint), tag="latest-roselora")
        start = int(client_state["step"])
    elif args.resume:
        start = load_checkpoint(model, optimizer, checkpoint, args.full_checkpoint)
    else:
        start = 0
    last = args.stop_at if args.stop_at is not None else args.max_steps

    model.train()
    for step in range(start, last):
        ids = batch(step, rank, world).to(device)
        if engine is not None:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()  # the schedule runs around the ZeRO optimizer's step
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step + 1 == args.nan_grad_step:
                poison_one_gradient_entry(model)
            optimizer.step()  # hooks: update_importance() before, prune_step() after
            optimizer.zero_grad(set_to_none=True)
        if args.trace:
            write_trace(model.base_model, Path(args.trace), step + 1)
    if args.stop_at is not None and engine is not None:
        engine.save_checkpoint(str(checkpoint), tag="latest-roselora", client_state={"step": last})
    elif args.stop_at is not None:
        save_checkpoint(model, optimizer, last, checkpoint, args.full_checkpoint)

    tuner = model.base_model
    density = tuner.factor_density()  # collective under FSDP2 and ZeRO
    adapter = tuner.masked_adapter_state()  # gathered whole: collective too
    nonfinite = [None] * dist.get_world_size()
    dist.all_gather_object(nonfinite, tuner.adapter_schedule().nonfinite_steps)
    output.mkdir(parents=True, exist_ok=True)
    masks = {key: value for key, value in adapter.items() if "lora_mask" in key}
    save_file(masks, output / f"masks_rank{rank}.safetensors")
    if rank == 0:
        save_file(adapter, output / "adapter.safetensors")
        stats = tuner.communication_stats
        result = {
            "world_size": world,
            "schedule_step": tuner.steps_taken(),
            "keep_ratio": tuner.current_keep_ratio(),
            "factor_density": density,
            "collectives": stats.collectives,
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "nonfinite_steps_per_rank": nonfinite,
        }
        (output / "result.json").write_text(json.dumps(result, indent=2))
        print(f"world size {world}, schedule step {result['schedule_step']}, factor density {density:.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_after_clean_run()
