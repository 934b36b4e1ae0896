"""Knowledge editing: loaders (MEND, EasyEdit, CounterFact, the shared zsRE file), metrics on hand-computed cases,
a real edit that flips a tiny model's prediction, baselines, bad records."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from peft_roselora.editing import (
    EditDataError,
    EditHyperParams,
    Editor,
    load_edit_requests,
    metrics,
    parse_edit_records,
)


# 12 real zsRE records and the one malformed record (empty `alt`, record 83 of the team's 783-record copy)
ZSRE = Path(__file__).resolve().parent / "fixtures" / "zsre_sample.json"
MEND_RECORD = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": " University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father",
    "loc_ans": "Hugo Weaving",
    "cond": "x",
}
EASYEDIT_RECORD = {
    "subject": "Ray Charles",
    "prompt": "The instrument Ray Charles played is",
    "target_new": "violin",
    "ground_truth": ["piano"],
    "rephrase_prompt": "Ray Charles was known for playing the",
    "locality": {"Relation_Specificity": {"prompt": "The capital of France is", "ground_truth": ["Paris"]}},
    "portability": {
        "Reasoning": [{"prompt": "The instrument of the singer of 'Georgia' is", "ground_truth": "violin"}]
    },
}
COUNTERFACT_RECORD = {
    "requested_rewrite": {
        "prompt": "{} plays the sport of",
        "subject": "LeBron James",
        "target_new": {"str": "football"},
        "target_true": {"str": "basketball"},
    },
    "paraphrase_prompts": ["LeBron James is a professional"],
    "neighborhood_prompts": ["Kobe Bryant plays"],
}


def test_mend_loader():
    request = parse_edit_records([MEND_RECORD]).requests[0]
    assert request.prompt == MEND_RECORD["src"] and request.target_new == "University of Michigan"
    assert request.rephrase_prompts == [MEND_RECORD["rephrase"]]
    assert request.locality_prompts == [MEND_RECORD["loc"]] and request.locality_answers == ["Hugo Weaving"]
    assert request.ground_truth == ["Illinois Institute of Technology"] and request.subject == "Watts Humphrey"


def test_easyedit_and_counterfact_loaders(tmp_path):
    path = tmp_path / "easyedit.json"
    path.write_text(json.dumps([EASYEDIT_RECORD]))
    request = load_edit_requests(str(path)).requests[0]
    assert (request.prompt, request.target_new) == ("The instrument Ray Charles played is", "violin")
    assert request.locality_prompts == ["The capital of France is"] and request.locality_answers == ["Paris"]
    assert request.portability_answers == ["violin"] and request.rephrase_prompts == [
        EASYEDIT_RECORD["rephrase_prompt"]
    ]
    counterfact = parse_edit_records([COUNTERFACT_RECORD]).requests[0]
    assert counterfact.prompt == "LeBron James plays the sport of" and counterfact.target_new == "football"
    assert counterfact.locality_prompts == ["Kobe Bryant plays"] and counterfact.locality_answers == ["basketball"]


def test_zsre_fixture_loads_and_reports_its_one_bad_record():
    loaded = load_edit_requests(str(ZSRE), on_invalid="collect")
    assert len(loaded.requests) == 12
    assert loaded.requests[0].prompt == "What university did Watts Humphrey attend?"
    assert [(index, name) for index, name, _ in loaded.rejected] == [(12, "alt")]
    with pytest.raises(EditDataError, match="record 12: field 'alt' must be a non-empty string"):
        load_edit_requests(str(ZSRE))


def test_full_zsre_copy_loads_and_reports_its_one_bad_record():
    root = os.environ.get("ROSELORA_DATA")
    if not root:
        pytest.skip("the full zsRE copy is checked only with ROSELORA_DATA=DIR (CI sets it to ../shared/data)")
    path = Path(root) / "zsre" / "zsre_mend_eval_subset.json"
    assert path.is_file(), f"ROSELORA_DATA={root} is set but {path} is missing"
    loaded = load_edit_requests(str(path), on_invalid="collect")
    assert len(loaded.requests) + len(loaded.rejected) == 783
    assert [(index, name) for index, name, _ in loaded.rejected] == [(83, "alt")]


def test_dev_test_split_is_deterministic_disjoint_and_order_free():
    from peft_roselora.editing import select_split, split_of

    requests = load_edit_requests(str(ZSRE), on_invalid="collect").requests
    dev, test = select_split(requests, "dev"), select_split(requests, "test")
    assert [r.record_id for r in dev] == [1, 3, 4, 5, 6, 9, 11]  # fixed by content: the same on every machine
    assert sorted(r.record_id for r in dev + test) == [r.record_id for r in requests]
    assert select_split(list(reversed(requests)), "dev") == list(reversed(dev))  # order does not matter
    assert select_split(requests[:5], "dev") == [r for r in dev if r.record_id < 5]  # neither does --limit
    assert select_split(requests, "all") == requests
    assert all(split_of(r, dev_fraction=0.999999) == "dev" for r in requests)
    with pytest.raises(ValueError, match=r"`split` must be one of \['all', 'dev', 'test'\], got 'train'"):
        select_split(requests, "train")
    with pytest.raises(ValueError, match=r"`dev_fraction` must be a number in \(0, 1\), got 1.0"):
        split_of(requests[0], 1.0)
    with pytest.raises(ValueError, match=r"`dev_fraction` must be a number in \(0, 1\), got 2"):
        select_split(requests, "all", 2)  # checked even where it is not used


def test_full_zsre_copy_splits_into_dev_and_test():
    from peft_roselora.editing import select_split

    root = os.environ.get("ROSELORA_DATA")
    if not root:
        pytest.skip("the full zsRE copy is checked only with ROSELORA_DATA=DIR (CI sets it to ../shared/data)")
    requests = load_edit_requests(str(Path(root) / "zsre" / "zsre_mend_eval_subset.json"), on_invalid="collect")
    dev, test = select_split(requests.requests, "dev"), select_split(requests.requests, "test")
    assert (len(dev), len(test)) == (411, 371)  # of the 782 valid records


@pytest.mark.parametrize(
    "change,message",
    [
        ({"alt": ""}, "record 0: field 'alt' must be a non-empty string"),
        ({"src": None}, "record 0: field 'src' must be a non-empty string"),
        ({"subject": "Somebody Else"}, "record 0: field 'subject' .* does not occur in 'src'"),
        ({"rephrase": 3}, "record 0: field 'rephrase' must be a string or a list"),
        ({"loc_ans": ["a", "b"]}, "record 0: field 'loc_ans' has 2 answers for 1 'loc'"),
    ],
)
def test_bad_records_raise_named_errors(change, message):
    with pytest.raises(EditDataError, match=message):
        parse_edit_records([{**MEND_RECORD, **change}])
    collected = parse_edit_records([MEND_RECORD, {**MEND_RECORD, **change}], on_invalid="collect")
    assert len(collected.requests) == 1 and collected.rejected[0][0] == 1


def test_metric_functions_on_hand_computed_cases():
    assert metrics.token_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    assert metrics.unchanged_fraction(torch.tensor([5, 6]), torch.tensor([5, 7])) == 0.5
    assert (
        metrics.locality([torch.tensor([1, 2]), torch.tensor([3])], [torch.tensor([1, 2]), torch.tensor([4])]) == 0.5
    )
    assert metrics.locality([], []) is None
    with pytest.raises(ValueError, match="must be non-empty and of one shape"):
        metrics.token_accuracy(torch.tensor([1]), torch.tensor([1, 2]))


REQUEST = parse_edit_records(
    [
        {
            "prompt": "the capital of france is",
            "target_new": "rome",
            "rephrase_prompt": "what city is the capital of france",
            "locality": {"nq": {"prompt": "who wrote hamlet", "ground_truth": "shakespeare"}},
        }
    ]
).requests[0]


def test_roselora_edit_flips_the_prediction_and_restores_the_model(tiny_lm):
    model, tokenizer = tiny_lm
    ids = torch.tensor([tokenizer("the capital of france is")["input_ids"]])
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    assert tokenizer.convert_ids_to_tokens(int(before_logits[0, -1].argmax())) == "paris"
    hparams = EditHyperParams(
        method="roselora", lr=2e-2, clamp_value=None, target_modules=("q_proj", "v_proj", "down_proj")
    )
    editor = Editor(model, tokenizer, hparams)
    result = editor.edit_single(REQUEST)
    assert result.reliability == 1.0  # "rome" is now predicted after the prompt
    assert result.steps <= 25 and result.last_loss < result.first_loss
    # the merged update touches at most r * tau^2 of the adapted weights (tau = ceil(0.05 * n) / n, rounded up)
    assert 0 < result.changed_weights and result.changed_fraction_of_adapted <= 8 * (4 / 64) ** 2 + 1e-9
    with torch.no_grad():  # the editor restored the unedited model
        assert torch.equal(editor.model(input_ids=ids).logits, before_logits)


def test_adapter_layers_put_the_edit_on_those_layers_only(tiny_lm):
    model, tokenizer = tiny_lm
    hparams = EditHyperParams(method="roselora", lr=2e-2, target_modules=("down_proj",), adapter_layers=(1,))
    editor = Editor(copy.deepcopy(model), tokenizer, hparams)
    edited, [result] = editor.apply([REQUEST])
    assert result.changed_weights > 0
    for index, layer in enumerate(edited.model.layers):  # merged: only layer 1's down_proj differs
        for name, parameter in layer.named_parameters():
            changed = not torch.equal(parameter, dict(model.model.layers[index].named_parameters())[name])
            assert changed == (index == 1 and name == "mlp.down_proj.weight"), (index, name)
    with pytest.raises(ValueError, match="`adapter_layers` must be layer indices >= 0, got \\(-1,\\)"):
        EditHyperParams(adapter_layers=(-1,))


def test_the_defaults_and_the_authors_recipe():
    defaults, recipe = EditHyperParams(), EditHyperParams.authors_recipe()
    assert (defaults.target_modules, defaults.lr, defaults.clamp_value) == (("down_proj",), 1e-3, None)
    assert (recipe.target_modules, recipe.lr, recipe.clamp_value) == (("q_proj", "v_proj"), 5e-4, 3e-3)
    assert (recipe.r, recipe.lora_alpha, recipe.keep_ratio, recipe.steps) == (8, 32, 0.05, 25)
    assert (recipe.prune_start_step, recipe.prune_end_step, recipe.early_stop_loss) == (3, 20, 0.1)
    assert EditHyperParams.authors_recipe(lr=1e-2).lr == 1e-2


def _next_tokens(model, tokenizer, prompt: str, answer: str) -> list[int]:
    """By hand: the argmax token after every prefix of ``prompt + " " + answer`` that precedes an answer token."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    return [int(logits[len(prompt_ids) - 1 + i].argmax()) for i in range(len(answer_ids))]


