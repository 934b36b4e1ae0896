"""Supervised fine-tuning with TRL's SFTTrainer and RoseLoRA, fully offline on CPU.

    python examples/sft_trl.py [--max-steps 40] [--keep-ratio 0.25] [--load-in-4bit] [--output-dir DIR]

Everything is built in the script: a byte-level BPE tokenizer trained on the data, a tiny Llama from a config
(optionally loaded in 4-bit with bitsandbytes: QLoRA), and a small dataset of facts. TRL's defaults stay on
(gradient checkpointing; bf16 where the machine supports it). The RoseLoRA schedule is driven by
``RoseLoraCallback``; the adapter, the sparsity report (JSON) and the Trainer logs go to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import SFTConfig, SFTTrainer

from peft_roselora import RoseLoraCallback, RoseLoraConfig


COUNTRIES = ["France", "Italy", "Spain", "Japan", "Kenya", "Peru", "Chile", "Egypt", "Nepal", "Norway"]
CAPITALS = ["Paris", "Rome", "Madrid", "Tokyo", "Nairobi", "Lima", "Santiago", "Cairo", "Kathmandu", "Oslo"]


def build_texts(rows: int = 200) -> list[str]:
    templates = ["The capital of {c} is {k}.", "{k} is the capital city of {c}.", "Q: capital of {c}? A: {k}."]
    return [templates[i % 3].format(c=COUNTRIES[i % 10], k=CAPITALS[i % 10]) for i in range(rows)]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def build_model(vocab_size: int, pad_token_id: int, load_in_4bit: bool, work_dir: str):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        pad_token_id=pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if not load_in_4bit:
        return model
    path = os.path.join(work_dir, "base")
    model.save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)


def build_trainer(max_steps: int, keep_ratio: float, load_in_4bit: bool, output_dir: str) -> SFTTrainer:
    """The SFTTrainer of this example: RoseLoRA through ``peft_config=``, the schedule through the callback."""
    texts = build_texts()
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), tokenizer.pad_token_id, load_in_4bit, output_dir)
    peft_config = RoseLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        keep_ratio=keep_ratio,
        task_type="CAUSAL_LM",  # total_step comes from max_steps via the callback
    )
    training_args = SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=32,
        dataloader_num_workers=0,
    )
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[RoseLoraCallback()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: load the base in 4-bit (nf4)")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="roselora-sft-")

    trainer = build_trainer(args.max_steps, args.keep_ratio, args.load_in_4bit, output_dir)
    trainer.train()

    report = trainer.model.sparsity_report()
    print(report)
    trainer.model.save_pretrained(os.path.join(output_dir, "adapter"))
    summary = {
        **{k: v for k, v in report.to_dict().items() if k != "modules"},
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "bf16": trainer.args.bf16,
        "load_in_4bit": args.load_in_4bit,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "logged_keep_ratio": [e.get("roselora_keep_ratio") for e in trainer.state.log_history if "loss" in e],
    }
    with open(os.path.join(output_dir, "sparsity_report.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"adapter and sparsity_report.json saved to {output_dir}")


if __name__ == "__main__":
    main()
