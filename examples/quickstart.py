"""RoseLoRA quickstart: train, inspect sparsity, save, reload, merge. Runs offline on CPU in well under a minute.

    python examples/quickstart.py [--steps 300] [--output-dir examples/output/quickstart]

A tiny Llama is built from a config and pre-trained for a moment on one toy rule (next token = token + 1); RoseLoRA
then teaches it a new rule (next token = token + 3) on the attention and MLP projections, pruning every row of
``lora_A`` and column of ``lora_B`` to 10 % of its entries on the cubic schedule.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


VOCAB, LENGTH, BATCH = 64, 16, 32


def rule_batch(shift: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences in which every token is the previous one plus ``shift`` (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    return (start + shift * torch.arange(LENGTH)) % VOCAB


def accuracy(model, shift: int, generator: torch.Generator) -> float:
    ids = rule_batch(shift, generator)
    with torch.no_grad():
        predictions = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predictions == ids[:, 1:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="RoseLoRA optimizer steps")
    parser.add_argument("--keep-ratio", type=float, default=0.1, help="final keep ratio tau")
    parser.add_argument("--output-dir", default=None, help="where to save the adapter (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
    )
    base = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for _ in tqdm(range(150), desc="pre-training the base on rule +1"):
        ids = rule_batch(1, generator)
        base(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base.eval()
    print(
        f"base model: accuracy on rule +1 {accuracy(base, 1, generator):.3f}, on rule +3 "
        f"{accuracy(base, 3, generator):.3f}"
    )

    rose_config = RoseLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        keep_ratio=args.keep_ratio,
        total_step=args.steps,  # prune_start_step=10 %, prune_end_step=80 % of the steps
    )
    model = get_peft_model(base, rose_config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    peft_roselora.register_optimizer_hooks(model, optimizer)  # importance before, pruning after every step
    model.train()
    progress = tqdm(range(args.steps), desc="RoseLoRA on rule +3")
    for _ in progress:
        ids = rule_batch(3, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}", keep=f"{model.current_keep_ratio():.3f}", refresh=False)
    model.eval()

    report = model.sparsity_report()
    print(report)
    print(
        f"\nkeep ratio reached {report.keep_ratio_reached:.4f} (target {args.keep_ratio}); factor non-zeros "
        f"{report.factor_nonzeros}/{report.factor_numel}; merged-delta density {report.delta_density:.5f} <= "
        f"r * tau^2 bound {report.nominal_bound:.5f}: {report.within_bounds}"
    )
    adapted_accuracy = accuracy(model, 3, torch.Generator().manual_seed(1))
    print(f"RoseLoRA model: accuracy on rule +3 {adapted_accuracy:.3f}")

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="roselora-quickstart-")
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    print(f"saved adapter to {output_dir} ({sorted(os.listdir(output_dir))})")

    reloaded = PeftModel.from_pretrained(model.unload(), output_dir).eval()  # the same base weights, fresh adapter
    reloaded_accuracy = accuracy(reloaded, 3, torch.Generator().manual_seed(1))
    merged = reloaded.merge_and_unload()
    merged_accuracy = accuracy(merged, 3, torch.Generator().manual_seed(1))
    print(f"reloaded: accuracy {reloaded_accuracy:.3f}; merged into the base: accuracy {merged_accuracy:.3f}")
    assert reloaded_accuracy == adapted_accuracy and abs(merged_accuracy - adapted_accuracy) < 0.02


if __name__ == "__main__":
    main()
