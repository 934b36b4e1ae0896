"""QLoRA-style RoseLoRA on a mixture-of-experts model: a 4-bit base, the attention projections and the expert
weights (bare 3-D parameters, as Qwen3-MoE, gpt-oss and Llama 4 store them) adapted. Offline, CPU, about a minute.

    python examples/moe_qlora.py [--steps 60] [--output-dir examples/output/moe_qlora]

A tiny Qwen3-MoE (4 experts, 2 active per token) is built from a config, pre-trained for a moment on one toy rule
(next token = token + 1) and saved; it is then loaded with bitsandbytes 4-bit (nf4) weights for its linear layers
(the expert tensors are parameters, not linear layers, and stay in full precision, as with QLoRA on MoE models) and
RoseLoRA teaches it another rule (next token = token + 3) through ``target_modules=["q_proj", "v_proj"]`` and
``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``, pruning every row of ``lora_A`` and
column of ``lora_B`` to 25 % of its entries. The script then prints the sparsity report, saves the adapter, reloads
it in a new process that does not import peft_roselora (the autoload hook registers RoseLoRA) and checks the
logits, and writes ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quickstart import VOCAB, accuracy, rule_batch  # noqa: E402  (the toy rules of the quickstart)


EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def pretrained_base(folder: str, steps: int = 150) -> None:
    """A tiny Qwen3-MoE that knows rule +1, saved to ``folder``."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = Qwen3MoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = rule_batch(1, generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


def load_4bit(folder: str):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--output-dir", default=os.path.join("examples", "output", "moe_qlora"))
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="roselora-moe-")
    base_dir, adapter_dir = os.path.join(work, "base"), os.path.join(args.output_dir, "adapter")
    pretrained_base(base_dir)

    base = load_4bit(base_dir)
    quantized = sum(type(m).__name__ == "Linear4bit" for m in base.modules())
    config = RoseLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=EXPERT_PARAMETERS,
        keep_ratio=args.keep_ratio,
        prune_start_step=0.1,
        prune_end_step=0.7,
        total_step=args.steps,
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    generator = torch.Generator().manual_seed(2)
    # no forward pass before training: bitsandbytes 0.50 on CPU repacks a 4-bit weight at its first forward and then
    # takes a kernel without backward (an upstream issue that plain PEFT LoRA has too; docs/usage.md)
    model.train()
    for _ in range(args.steps):
        ids = rule_batch(3, generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = accuracy(model, 3, torch.Generator().manual_seed(9))
    report = model.sparsity_report()
    print(report)
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(adapter_dir)
    ids = rule_batch(3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": logits}, os.path.join(work, "expected.pt"))

    # a new process that never imports peft_roselora: the autoload hook registers RoseLoRA when peft is imported
    check = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from peft import PeftModel
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained({base_dir!r}, quantization_config=quantization,
                                                    dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {adapter_dir!r}).eval()
        expected = torch.load({os.path.join(work, "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            diff = (model(input_ids=expected["ids"]).logits - expected["logits"]).abs().max().item()
        print(diff)
        """
    )
    fresh = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600
    )
    if fresh.returncode != 0:
        raise RuntimeError(f"reloading in a fresh process failed:\n{fresh.stderr[-3000:]}")
    reload_diff = float(fresh.stdout.strip().splitlines()[-1])
    expert_rows = [row for row in report.modules if row.blocks > 1]
    result = {
        "steps": args.steps,
        "linear4bit_layers_in_base": quantized,
        "accuracy_rule3_after": after,
        "keep_ratio_reached": report.keep_ratio_reached,
        "within_bounds": report.within_bounds,
        "expert_modules": [row.name for row in expert_rows],
        "experts_per_module": sorted({row.blocks for row in expert_rows}),
        "delta_density": report.delta_density,
        "nominal_bound": report.nominal_bound,
        "fresh_process_reload_max_logit_diff": reload_diff,
    }
    with open(os.path.join(args.output_dir, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
