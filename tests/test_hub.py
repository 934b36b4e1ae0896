"""Pushing to and loading from the Hub through the real huggingface_hub client, against a local Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_hub import LocalHub, card_metadata


TESTS = Path(__file__).resolve().parent


@pytest.fixture
def hub(tmp_path):
    with LocalHub() as local_hub:
        yield local_hub


def _client(hub: LocalHub, tmp_path: Path, *args: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN="hf_local_test_token",
        HF_HOME=str(tmp_path / f"hf-home-{args[0]}"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        PYTHONPATH=str(TESTS),
    )
    result = subprocess.run(
        [sys.executable, str(TESTS / "hub_scenarios.py"), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _readme(hub: LocalHub, repo_id: str) -> tuple[dict, str]:
    readme = hub.repos[repo_id]["README.md"].decode()
    return card_metadata(readme), readme


@pytest.mark.slow
def test_push_then_load_by_repo_id_gives_identical_logits(hub, tmp_path):
    expected = tmp_path / "expected.safetensors"
    pushed = _client(hub, tmp_path, "push", str(tmp_path / "base"), "user/roselora-tiny", str(expected), "-")
    assert pushed["local_path_warnings"] == 1  # the base came from disk: left out of the card, with a warning
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.repos["user/roselora-tiny"])
    assert json.loads(hub.repos["user/roselora-tiny"]["adapter_config.json"])["peft_type"] == "ROSELORA"
    metadata, readme = _readme(hub, "user/roselora-tiny")
    assert metadata["library_name"] == "peft"
    assert {"roselora", "peft", "lora"} <= set(metadata["tags"])
    assert "base_model" not in metadata and not any(t.startswith("base_model:") for t in metadata["tags"])
    assert "import peft_roselora" in readme and "## RoseLoRA" in readme and "keep ratio reached" in readme
    assert _client(hub, tmp_path, "load", str(tmp_path / "base"), "user/roselora-tiny", str(expected)) == {
        "loaded": True
    }


@pytest.mark.slow
def test_explicit_hub_base_model_is_written_with_its_adapter_tag(hub, tmp_path):
    _client(
        hub,
        tmp_path,
        "push",
        str(tmp_path / "base"),
        "user/with-base",
        str(tmp_path / "e.safetensors"),
        "meta-llama/Llama-2-7b-hf",
    )
    metadata, _ = _readme(hub, "user/with-base")
    assert metadata["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert "base_model:adapter:meta-llama/Llama-2-7b-hf" in metadata["tags"]


def test_card_for_a_base_loaded_from_disk_passes_the_hubs_metadata_rule(tmp_path):
    # PEFT's plain LoRA card puts the local path in base_model, which the Hub rejects; RoseLoRA's card leaves it out
    from conftest import make_tiny_llama
    from local_hub import card_metadata, metadata_error
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_roselora import RoseLoraConfig

    make_tiny_llama().save_pretrained(tmp_path / "base")
    cards = {}
    for name, config in (
        ("lora", LoraConfig(r=4, target_modules=["q_proj"])),
        ("roselora", RoseLoraConfig(r=4, target_modules=["q_proj"])),
    ):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config)
        model.save_pretrained(tmp_path / name)
        cards[name] = (tmp_path / name / "README.md").read_text()
    assert metadata_error(cards["lora"]) == (
        f'Invalid metadata in README.md.\n- "base_model" with value "{tmp_path / "base"}" is not valid.'
    )
    assert metadata_error(cards["roselora"]) is None
    metadata = card_metadata(cards["roselora"])
    assert "base_model" not in metadata and metadata["library_name"] == "peft"
    assert {"roselora", "peft", "lora"} <= set(metadata["tags"])


@pytest.mark.slow
def test_trainer_push_ends_with_the_peft_card(hub, tmp_path):
    assert _client(hub, tmp_path, "trainer_push", str(tmp_path / "base"), "user/trained", str(tmp_path / "out")) == {
        "pushed": True
    }
    metadata, readme = _readme(hub, "user/trained")
    assert metadata["library_name"] == "peft"
    assert {"roselora", "peft", "lora", "base_model:adapter:meta-llama/Llama-2-7b-hf"} <= set(metadata["tags"])
    assert "## RoseLoRA" in readme
    assert json.loads(hub.repos["user/trained"]["adapter_config.json"])["peft_type"] == "ROSELORA"