@pytest.mark.parametrize("method", ["roselora", "lora", "adalora", "ft-l"])
def test_metrics_equal_a_recomputation_on_the_edited_model(tiny_lm, method):
    import copy

    model, tokenizer = tiny_lm
    hparams = EditHyperParams.scaled_to(10, method=method, lr=2e-2)
    torch.manual_seed(0)
    edited, [result] = Editor(copy.deepcopy(model), tokenizer, hparams).apply([REQUEST])
    target = tokenizer(" rome", add_special_tokens=False)["input_ids"]
    hits = [a == b for a, b in zip(_next_tokens(edited, tokenizer, REQUEST.prompt, "rome"), target)]
    assert result.reliability == sum(hits) / len(hits)
    rephrased = _next_tokens(edited, tokenizer, REQUEST.rephrase_prompts[0], "rome")
    assert result.generalization == sum(a == b for a, b in zip(rephrased, target)) / len(target)
    before = _next_tokens(model, tokenizer, "who wrote hamlet", "shakespeare")
    after = _next_tokens(edited, tokenizer, "who wrote hamlet", "shakespeare")
    assert result.locality == sum(a == b for a, b in zip(before, after)) / len(before)
    # what each method changes: RoseLoRA a sparse set within r * tau^2, the baselines every adapted weight
    if method == "roselora":
        assert 0 < result.changed_weights <= 8 * (4 / 64) ** 2 * result.adapted_weights
    else:
        assert result.changed_weights == result.adapted_weights


