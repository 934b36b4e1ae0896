"""MEMIT / AlphaEdit (written from the papers), sequential editing with checkpoints and resume, the many-edit mode."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from test_editing import REQUEST

from peft_roselora.editing import EditHyperParams, Editor, parse_edit_records
from peft_roselora.editing.locate import (
    alphaedit_update,
    default_edit_layers,
    key_statistics,
    memit_update,
    null_space_projector,
    subject_last_token,
)


TEXTS = ["the capital of france is paris", "who wrote hamlet shakespeare", "the capital of germany is berlin"]
SECOND = parse_edit_records([{"prompt": "who wrote hamlet", "target_new": "dickens", "subject": "hamlet"}]).requests[0]


def _random_keys(d: int, n: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, rank, generator=generator, dtype=torch.float64)
    return basis @ torch.randn(rank, n, generator=generator, dtype=torch.float64)


# ---- the math, alone ------------------------------------------------------------------------------------------------


def test_memit_update_solves_its_normal_equation():
    keys, residual = _random_keys(12, 3, 3, 0), torch.randn(5, 3, dtype=torch.float64)
    preserved = _random_keys(12, 40, 12, 1)
    second_moment = preserved @ preserved.T / 40
    update = memit_update(residual, keys, second_moment, weight=2.0)
    # the minimiser of ||D K - R||^2 + weight tr(D C D^T): D (K K^T + weight C) = R K^T
    torch.testing.assert_close(update @ (keys @ keys.T + 2.0 * second_moment), residual @ keys.T)


def test_alphaedit_update_leaves_preserved_keys_alone():
    preserved = _random_keys(16, 200, 10, 2)  # the keys the model uses span 10 of 16 directions
    second_moment = preserved @ preserved.T / 200 + 1e-6 * torch.eye(16, dtype=torch.float64)
    projector = null_space_projector(second_moment, threshold=1e-3)
    assert round(float(torch.trace(projector))) == 6  # the null space: the other 6 directions
    torch.testing.assert_close(projector @ projector, projector)
    torch.testing.assert_close(projector, projector.T)
    new_keys = torch.randn(16, 4, dtype=torch.float64)
    residual = torch.randn(8, 4, dtype=torch.float64)
    update = alphaedit_update(residual, new_keys, projector, torch.zeros(16, 16, dtype=torch.float64), l2=1e-3)
    torch.testing.assert_close(update @ projector, update)  # Delta = Delta P
    assert (update @ preserved).abs().max() < 1e-8 * update.abs().max() * preserved.abs().max()
    assert (update @ new_keys - residual).abs().max() > 0 and (update @ new_keys).abs().max() > 0.1  # it writes
    # with a memory of earlier keys (sequential editing) the update keeps their values too
    earlier = projector @ torch.randn(16, 2, dtype=torch.float64)
    update = alphaedit_update(residual, new_keys, projector, 1e4 * earlier @ earlier.T, l2=1e-3)
    assert (update @ earlier).abs().max() < 1e-2 * (update @ new_keys).abs().max()
    with pytest.raises(ValueError, match="`nullspace_threshold` must be > 0, got 0"):
        null_space_projector(second_moment, 0)


def test_default_edit_layers_leave_a_layer_after_the_edit():
    assert default_edit_layers(2) == (0,)
    assert default_edit_layers(3) == (0, 1)
    assert default_edit_layers(32) == tuple(range(5, 11))
    with pytest.raises(ValueError, match="at least 2 decoder layers, got 1"):
        default_edit_layers(1)


def test_subject_last_token_and_key_statistics(tiny_lm):
    model, tokenizer = tiny_lm
    ids = tokenizer("the capital of france is")["input_ids"]
    assert ids[subject_last_token(tokenizer, "the capital of france is", "france")] == tokenizer.convert_tokens_to_ids(
        "france"
    )
    assert subject_last_token(tokenizer, "the capital of france is", None) == len(ids) - 1
    statistics = key_statistics(model, tokenizer, TEXTS, layers=(0,))
    captured = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    with torch.no_grad():
        for text in TEXTS:  # by hand, one text at a time: no padding
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    hook.remove()
    keys = torch.cat(captured).double()
    # float32 activations: a padded batch and one-at-a-time forwards agree to float32 rounding, not to float64's
    torch.testing.assert_close(statistics[0], keys.T @ keys / len(keys), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one text"):
        key_statistics(model, tokenizer, [], layers=(0,))


# ---- MEMIT / AlphaEdit through the editor ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_locate_then_edit_flips_the_prediction_and_restores(tiny_lm, method):
    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    ids = torch.tensor([tokenizer("the capital of france is")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hparams = EditHyperParams(method=method, nullspace_threshold=1e-2, l2=1e-2, mom2_weight=1.0)
    # the text sample leaves out "the capital of germany is": its key at "is" is nearly the edit's own, which
    # AlphaEdit would (rightly) refuse to move
    editor = Editor(model, tokenizer, hparams, stats_texts=TEXTS[1:2])
    result = editor.edit_single(REQUEST)
    assert result.reliability == 1.0
    assert result.changed_weights == result.adapted_weights == 64 * 128  # one dense down_proj update
    with torch.no_grad():
        assert torch.equal(editor.model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="needs `stats_texts`"):
        Editor(model, tokenizer, hparams)
    with pytest.raises(ValueError, match=r"`edit_layers` must be increasing layer indices in \[0, 0\]"):
        Editor(model, tokenizer, EditHyperParams(method=method, edit_layers=(1,)), stats_texts=TEXTS)


# ---- sequential editing: checkpoints, resume, the many-edit mode ----------------------------------------------------


def _sequence_hparams(method):
    if method in ("memit", "alphaedit"):
        return EditHyperParams(method=method, nullspace_threshold=1e-2, l2=1e-2, mom2_weight=1.0)
    return EditHyperParams.scaled_to(
        20,
        method=method.split("+")[0],
        shared_adapter="+shared" in method,
        shared_optimizer=method.endswith("+shared+adam"),
        lr=2e-2,
        clamp_value=None,
        replay=1,
        replay_priority=1.0 if "+priority" in method else 0.0,
        hold_steps=30 if method.endswith("+hold") else 0,
        preserve_weight=0.1,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )


@pytest.mark.parametrize(
    "method",
    [
        "roselora",
        "roselora+shared",
        pytest.param("roselora+shared+adam", marks=pytest.mark.slow),
        pytest.param("roselora+shared+priority", marks=pytest.mark.slow),
        "roselora+shared+priority+hold",
        "alphaedit",
    ],
)
def test_a_resumed_sequence_ends_where_an_uninterrupted_one_does(tiny_lm, method):
    model, tokenizer = tiny_lm
    requests = [REQUEST, SECOND, copy.deepcopy(REQUEST)]
    whole = Editor(copy.deepcopy(model), tokenizer, _sequence_hparams(method), stats_texts=TEXTS[1:2])
    edits = []
    checkpoints = whole.edit_sequence(requests, checkpoints=[1, 2], on_edit=lambda i, r: edits.append(i), seed=3)
    assert [c.edits for c in checkpoints] == [1, 2, 3] and edits == [0, 1, 2]
    assert checkpoints[0].retention == 1.0 and 0 < checkpoints[-1].changed_weights <= checkpoints[-1].editable_weights

    first = Editor(copy.deepcopy(model), tokenizer, _sequence_hparams(method), stats_texts=TEXTS[1:2])
    first.edit_sequence(requests[:1], seed=3)
    state = first.state_dict()
    assert int(state["edits_done"]) == 1
    resumed = Editor(copy.deepcopy(model), tokenizer, _sequence_hparams(method), stats_texts=TEXTS[1:2])
    assert resumed.load_state_dict(state, requests) == 1
    rest = resumed.edit_sequence(requests, checkpoints=[2], seed=3)
    assert [c.edits for c in rest] == [2, 3]
    for name, parameter in whole.model.named_parameters():
        assert torch.equal(parameter, dict(resumed.model.named_parameters())[name]), name
    keep = ("retention", "generalization", "locality", "changed_weights")
    assert {k: rest[-1].to_dict()[k] for k in keep} == {k: checkpoints[-1].to_dict()[k] for k in keep}
    with pytest.raises(ValueError, match="must lie in"):
        whole.edit_sequence(requests, checkpoints=[4])


def test_a_shared_adapter_keeps_one_fixed_support_and_leaves_the_base_alone(tiny_lm):
    model, tokenizer = tiny_lm
    unedited = {k: v.clone() for k, v in model.state_dict().items()}
    hparams = EditHyperParams.scaled_to(
        40,
        lr=2e-2,
        clamp_value=None,
        keep_ratio=0.5,
        replay=1,
        shared_adapter=True,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )
    editor = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS[1:2])
    editor.edit_sequence([REQUEST])
    masks = {k: v.clone() for k, v in editor.model.state_dict().items() if "lora_mask" in k}
    assert masks and not all(bool(m.all()) for m in masks.values())  # the first edit's schedule pruned
    [final] = editor.edit_sequence([REQUEST, SECOND])
    assert final.retention == 1.0
    after = editor.model.state_dict()
    assert all(torch.equal(after[k], m) for k, m in masks.items())  # the support chosen by the first edit stays
    changed = 0
    for name, module in editor.model.named_modules():
        if hasattr(module, "lora_mask_A") and "default" in module.lora_mask_A:
            delta = module.get_delta_weight("default")
            bound = hparams.r * (
                module.lora_mask_A["default"].float().mean() * module.lora_mask_B["default"].float().mean()
            )
            assert torch.count_nonzero(delta) <= bound * delta.numel() + 1e-6, name
            changed += int(torch.count_nonzero(delta))
    assert final.changed_weights == changed > 0
    base = editor.model.unload()  # every edit removed at once
    assert all(torch.equal(v, unedited[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="`shared_adapter` needs method in"):
        EditHyperParams(method="ft-l", shared_adapter=True)
    with pytest.raises(ValueError, match="`shared_optimizer=True` needs `shared_adapter=True`"):
        EditHyperParams(shared_optimizer=True)
    with pytest.raises(ValueError, match="applies to sequences"):
        Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS[1:2]).edit_single(REQUEST)


def test_many_edit_mode_needs_its_text_sample_and_keeps_earlier_edits(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="`preserve_weight`=0.5 needs `stats_texts`"):
        Editor(model, tokenizer, EditHyperParams(preserve_weight=0.5))
    with pytest.raises(ValueError, match="`replay` must be >= 0, got -1"):
        EditHyperParams(replay=-1)
    hparams = EditHyperParams.scaled_to(
        20, method="roselora", lr=2e-2, clamp_value=None, replay=1, target_modules=("q_proj", "v_proj", "down_proj")
    )
    editor = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS)
    [final] = editor.edit_sequence([REQUEST, SECOND])
    assert final.retention == 1.0  # both edits hold on the final model


def test_replay_picks_draws_the_forgotten_edits_first():
    from peft_roselora.editing import replay_picks

    losses = torch.tensor([0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    torch.manual_seed(0)
    uniform = torch.randperm(8)[:3].tolist()
    torch.manual_seed(0)
    assert replay_picks(8, 3) == uniform  # priority 0: the uniform sample of earlier runs, draw for draw
    for seed in range(20):
        torch.manual_seed(seed)
        assert set(replay_picks(8, 3, losses, 1.0)) == {1, 4, 6}  # every edit with a loss before any without
        picks = replay_picks(8, 4, losses, 0.5)
        assert len(set(picks)) == 4 and set(picks[:2]) <= {1, 4, 6}  # half by loss, the rest uniform, no repeats
        assert sorted(replay_picks(8, 20, losses, 1.0)) == list(range(8))  # capped at the edits there are
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([replay_picks(8, 1, losses, 1.0)[0] for _ in range(3000)]), minlength=8)
    torch.testing.assert_close(counts[[1, 4, 6]] / 3000.0, torch.tensor([2.0, 3.0, 1.0]) / 6, atol=0.03, rtol=0)
    assert replay_picks(0, 3, torch.zeros(0), 1.0) == []
    for seed in range(20):  # round(0.9 * 3) = 3 by loss: exactly the three edits with a loss, whatever the draw
        torch.manual_seed(seed)
        assert set(replay_picks(8, 3, losses, 0.9)) == {1, 4, 6}
    with pytest.raises(ValueError, match=r"`priority` must be in \[0, 1\], got 1.5"):
        replay_picks(8, 3, losses, 1.5)
    with pytest.raises(ValueError, match=r"`losses` must have shape \(8,\) when `priority` > 0, got None"):
        replay_picks(8, 3, None, 1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        replay_picks(8, 3, torch.full((8,), float("nan")), 1.0)
    with pytest.raises(ValueError, match=r"`replay_priority` must be in \[0, 1\], got -0.5"):
        EditHyperParams(replay=2, replay_priority=-0.5)
    with pytest.raises(ValueError, match="`replay_priority=0.5` needs `replay` > 0"):
        EditHyperParams(replay_priority=0.5)


def test_prioritised_replay_weighs_each_earlier_edit_by_its_loss_as_the_edit_starts(tiny_lm, monkeypatch):
    from peft_roselora.editing import metrics
    from peft_roselora.editing import objective as editor_module

    model, tokenizer = tiny_lm
    seen, replay_picks = [], editor_module.replay_picks

    def spy(total, count, losses=None, priority=0.0):
        seen.append((total, count, None if losses is None else losses.clone(), priority))
        return replay_picks(total, count, losses, priority)

    monkeypatch.setattr(editor_module, "replay_picks", spy)
    hparams = _sequence_hparams("roselora+shared+priority")
    editor = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS[1:2])
    editor.edit_sequence([REQUEST])
    assert seen == []  # nothing to replay during the first edit
    prompt, target = metrics.encode_prompt_target(tokenizer, REQUEST.prompt, REQUEST.target_new)
    with torch.no_grad():  # the first edit's target loss on the model as the second edit starts
        expected = editor_module.target_loss(
            editor.model.eval(), editor_module.padded_examples(tokenizer, [(prompt, target)], editor.device)
        )
    editor.edit_sequence([REQUEST, SECOND])
    assert len(seen) >= hparams.prune_end_step and all(s[:2] == (1, 1) and s[3] == 1.0 for s in seen)
    assert all(torch.equal(s[2], seen[0][2]) for s in seen)  # scored once, as the edit starts
    torch.testing.assert_close(seen[0][2], expected.reshape(1))


def test_a_replay_score_limit_scores_that_many_earlier_edits_and_replays_the_forgotten_among_them(
    tiny_lm, monkeypatch
):
    from peft_roselora.editing.objective import EditObjective, replay_picks

    model, tokenizer = tiny_lm
    targets = ["rome", "madrid", "oslo", "vienna", "lisbon"]
    memory = parse_edit_records([{"prompt": "the capital of france is", "target_new": t} for t in targets]).requests
    unlimited = EditObjective(tokenizer, EditHyperParams(replay=2, replay_priority=1.0), None, "cpu")
    everything = unlimited.memory_losses(model, memory)
    assert bool((everything > 0).all())
    torch.manual_seed(7)
    assert torch.equal(unlimited.replay_priorities(model, memory), everything)
    after_unlimited = torch.rand(1)

    limited = EditObjective(
        tokenizer, EditHyperParams(replay=2, replay_priority=1.0, replay_score_limit=2), None, "cpu"
    )
    scored_rows = []
    memory_losses = limited.memory_losses
    monkeypatch.setattr(
        limited, "memory_losses", lambda m, rows: scored_rows.append(len(rows)) or memory_losses(m, rows)
    )
    torch.manual_seed(7)
    priorities = limited.replay_priorities(model, memory)
    assert scored_rows == [2]  # one pass over 2 edits, not 5
    scored = priorities.nonzero().squeeze(1)
    assert len(scored) == 2
    torch.testing.assert_close(priorities[scored], everything[scored])
    torch.manual_seed(7)
    assert torch.equal(limited.replay_priorities(model, memory), priorities)  # the edit's seed fixes the draw
    assert not torch.equal(torch.rand(1), after_unlimited)  # without a limit no random number is drawn
    for seed in range(5):  # the prioritised replays are the scored edits
        torch.manual_seed(seed)
        assert sorted(replay_picks(5, 2, priorities, 1.0)) == scored.tolist()
    at_least_all = EditObjective(
        tokenizer, EditHyperParams(replay=2, replay_priority=1.0, replay_score_limit=5), None, "cpu"
    )
    torch.manual_seed(7)
    assert torch.equal(at_least_all.replay_priorities(model, memory), everything)
    assert torch.equal(torch.rand(1), after_unlimited)
    with pytest.raises(ValueError, match="`replay_score_limit` must be None or an integer >= 1, got 0"):
        EditHyperParams(replay=2, replay_priority=1.0, replay_score_limit=0)
    with pytest.raises(ValueError, match="`replay_score_limit=4` needs `replay_priority` > 0"):
        EditHyperParams(replay=2, replay_score_limit=4)


def test_hold_steps_train_on_until_the_edit_holds_and_no_further(tiny_lm, monkeypatch):
    from peft_roselora.editing import objective as editor_module

    model, tokenizer = tiny_lm
    short = dict(method="lora", lr=2e-2, clamp_value=None, target_modules=("q_proj", "v_proj", "down_proj"))
    plain = Editor(copy.deepcopy(model), tokenizer, EditHyperParams.scaled_to(5, **short))
    torch.manual_seed(0)  # the adapter's initialisation: independent of the tests run before
    unheld = plain.edit_single(SECOND)
    assert unheld.steps == 5 and unheld.reliability < 1.0  # five small steps do not make the edit
    holding = Editor(copy.deepcopy(model), tokenizer, EditHyperParams.scaled_to(5, hold_steps=200, **short))
    torch.manual_seed(0)
    result = holding.edit_single(SECOND)
    assert result.reliability == 1.0 and 5 < result.steps < 205  # trained on until it held, then stopped

    checks = []
    verdict = editor_module.requests_held

    def spy(model, examples):
        held = verdict(model, examples)
        checks.append(bool(held.all()))
        return held

    monkeypatch.setattr(editor_module, "requests_held", spy)
    again = Editor(copy.deepcopy(model), tokenizer, EditHyperParams.scaled_to(5, hold_steps=200, **short))
    torch.manual_seed(0)
    assert again.edit_single(SECOND).steps == result.steps  # the check draws nothing: the same run
    assert checks and checks[-1] and not any(checks[:-1])  # checked after each extra step, stopped at the first hold
    assert len(checks) == result.steps - 5 + 1
    for bad, message in (
        (dict(hold_steps=-1), "`hold_steps` must be >= 0, got -1"),
        (dict(method="ft-l", hold_steps=5), r"`hold_steps` needs method in \['roselora', 'lora', 'adalora'\]"),
        (dict(method="alphaedit", hold_steps=5), "got method='alphaedit'"),
    ):
        with pytest.raises(ValueError, match=message):
            EditHyperParams(**bad)


# ---- the CLI: every mode, configurations, resume -------------------------------------------------------------------


@pytest.fixture
def cli_files(tiny_lm, tmp_path):
    import json

    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = [
        {"prompt": "the capital of france is", "target_new": "rome"},
        {"prompt": "who wrote hamlet", "target_new": "dickens"},
        {"prompt": "the capital of germany is", "target_new": "paris"},
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    (tmp_path / "texts.txt").write_text("who wrote hamlet shakespeare\n\nthe capital of france is paris\n")
    base = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "edits.json")]
    return tmp_path, base


def test_cli_sequential_mode_streams_checkpoints_and_resumes_exactly(cli_files, monkeypatch):
    import json

    from peft_roselora.editing import cli

    tmp_path, base = cli_files
    options = base + ["--method", "alphaedit", "--stats-text", str(tmp_path / "texts.txt"), "--mode", "sequential"]
    options += ["--checkpoints", "1", "2", "--nullspace-threshold", "1e-2", "--l2", "1e-2"]
    assert cli.main(options + ["--output", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())["methods"]["alphaedit"]
    assert [c["edits"] for c in whole["checkpoints"]] == [1, 2, 3] and len(whole["edits"]) == 3
    assert whole["summary"] == whole["checkpoints"][-1]

    original, calls = cli.Editor.edit_sequence, []

    def crash_after_second_checkpoint(self, requests, checkpoints=(), on_edit=None, on_checkpoint=None, seed=0):
        def stop(checkpoint):
            on_checkpoint(checkpoint)
            calls.append(checkpoint.edits)
            if checkpoint.edits == 2:
                raise RuntimeError("simulated crash")

        return original(self, requests, checkpoints, on_edit, stop, seed)

    monkeypatch.setattr(cli.Editor, "edit_sequence", crash_after_second_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(options + ["--output", str(tmp_path / "cut.json")])
    monkeypatch.setattr(cli.Editor, "edit_sequence", original)
    assert (tmp_path / "cut.alphaedit.state.safetensors").exists()
    assert cli.main(options + ["--output", str(tmp_path / "cut.json"), "--resume"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert [line["edits"] for line in lines if line["kind"] == "checkpoint"] == [1, 2, 3]
    resumed = json.loads((tmp_path / "cut.json").read_text())["methods"]["alphaedit"]
    keep = ("retention", "generalization", "locality", "changed_weights")
    assert {k: resumed["summary"][k] for k in keep} == {k: whole["summary"][k] for k in keep}


def test_cli_shared_adapter_run_ends_as_one_loadable_adapter(cli_files):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_roselora.editing import cli, metrics

    tmp_path, base = cli_files
    options = base + ["--method", "roselora", "--mode", "sequential", "--shared-adapter", "--steps", "40"]
    options += ["--lr", "2e-2", "--no-clamp", "--keep-ratio", "0.5", "--targets", "q_proj", "v_proj", "down_proj"]
    assert cli.main(options + ["--replay", "1", "--hold-steps", "20", "--output", str(tmp_path / "shared.json")]) == 0
    assert json.loads((tmp_path / "shared.json").read_text())["hparams"]["roselora"]["hold_steps"] == 20
    report = json.loads((tmp_path / "shared.json").read_text())["methods"]["roselora"]
    assert report["adapter"] == str(tmp_path / "shared.roselora.adapter")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    edited = PeftModel.from_pretrained(model, report["adapter"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    records = json.loads((tmp_path / "edits.json").read_text())
    held = [metrics.accuracy(edited, tokenizer, [r["prompt"]], [r["target_new"]]) for r in records]
    assert sum(held) / len(held) == report["summary"]["retention"] > 0  # the saved adapter is the edited model
    assert cli.main(base + ["--method", "ft-l", "--mode", "sequential", "--shared-adapter"]) == 2
    assert cli.main(base + ["--method", "roselora", "--mode", "single", "--shared-adapter"]) == 2  # not ignored
    assert cli.main(base + ["--method", "roselora", "--mode", "batch", "--replay", "2"]) == 2  # nothing to replay
    assert cli.main(base + ["--method", "roselora", "--mode", "sequential", "--replay-priority", "0.5"]) == 2
    with pytest.raises(SystemExit):
        cli.main(base + ["--method", "roselora", "--mode", "sequential", "--replay", "2", "--replay-priority", "2"])
    assert cli.main(base + ["--method", "ft-l", "--mode", "single", "--hold-steps", "3"]) == 2  # not ignored
    with pytest.raises(SystemExit):
        cli.main(base + ["--method", "roselora", "--hold-steps", "-1"])


def test_cli_single_mode_resume_skips_the_records_done(cli_files):
    import json

    from peft_roselora.editing import cli

    tmp_path, base = cli_files
    out = tmp_path / "single.json"
    assert cli.main(base + ["--steps", "2", "--limit", "2", "--output", str(out)]) == 0
    assert cli.main(base + ["--steps", "2", "--output", str(out), "--resume"]) == 0
    lines = (tmp_path / "single.jsonl").read_text().splitlines()
    assert [json.loads(line)["record_ids"] for line in lines] == [[0], [1], [2]]  # records 0 and 1 not redone
    assert [r["record_ids"] for r in json.loads(out.read_text())["methods"]["roselora"]["records"]] == [[0], [1], [2]]


def test_cli_refused_run_leaves_earlier_output_untouched(cli_files, monkeypatch, capsys):
    from peft_roselora.editing import cli

    tmp_path, base = cli_files
    monkeypatch.chdir(tmp_path)  # the default --output lands here, if anywhere
    earlier = tmp_path / "run.jsonl"
    earlier.write_text('{"method": "roselora", "record_ids": [0]}\n')
    refused = ["--method", "ft-l", "--hold-steps", "3"]
    assert cli.main(base + refused + ["--output", str(tmp_path / "run.json")]) == 2
    assert earlier.read_text() == '{"method": "roselora", "record_ids": [0]}\n'  # not truncated
    assert cli.main(base + refused) == 2
    assert not (tmp_path / "edit_results.jsonl").exists()  # nothing written for a refused run
    assert cli.main(base + refused + ["--output", str(tmp_path / "new" / "run.json")]) == 2
    assert not (tmp_path / "new").exists()  # not even the output folder
    (tmp_path / "a-file").write_text("")
    assert cli.main(base + ["--output", str(tmp_path / "a-file" / "run.json")]) == 2  # a folder that cannot be made
    assert f"--output {tmp_path / 'a-file' / 'run.json'}: " in capsys.readouterr().err


def test_cli_reads_search_configs_and_needs_a_text_sample(cli_files, capsys):
    import json

    from peft_roselora.editing import cli

    tmp_path, base = cli_files
    search = {"methods": {"memit": {"chosen_config": {"edit_layers": [0], "mom2_weight": 2.0, "fact_token": "last"}}}}
    (tmp_path / "search.json").write_text(json.dumps(search))
    arguments = cli.build_parser().parse_args(base + ["--method", "memit", "--v-steps", "7"])
    hparams = cli.hyper_parameters(arguments, "memit", search)
    assert (hparams.edit_layers, hparams.mom2_weight, hparams.fact_token, hparams.v_steps) == ((0,), 2.0, "last", 7)
    assert cli.main(base + ["--method", "memit", "--config", str(tmp_path / "search.json")]) == 2
    assert "['memit'] need --stats-text FILE" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"roselora": {"keep_ratios": 0.1}}))
    assert cli.main(base + ["--config", str(tmp_path / "bad.json")]) == 2
    assert "unknown configuration key(s) ['keep_ratios']" in capsys.readouterr().err


def test_preservation_targets_are_the_unedited_models_predictions(tiny_lm):
    model, tokenizer = tiny_lm
    hparams = EditHyperParams.scaled_to(
        10, method="lora", lr=2e-2, preserve_weight=1.0, preserve_batch=2, target_modules=("q_proj", "v_proj")
    )
    editor = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS)
    editor.edit_sequence([REQUEST, SECOND])  # two merged edits later, the anchor is still the unedited model
    for text, (ids, predicted) in zip(TEXTS, editor.objective.preservation_targets):
        assert ids == tokenizer(text)["input_ids"]
        with torch.no_grad():
            by_hand = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        assert predicted == by_hand
    with torch.no_grad():  # and the edited model differs from it
        ids = torch.tensor([editor.objective.preservation_targets[0][0]])
        assert not torch.equal(editor.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_preserve_tokens_crops_each_text_to_a_prefix_whose_targets_are_the_unedited_models_predictions(
    tiny_lm, monkeypatch
):
    from peft_roselora.editing.objective import EditObjective, request_losses

    model, tokenizer = tiny_lm
    hparams = EditHyperParams(method="lora", replay=1, preserve_weight=1.0, preserve_batch=3, preserve_tokens=3)
    objective = EditObjective(tokenizer, hparams, TEXTS, "cpu")
    objective.record_preservation_targets(model)
    for ids, predicted in objective.preservation_targets:
        assert len(ids) > 3
        cropped, labels = objective._preserved(ids, predicted, hparams.preserve_tokens)
        with torch.no_grad():  # the unedited model's predictions on the prefix alone
            on_prefix = model(input_ids=torch.tensor([ids[:3]])).logits[0, :-1].argmax(-1).tolist()
        assert cropped == ids[:3] and labels == [-100, *on_prefix]
    seen = []

    def spy(trained, examples):
        seen.append(examples)
        return request_losses(trained, examples)

    monkeypatch.setattr("peft_roselora.editing.objective.request_losses", spy)
    objective.loss_for(model, [SECOND], [REQUEST])(model)
    input_ids, mask, labels = seen[0]
    edit_rows = max(len(p) + len(t) for p, t in (objective.encoded(r) for r in (SECOND, REQUEST)))
    assert input_ids.shape == (5, max(edit_rows, 3))  # the edit, the replay, 3 texts of at most 3 tokens
    assert bool((mask[2:].sum(dim=1) <= 3).all())
    whole = EditObjective(
        tokenizer, EditHyperParams(method="lora", preserve_weight=1.0, preserve_tokens=99), TEXTS, "cpu"
    )
    whole.record_preservation_targets(model)
    assert [whole._preserved(*t, 99) for t in whole.preservation_targets] == [
        whole._preserved(*t, None) for t in whole.preservation_targets
    ]
    with pytest.raises(ValueError, match="`preserve_tokens` must be None or an integer >= 2"):
        EditHyperParams(method="lora", preserve_weight=1.0, preserve_tokens=1)
    with pytest.raises(ValueError, match="`preserve_tokens=8` needs `preserve_weight` > 0"):
        EditHyperParams(method="lora", preserve_tokens=8)


def test_many_edit_every_k_adds_replay_and_preservation_every_kth_step_weighted_to_the_same_objective(
    tiny_lm, monkeypatch
):
    from peft_roselora.editing.objective import EditObjective, request_losses, target_loss

    model, tokenizer = tiny_lm
    seen = []

    def spy(trained, examples):
        seen.append(request_losses(trained, examples))
        return seen[-1]

    monkeypatch.setattr("peft_roselora.editing.objective.request_losses", spy)
    memory = [REQUEST, copy.deepcopy(REQUEST)]
    losses = {}
    for every in (1, 3):
        hparams = EditHyperParams(
            method="lora", replay=2, preserve_weight=0.5, preserve_batch=2, many_edit_every=every
        )
        objective = EditObjective(tokenizer, hparams, TEXTS, "cpu")
        loss_of = objective.loss_for(model, [SECOND], memory)
        seen.clear()
        torch.manual_seed(0)
        losses[every] = [loss_of(model) for _ in range(4)]
        rows = [len(row) for row in seen]
        if every == 1:
            assert rows == [5, 5, 5, 5]  # the edit, 2 replayed edits, 2 texts at every step
            row = seen[0]
            torch.testing.assert_close(losses[1][0], row[:3].mean() + 0.5 * row[3:].mean())
        else:
            assert rows == [5, 1, 1, 5]  # steps 0 and 3 (every third, the first included) add them
            row = seen[0]  # that step and two steps of the edit alone weigh as 3 steps with every = 1, times 3
            torch.testing.assert_close(losses[3][0], row[0] + 3 * row[1:3].sum() + 3 * 0.5 * 3 * row[3:].mean())
            alone = target_loss(model, objective.examples([SECOND]))
            torch.testing.assert_close(losses[3][1], alone)
            torch.testing.assert_close(3 * losses[1][0], (losses[3][0] + 2 * alone) / 3)  # one scale: 3 rows / 1
    with pytest.raises(ValueError, match="`many_edit_every` must be an integer >= 1, got 0"):
        EditHyperParams(method="lora", replay=2, many_edit_every=0)
    with pytest.raises(ValueError, match="`many_edit_every=2` needs the many-edit mode"):
        EditHyperParams(method="lora", many_edit_every=2)


def test_locate_then_edit_leaves_the_models_trainable_flags_alone(tiny_lm):
    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    hparams = EditHyperParams(method="memit", mom2_weight=1.0, v_steps=3)
    Editor(model, tokenizer, hparams, stats_texts=TEXTS[1:2]).edit_single(REQUEST)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


# ---- the structure: a state saved before the editing wing was split, the mode rules shared by API and CLI ---------


def test_a_sequence_saved_by_release_0_2_loads_and_resumes_deterministically(tiny_lm):
    """tests/fixtures/editing_state_0.2.safetensors: ``Editor.state_dict()`` of the 0.2 editor (before its split into
    backends) after the first edit of this sequence, shared RoseLoRA adapter with one Adam (the richest state). The
    state loads whole (every tensor back as saved) and the rest of the sequence runs from it the same way every
    time. (0.2's many-edit mode ran three forward passes per step, this version one: the 0.2 run itself is not
    reproduced bit for bit; exact resume within a version is tested above.)"""
    from pathlib import Path

    from safetensors.torch import load_file

    model, tokenizer = tiny_lm
    requests = [REQUEST, SECOND, copy.deepcopy(REQUEST)]
    hparams = _sequence_hparams("roselora+shared+adam")
    saved = load_file(Path(__file__).parent / "fixtures" / "editing_state_0.2.safetensors")
    results, models = [], []
    for _ in range(2):
        resumed = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=TEXTS[1:2])
        assert resumed.load_state_dict(saved, requests) == 1  # twice from the same tensors: not aliased
        state = resumed.state_dict()
        assert set(state) == set(saved) and all(torch.equal(state[key], saved[key]) for key in saved)
        results.append(resumed.edit_sequence(requests, seed=3)[-1])
        models.append(resumed.model)
    for name, parameter in models[0].named_parameters():
        assert torch.equal(parameter, dict(models[1].named_parameters())[name]), name
    assert results[0].to_dict() | {"seconds": 0} == results[1].to_dict() | {"seconds": 0}
    assert results[0].edits == 3 and results[0].retention is not None


@pytest.mark.parametrize(
    "settings,mode,texts,api_message,cli_options,cli_message",
    [
        (
            dict(replay=2),
            "single",
            TEXTS,
            "`replay=2` applies to sequences",
            ["--replay", "2"],
            "--replay (['roselora'])",
        ),
        (
            dict(shared_adapter=True),
            "batch",
            TEXTS,
            "`shared_adapter=True` applies to sequences",
            ["--mode", "batch", "--shared-adapter"],
            "--shared-adapter (['roselora']) needs --mode sequential, got --mode batch",
        ),
        (
            dict(method="alphaedit"),
            "single",
            None,
            "method 'alphaedit' needs `stats_texts`",
            ["--method", "alphaedit"],
            "['alphaedit'] need --stats-text FILE",
        ),
        (
            dict(preserve_weight=0.5),
            "sequential",
            None,
            "`preserve_weight`=0.5 needs `stats_texts`",
            ["--mode", "sequential", "--preserve-weight", "0.5"],
            "['roselora'] need --stats-text FILE",
        ),
    ],
)
def test_mode_rules_are_one_function_for_api_and_cli(
    tiny_lm, cli_files, capsys, settings, mode, texts, api_message, cli_message, cli_options
):
    from peft_roselora.editing import cli
    from peft_roselora.editing.hparams import mode_problems

    model, tokenizer = tiny_lm
    hparams = EditHyperParams(**settings)
    [problem] = mode_problems(hparams, mode, texts is not None)
    assert api_message in problem.message
    with pytest.raises(ValueError, match=re.escape(api_message)):
        editor = Editor(copy.deepcopy(model), tokenizer, hparams, stats_texts=texts)
        editor.edit_single(REQUEST) if mode != "sequential" else editor.edit_sequence([REQUEST])
    assert mode_problems(hparams, "sequential", True) == []  # each is fine in a sequence with a text sample
    tmp_path, base = cli_files
    assert cli.main(base + cli_options + ["--output", str(tmp_path / "refused.json")]) == 2
    assert cli_message in capsys.readouterr().err


def test_cli_options_are_generated_from_every_flagged_field():
    from dataclasses import fields

    from peft_roselora.editing import cli

    parser = cli.build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    flagged = [f for f in fields(EditHyperParams) if f.metadata.get("flag")]
    assert len(flagged) >= 20 and all(f.metadata["flag"] in flags for f in flagged)
    help_text = parser.format_help()
    assert "AlphaEdit: l2 regulariser (default 10.0)" in help_text  # help and default from the field
    values = {
        "--r": ("4", 4),
        "--hold-steps": ("3", 3),
        "--replay-priority": ("0.5", 0.5),
        "--fact-token": ("last", "last"),
    }
    arguments = ["--model", "m", "--data", "d", "--replay", "2", "--edit-layers", "0", "1"]
    for flag, (text, _) in values.items():
        arguments += [flag, text]
    given = cli.hyper_parameters(parser.parse_args(arguments), "roselora")
    assert (given.r, given.hold_steps, given.replay_priority, given.fact_token) == tuple(v for _, v in values.values())
    assert given.edit_layers == (0, 1) and given.replay == 2
