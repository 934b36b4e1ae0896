"""Run the Python blocks of a Markdown file, in order, in one namespace (``python tests/doc_snippets.py FILE``).

Every fenced ``python`` block runs unless the line before its fence is ``<!-- doc-test: skip (reason) -->``. The
namespace starts with tiny local stand-ins for what the documentation assumes the reader has: ``model_id`` (a local
folder holding a small Llama-shaped causal LM and an offline byte-level BPE tokenizer, loadable with
``from_pretrained`` like a Hub id), ``dataset`` (tokenized, with ``input_ids`` and ``labels``) and ``loader`` (a
DataLoader over it, 16 batches). The blocks run in a scratch folder,
so relative paths they write stay there. Run by ``tests/test_docs.py``, in a fresh process per file.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


FENCE = re.compile(r"^```python\s*$")
SKIP = re.compile(r"^<!-- doc-test: skip \((.+)\) -->\s*$")
REPO = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every fenced python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if FENCE.match(lines[index]):
            skip = SKIP.match(lines[index - 1]) if index else None
            end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((index + 1, "\n".join(lines[index + 1 : end]) + "\n", skip.group(1) if skip else None))
            index = end
        index += 1
    return blocks


def stand_ins() -> dict:
    """The names the documentation assumes, as tiny offline objects."""
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "examples"))
    from sft_trl import build_texts, build_tokenizer

    texts = build_texts(64)
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model_id = str(Path(os.environ.get("DOC_SNIPPETS_DIR", ".")).resolve() / "tiny-llama")
    LlamaForCausalLM(config).save_pretrained(model_id)
    tokenizer.save_pretrained(model_id)
    ids = [tokenizer(text, truncation=True, max_length=16, padding="max_length")["input_ids"] for text in texts]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = DataLoader(dataset.with_format("torch", columns=["input_ids"]), batch_size=4, collate_fn=collator)
    return {"model_id": model_id, "dataset": dataset, "loader": loader}


def main(path: str) -> int:
    source = Path(path).resolve()
    blocks = python_blocks(source)
    scratch = Path(os.environ.get("DOC_SNIPPETS_DIR", "."))
    scratch.mkdir(parents=True, exist_ok=True)
    namespace = {"__name__": "__doc_snippets__", **stand_ins()}
    os.chdir(scratch)
    ran = 0
    for line, code, skip in blocks:
        if skip is not None:
            continue
        exec(compile(code, f"{source.name}:{line}", "exec"), namespace)
        ran += 1
    print(f"ran {ran} of {len(blocks)} python blocks of {source.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