def test_bad_hyper_parameters_are_named():
    with pytest.raises(ValueError, match="`method` must be one of"):
        EditHyperParams(method="rome")
    with pytest.raises(ValueError, match="`steps` must be >= 1, got 0"):
        EditHyperParams(steps=0)
    with pytest.raises(ValueError, match="prune_start_step=3, prune_end_step=20, steps=10"):
        EditHyperParams(steps=10)
    scaled = EditHyperParams.scaled_to(10)
    assert (scaled.prune_start_step, scaled.prune_end_step, scaled.steps) == (1, 8, 10)


@pytest.mark.slow
def test_cli_writes_per_record_results_and_a_summary(tiny_lm, tmp_path):
    import subprocess
    import sys

    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = [
        {
            "prompt": "the capital of france is",
            "target_new": "rome",
            "rephrase_prompt": "what city is the capital of france",
            "locality": {"nq": {"prompt": "who wrote hamlet", "ground_truth": "shakespeare"}},
        },
        {"prompt": "who wrote hamlet", "target_new": "dickens"},
        {"prompt": "", "target_new": "berlin"},  # malformed: reported, not dropped silently
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    (tmp_path / "texts.txt").write_text("the capital of germany is berlin\nwho wrote hamlet shakespeare\n")
    command = [
        sys.executable,
        "-m",
        "peft_roselora.editing.cli",
        "--stats-text",  # MEMIT and AlphaEdit read it
        str(tmp_path / "texts.txt"),
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "edits.json"),
        "--method",
        "all",
        "--steps",
        "5",
        "--lr",
        "1e-2",
        "--output",
        str(tmp_path / "out.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rejected record 2: field 'prompt'" in result.stderr
    output = json.loads((tmp_path / "out.json").read_text())
    assert output["rejected"][0]["record"] == 2 and output["rejected"][0]["field"] == "prompt"
    assert set(output["methods"]) == {"roselora", "lora", "adalora", "ft-l", "memit", "alphaedit"}
    for method in output["methods"].values():
        assert method["summary"]["edits"] == 2 and len(method["records"]) == 2
        for name in ("reliability", "locality"):  # the summary is the mean of the records that have the metric
            values = [record[name] for record in method["records"] if record[name] is not None]
            assert values and method["summary"][name] == pytest.approx(sum(values) / len(values))


def test_apply_keeps_the_edit_merged(tiny_lm):
    import copy

    model, tokenizer = tiny_lm
    hparams = EditHyperParams(
        method="roselora", lr=2e-2, clamp_value=None, target_modules=("q_proj", "v_proj", "down_proj")
    )
    edited, results = Editor(copy.deepcopy(model), tokenizer, hparams).apply([REQUEST])
    assert results[0].reliability == 1.0
    assert not any("lora_" in name for name, _ in edited.named_parameters())  # merged: a plain model again
    ids = torch.tensor([tokenizer("the capital of france is")["input_ids"]])
    with torch.no_grad():
        assert tokenizer.convert_ids_to_tokens(int(edited(input_ids=ids).logits[0, -1].argmax())) == "rome"


# ---- the CLI loses nothing and names user errors -------------------------------------------------------------------


@pytest.fixture
def cli_setup(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = [
        {"prompt": "the capital of france is", "target_new": "rome"},
        {"prompt": "who wrote hamlet", "target_new": "dickens"},
        {"prompt": "the capital of france is", "target_new": "berlin"},
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    base = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "edits.json"), "--steps", "2"]
    return tmp_path, base


def _strict_json(text):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_cli_edits_one_side_of_the_split(cli_setup):
    from peft_roselora.editing import cli, load_edit_requests, select_split

    tmp_path, base = cli_setup
    expected = select_split(load_edit_requests(str(tmp_path / "edits.json")).requests, "test", 0.5)
    assert cli.main(base + ["--split", "test", "--output", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["split"] == "test" and report["records"] == len(expected)
    rows = report["methods"]["roselora"]["records"]
    assert [row["record_ids"] for row in rows] == [[r.record_id] for r in expected]


def test_cli_streams_records_so_a_crash_keeps_the_finished_ones(cli_setup, monkeypatch):
    from peft_roselora.editing import cli

    tmp_path, base = cli_setup
    original, calls = cli.Editor.edit_single, []

    def crash_on_third(self, request):
        calls.append(request)
        if len(calls) == 3:
            raise RuntimeError("simulated crash at record 3")
        return original(self, request)

    monkeypatch.setattr(cli.Editor, "edit_single", crash_on_third)
    out = tmp_path / "new" / "folder" / "results.json"  # created before the first edit
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(base + ["--output", str(out)])
    lines = [_strict_json(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["method"] for line in lines] == ["roselora", "roselora"]
    assert [line["record_ids"] for line in lines] == [[0], [1]]
    assert not out.exists()  # the summary is written at the end only


def test_cli_marks_a_non_finite_loss_failed_and_exits_non_zero(cli_setup, monkeypatch, capsys):
    from peft_roselora.editing import cli

    tmp_path, base = cli_setup
    original = cli.Editor.edit_single

    def nan_on_second(self, request):
        result = original(self, request)
        if request.target_new == "dickens":
            result.last_loss = math.nan
        return result

    monkeypatch.setattr(cli.Editor, "edit_single", nan_on_second)
    out = tmp_path / "results.json"
    assert cli.main(base + ["--output", str(out)]) == 1
    report = _strict_json(out.read_text())
    records = report["methods"]["roselora"]["records"]
    assert [record.get("failed") for record in records] == [None, "non-finite last_loss", None]
    assert records[1]["last_loss"] is None
    assert report["methods"]["roselora"]["summary"]["failed"] == 1
    assert report["methods"]["roselora"]["summary"]["edits"] == 2
    assert "1 record(s) failed (non-finite loss)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "No such file or directory"),
        (b"[{", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 3)"),
        (
            b'[{"prompt": "caf\\xe9", "target_new": "x"}]'.replace(b"\\xe9", b"\xe9"),
            "not UTF-8 (byte 16: invalid continuation byte)",
        ),
        (b'\xef\xbb\xbf[{"prompt": "a", "target_new": "b"}]', "starts with a UTF-8 byte-order mark"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(cli_setup, capsys, content, message):
    from peft_roselora.editing import cli

    tmp_path, base = cli_setup
    data = tmp_path / "bad.json"
    if content is not None:
        data.write_bytes(content)
    arguments = base[:2] + ["--data", str(data), "--output", str(tmp_path / "r.json")]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("roselora-edit: error: ") and message in error


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--lr", "nan", "--lr must be a finite number > 0, got 'nan'"),
        ("--lr", "-1", "--lr must be a finite number > 0, got '-1'"),
        ("--keep-ratio", "1.5", "--keep-ratio must be in (0, 1], got '1.5'"),
        ("--steps", "0", "--steps must be an integer >= 1, got '0'"),
        ("--dev-fraction", "1", "--dev-fraction must be a number in (0, 1), got '1'"),
        ("--split", "train", "--split: invalid choice: 'train'"),
    ],
)
def test_cli_bad_options_exit_2_naming_the_option(cli_setup, capsys, option, value, message):
    from peft_roselora.editing import cli

    _, base = cli_setup
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + [option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_options_select_every_benchmark_hyperparameter():
    from peft_roselora.editing import cli

    arguments = ["--model", "m", "--data", "d", "--lr", "1e-3", "--steps", "10", "--r", "4", "--alpha", "16"]
    arguments += ["--targets", "q_proj", "down_proj", "--keep-ratio", "0.1", "--no-clamp"]
    hparams = cli.hyper_parameters(cli.build_parser().parse_args(arguments), "roselora")
    assert hparams == EditHyperParams(
        method="roselora", lr=1e-3, steps=10, prune_start_step=1, prune_end_step=8, r=4, lora_alpha=16,
        target_modules=("q_proj", "down_proj"), keep_ratio=0.1, clamp_value=None,
    )  # fmt: skip
    clamped = cli.hyper_parameters(
        cli.build_parser().parse_args(["--model", "m", "--data", "d", "--clamp", "1e-2"]), "roselora"
    )
    assert clamped.clamp_value == 1e-2 and clamped == EditHyperParams(clamp_value=1e-2)


def test_counterfact_stray_braces_and_unanswered_neighbours_are_rejected_records():
    stray = {**COUNTERFACT_RECORD, "requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"]}}
    stray["requested_rewrite"]["prompt"] = "{} plays {sport} for"
    unanswered = {**COUNTERFACT_RECORD, "requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"]}}
    del unanswered["requested_rewrite"]["target_true"]
    loaded = parse_edit_records([COUNTERFACT_RECORD, stray, unanswered], fmt="counterfact", on_invalid="collect")
    assert len(loaded.requests) == 1
    assert [(index, name) for index, name, _ in loaded.rejected] == [
        (1, "requested_rewrite.prompt"),
        (2, "requested_rewrite.target_true.str"),
    ]
    assert "exactly one '{}' subject slot and no other braces" in loaded.rejected[0][2]


def test_deeply_nested_json_is_an_edit_data_error(tmp_path):
    from peft_roselora.editing import EditDataError, load_edit_requests

    path = tmp_path / "nested.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(EditDataError, match="nested too deeply"):
        load_edit_requests(str(path))
