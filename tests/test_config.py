"""RoseLoraConfig validation: every bad value raises an error naming the field, the value and the valid range."""

from __future__ import annotations

import pytest
from peft import LoraConfig, PeftConfig, PeftType

from peft_roselora import RoseLoraConfig


def test_defaults_and_peft_type():
    config = RoseLoraConfig()
    assert config.peft_type == PeftType.ROSELORA
    assert (config.keep_ratio, config.prune_start_step, config.prune_end_step) == (0.1, 0.1, 0.8)
    assert config.importance_beta == 0.8 and config.prune_interval == 1 and config.clamp_value is None
    assert config.prune_mode == "reselect" and config.total_step is None
    assert isinstance(config, LoraConfig)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"keep_ratio": 0.0}, r"`keep_ratio` must be a number in \(0, 1\], got 0.0"),
        ({"keep_ratio": 1.5}, r"`keep_ratio` must be a number in \(0, 1\], got 1.5"),
        ({"keep_ratio": "0.1"}, r"`keep_ratio` must be a number in \(0, 1\], got '0.1'"),
        ({"keep_ratio": float("nan")}, r"`keep_ratio` must be a number in \(0, 1\], got nan"),
        ({"importance_beta": 1.0}, r"`importance_beta` must be a number in \[0, 1\), got 1.0"),
        ({"importance_beta": -0.1}, r"`importance_beta` must be a number in \[0, 1\), got -0.1"),
        ({"importance_beta": "0.8"}, r"`importance_beta` must be a number in \[0, 1\), got '0.8'"),
        ({"importance_beta": None}, r"`importance_beta` must be a number in \[0, 1\), got None"),
        (
            {"importance_dtype": "float16"},
            r"`importance_dtype` must be one of \['float32', 'bfloat16'\], got 'float16'",
        ),
        ({"clamp_value": "3e-3"}, r"`clamp_value` must be None \(off\) or a number > 0, got '3e-3'"),
        ({"clamp_value": float("inf")}, r"`clamp_value` must be None \(off\) or a number > 0, got inf"),
        ({"prune_mode": 1}, r"`prune_mode` must be one of \['reselect', 'persistent'\], got 1"),
        ({"total_step": "25"}, r"`total_step` must be None \(set later by a trainer\) or an integer >= 1, got '25'"),
        ({"prune_interval": True}, r"`prune_interval` must be an integer >= 1, got True"),
        ({"r": "8"}, r"`r` must be an integer >= 1, got '8'"),
        ({"r": 0}, r"`r` must be an integer >= 1, got 0"),
        ({"lora_alpha": "16"}, r"`lora_alpha` must be a finite number > 0, got '16'"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be a number in \[0, 1\), got 1.0"),
        ({"use_rslora": "yes"}, r"`use_rslora` must be True or False, got 'yes'"),
        ({"prune_interval": 0}, r"`prune_interval` must be an integer >= 1, got 0"),
        ({"prune_interval": 2.5}, r"`prune_interval` must be an integer >= 1, got 2.5"),
        ({"clamp_value": 0.0}, r"`clamp_value` must be None \(off\) or a number > 0, got 0.0"),
        ({"clamp_value": -1}, r"`clamp_value` must be None \(off\) or a number > 0, got -1"),
        ({"prune_mode": "magnitude"}, r"`prune_mode` must be one of \['reselect', 'persistent'\], got 'magnitude'"),
        ({"total_step": 0}, r"`total_step` must be None \(set later by a trainer\) or an integer >= 1, got 0"),
        ({"prune_start_step": -1}, r"`prune_start_step` given as an int is a step count and must be >= 0, got -1"),
        (
            {"prune_end_step": 1.5},
            r"`prune_end_step` given as a float is a fraction of total_step and must be in "
            r"\[0, 1\], got 1.5",
        ),
        ({"prune_start_step": "3"}, r"`prune_start_step` must be an int step count >= 0 or a float fraction"),
        ({"prune_start_step": 5, "prune_end_step": 5}, r"`prune_start_step` \(5\) must be < `prune_end_step` \(5\)"),
        ({"prune_start_step": 0.8, "prune_end_step": 0.2}, r"`prune_start_step` \(0.8\) must be < `prune_end_step`"),
        (
            {"prune_start_step": 3, "prune_end_step": 30, "total_step": 25},
            r"prune_start_step < prune_end_step <= total_step, got prune_start_step=3 -> 3, prune_end_step=30 -> 30, "
            r"total_step=25",
        ),
        ({"prune_start_step": 20, "prune_end_step": 0.5, "total_step": 25}, r"prune_end_step=0.5 -> 13"),
    ],
)
def test_bad_schedule_values_raise_named_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoseLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"use_dora": True}, "use_dora"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"ensure_weight_tying": True}, "ensure_weight_tying"),
    ],
)
def test_unsupported_lora_options_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"does not support the LoRA option `{name}`"):
        RoseLoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "eva", "mica", "orthogonal"])
def test_unsupported_initialisations_are_rejected(init):
    with pytest.raises(ValueError, match=rf"does not support `init_lora_weights='{init}'`"):
        RoseLoraConfig(init_lora_weights=init)


def test_schedule_without_total_step_is_a_clear_error():
    config = RoseLoraConfig(prune_start_step=3, prune_end_step=20)
    with pytest.raises(ValueError, match="RoseLoRA's schedule needs `total_step`"):
        config.resolve_schedule()


def test_fractions_resolve_against_total_step():
    assert RoseLoraConfig(total_step=100).resolve_schedule() == (10, 80, 100)
    assert RoseLoraConfig(total_step=25, prune_start_step=3, prune_end_step=20).resolve_schedule() == (3, 20, 25)


def test_config_round_trip(tmp_path):
    config = RoseLoraConfig(
        r=4,
        target_modules=["q_proj"],
        keep_ratio=0.05,
        prune_start_step=3,
        prune_end_step=20,
        total_step=25,
        clamp_value=3e-3,
        prune_mode="persistent",
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RoseLoraConfig)
    assert loaded.peft_type == PeftType.ROSELORA
    assert (loaded.keep_ratio, loaded.prune_start_step, loaded.prune_end_step, loaded.total_step) == (0.05, 3, 20, 25)
    assert (loaded.clamp_value, loaded.prune_mode) == (3e-3, "persistent")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("importance_beta", "0.8", r"`importance_beta` must be a number in \[0, 1\), got '0.8'"),
        ("keep_ratio", [0.1], r"`keep_ratio` must be a number in \(0, 1\], got \[0.1\]"),
        ("prune_interval", 1.0, r"`prune_interval` must be an integer >= 1, got 1.0"),
        ("r", 8.5, r"`r` must be an integer >= 1, got 8.5"),
    ],
)
def test_bad_types_in_adapter_config_json_raise_named_errors(tmp_path, field, value, message):
    import json

    from peft import PeftConfig

    RoseLoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(str(tmp_path))


def test_deprecated_prune_mode_authors_means_reselect():
    with pytest.warns(FutureWarning, match="prune_mode='authors' is deprecated; use 'reselect'"):
        config = RoseLoraConfig(prune_mode="authors")
    assert config.prune_mode == "reselect"
