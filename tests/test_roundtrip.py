"""Save/load (in a fresh process), merge/unmerge, disable, multiple adapters, export to plain LoRA, PEFT and
transformers entry points, on a tiny Llama and a tiny GPT-2 (Conv1D)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, random_batch, train_steps, trained_roselora
from peft import (
    AutoPeftModelForCausalLM,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file

import peft_roselora
from peft_roselora import RoseLoraConfig, RoseLoraLayer


MODELS = {
    "llama": (make_tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"]),
}


def _trained(kind: str, seed: int = 0, keep_ratio: float = 0.25, adapter_name: str = "default"):
    factory, targets = MODELS[kind]
    return trained_roselora(factory(), targets, seed=seed, keep_ratio=keep_ratio, adapter_name=adapter_name)


def _logits(model, ids=None):
    ids = random_batch(99) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def _masks(model):
    return {k: v for k, v in model.state_dict().items() if "lora_mask" in k}


def _run_fresh(code: str, env_overrides: dict | None = None, **paths) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **(env_overrides or {})}
    script = textwrap.dedent(code).format(**{k: repr(str(v)) for k, v in paths.items()})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_and_load_in_a_fresh_process(kind, tmp_path):
    model = _trained(kind)
    assert any(not m.all() for m in _masks(model).values())
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    MODELS[kind][0]().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "ROSELORA"
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert any("lora_mask_A" in k for k in saved) and not any("importance" in k for k in saved)
    expected_logits = _logits(model)
    save_file(
        {"logits": expected_logits, "ids": random_batch(99), **{k: v for k, v in _masks(model).items()}},
        tmp_path / "expected.safetensors",
    )

    _run_fresh(
        """
        import torch
        import peft_roselora
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        from safetensors.torch import load_file
        expected = load_file({expected})
        for kwargs in ({{}}, {{"low_cpu_mem_usage": True}}, {{"is_trainable": True}}):
            base = AutoModelForCausalLM.from_pretrained({base})
            model = PeftModel.from_pretrained(base, {adapter}, **kwargs).eval()
            with torch.no_grad():
                logits = model(input_ids=expected["ids"]).logits
            assert torch.allclose(logits, expected["logits"], atol=1e-6), kwargs
            state = model.state_dict()
            for key, mask in expected.items():
                if "lora_mask" in key:
                    assert torch.equal(state[key], mask), key
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            assert bool(trainable) == bool(kwargs.get("is_trainable")), kwargs
        auto = AutoPeftModelForCausalLM.from_pretrained({adapter}).eval()
        with torch.no_grad():
            assert torch.allclose(auto(input_ids=expected["ids"]).logits, expected["logits"], atol=1e-6)
        print("ok")
        """,
        expected=tmp_path / "expected.safetensors",
        base=base_dir,
        adapter=adapter_dir,
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_disable(kind):
    model = _trained(kind)
    base_logits = _logits(MODELS[kind][0]())
    adapted = _logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(_logits(model), base_logits, atol=1e-6)
    model.merge_adapter()
    assert torch.allclose(_logits(model), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(_logits(model), adapted, atol=1e-6)
    for layer in (m for m in model.modules() if isinstance(m, RoseLoraLayer)):
        layer.merge(safe_merge=True)
    assert torch.allclose(_logits(model), adapted, atol=1e-5)
    model.unmerge_adapter()
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, RoseLoraLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged), adapted, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_delta_touches_only_the_bounded_set(kind):
    model = _trained(kind, keep_ratio=0.25)
    report = model.sparsity_report()
    assert report.within_bounds
    for row in report.modules:
        assert row.delta_density <= row.rank * 0.25**2 + 1e-12  # 64-, 192- and 256-wide layers: tau * n is whole
    base = MODELS[kind][0]()
    merged = model.merge_and_unload()
    changed = sum(
        int(torch.count_nonzero(p_new - p_old)) for p_new, p_old in zip(merged.parameters(), base.parameters())
    )
    assert changed <= report.delta_nonzeros


def test_unload_returns_the_base_model():
    model = _trained("llama")
    unloaded = model.unload()
    assert torch.allclose(_logits(unloaded), _logits(make_tiny_llama()), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_to_plain_lora_loads_in_stock_peft(kind, tmp_path):
    model = _trained(kind)
    base_dir, export_dir = tmp_path / "base", tmp_path / "lora"
    MODELS[kind][0]().save_pretrained(base_dir)
    config = peft_roselora.export_to_lora(model, export_dir)
    assert json.loads((export_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert config.r == 4
    save_file({"logits": _logits(model), "ids": random_batch(99)}, tmp_path / "expected.safetensors")
    # a process without peft_roselora (the import-free loading hook switched off, as on a machine without it)
    _run_fresh(
        """
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from safetensors.torch import load_file
        expected = load_file({expected})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), {adapter}).eval()
        assert "peft_roselora" not in sys.modules
        assert type(model.base_model).__name__ == "LoraModel"
        with torch.no_grad():
            assert torch.allclose(model(input_ids=expected["ids"]).logits, expected["logits"], atol=1e-6)
        """,
        {"PEFT_ROSELORA_AUTOLOAD": "0"},
        expected=tmp_path / "expected.safetensors",
        base=base_dir,
        adapter=export_dir,
    )


def test_multiple_adapters_set_delete_and_mixed_batch():
    model = _trained("llama", seed=0, adapter_name="first")
    second = _trained("llama", seed=5, adapter_name="second")
    model.add_adapter(
        "second",
        RoseLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            keep_ratio=0.25,
            total_step=8,
            prune_start_step=2,
            prune_end_step=6,
        ),
    )
    set_peft_model_state_dict(model, get_peft_model_state_dict(second, adapter_name="second"), adapter_name="second")
    ids = random_batch(99, batch=4)
    model.set_adapter("first")
    first_logits = _logits(model, ids)
    model.set_adapter("second")
    second_logits = _logits(model, ids)
    assert torch.allclose(second_logits, _logits(second, ids), atol=1e-6)
    assert not torch.allclose(first_logits, second_logits, atol=1e-4)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["first", "second", "__base__", "first"]).logits
    base_logits = _logits(make_tiny_llama(), ids)
    assert torch.allclose(mixed[0], first_logits[0], atol=1e-6)
    assert torch.allclose(mixed[1], second_logits[1], atol=1e-6)
    assert torch.allclose(mixed[2], base_logits[2], atol=1e-6)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["first"]
    for layer in (m for m in model.modules() if isinstance(m, RoseLoraLayer)):
        assert "second" not in layer.lora_mask_A and "second" not in model.base_model._rose_schedules
    model.set_adapter("first")
    assert torch.allclose(_logits(model, ids), first_logits, atol=1e-6)


def test_schedule_runs_per_adapter():
    model = _trained("llama", adapter_name="first")
    model.add_adapter(
        "second", RoseLoraConfig(r=4, target_modules=["q_proj"], total_step=4, prune_start_step=1, prune_end_step=3)
    )
    model.set_adapter("second")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 4)
    assert model.steps_taken("first") == 8 and model.steps_taken("second") == 4


def test_add_weighted_adapter_cat_keeps_masks_and_others_are_refused():
    model = _trained("llama", seed=0, adapter_name="first")
    second = _trained("llama", seed=5, adapter_name="second")
    model.add_adapter("second", second.peft_config["second"])
    set_peft_model_state_dict(model, get_peft_model_state_dict(second, adapter_name="second"), adapter_name="second")
    for combination in ("svd", "linear", "ties"):
        with pytest.raises(ValueError, match=f"combination_type='{combination}' is not supported for RoseLoRA"):
            model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "bad", combination_type=combination)
    model.add_weighted_adapter(["first", "second"], [0.5, 2.0], "combined", combination_type="cat")
    for layer in (m for m in model.modules() if isinstance(m, RoseLoraLayer)):
        expected = 0.5 * layer.get_delta_weight("first") + 2.0 * layer.get_delta_weight("second")
        assert torch.allclose(layer.get_delta_weight("combined"), expected, atol=1e-6)
        stacked = torch.cat([layer.lora_mask_A["first"], layer.lora_mask_A["second"]], dim=0)
        assert torch.equal(layer.lora_mask_A["combined"], stacked)
        assert not layer.lora_A["combined"].weight[~stacked].any()
    model.set_adapter("combined")
    assert model.sparsity_report("combined").keep_ratio_reached == pytest.approx(0.25)


def test_unsupported_target_module_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"RoseLoRA cannot adapt module 'model.norm' of type "
        r"transformers.models.llama.modeling_llama.LlamaRMSNorm; supported types are torch.nn.Linear, "
        r"torch.nn.Embedding",
    ):
        get_peft_model(make_tiny_llama(), RoseLoraConfig(target_modules=["norm"]))


def test_layers_of_unsupported_quantizers_are_refused_naming_the_backend():
    # a stand-in with the class path of GPTQModel's quantized linear layer (GPTQ kernels need a GPU)
    gptq_layer = type("QuantLinear", (torch.nn.Linear,), {"__module__": "gptqmodel.nn_modules.qlinear"})
    model = torch.nn.Sequential()
    model.add_module("proj", gptq_layer(4, 4))
    with pytest.raises(ValueError, match=r"RoseLoRA does not support GPTQ \(GPTQModel\) quantized layers"):
        get_peft_model(model, RoseLoraConfig(target_modules=["proj"]))


def test_inject_adapter_in_model_and_state_dict_helpers():
    model = inject_adapter_in_model(RoseLoraConfig(r=4, target_modules=["q_proj"]), make_tiny_llama())
    layers = [m for m in model.modules() if isinstance(m, RoseLoraLayer)]
    assert len(layers) == 2
    state = get_peft_model_state_dict(model)
    assert any("lora_mask_A" in k for k in state)
    state = {k: (torch.zeros_like(v) if "mask" in k else v) for k, v in state.items()}
    set_peft_model_state_dict(model, state)
    assert not layers[0].lora_mask_A["default"].any()


def test_transformers_add_adapter_and_load_adapter(tmp_path):
    trained = _trained("llama")
    trained.save_pretrained(tmp_path)
    base = make_tiny_llama()
    base.load_adapter(str(tmp_path), adapter_name="loaded")
    assert torch.allclose(_logits(base), _logits(trained), atol=1e-6)
    other = make_tiny_llama()
    problem = peft_roselora.compat.transformers_adapter_api_problem()
    if problem is not None:  # transformers >= 5.24 refuses peft 0.21 in its adapter API, for every PEFT method
        with pytest.raises(Exception, match=r"0\.22"):
            other.add_adapter(RoseLoraConfig(r=4, target_modules=["q_proj"]), adapter_name="fresh")
        return
    other.add_adapter(RoseLoraConfig(r=4, target_modules=["q_proj"]), adapter_name="fresh")
    assert any(isinstance(m, RoseLoraLayer) for m in other.modules())


def test_registration_is_idempotent():
    import importlib

    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    before = list(PeftType)
    peft_roselora.register()
    importlib.reload(peft_roselora._registration)
    peft_roselora._registration.register()
    assert list(PeftType) == before
    assert PeftType("ROSELORA") is PeftType.ROSELORA is PeftType["ROSELORA"]
    assert PeftType.ROSELORA.value == "ROSELORA" and PeftType.ROSELORA.name == "ROSELORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ROSELORA] is RoseLoraConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ROSELORA"] is RoseLoraConfig


def test_auto_peft_model_and_peft_model_class(tmp_path):
    model = _trained("llama")
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    assert isinstance(loaded.peft_config["default"], RoseLoraConfig)
