"""pytest plugin that runs PEFT's own generic test suite against RoseLoRA.

Loaded with ``-p roselora_peft_suite`` (this folder on PYTHONPATH) in the peft sdist that matches the installed
peft (see ``tests/test_peft_generic_suite.py``, which downloads it and runs this). It

- replaces, in place, the parametrisation rows of ``test_custom_models.py`` and ``test_decoder_models.py``: every
  plain-LoRA row whose targets RoseLoRA supports (``nn.Linear``, ``Conv1D``) becomes a ``RoseLoraConfig`` row with
  the same keyword arguments; decoder models are tiny local models built from configs (nothing is downloaded);
- rebinds the name ``LoraConfig`` inside PEFT's test modules to ``RoseLoraConfig``, so every ``config_cls ==
  LoraConfig`` check in PEFT's tests takes the LoRA branch: a test is skipped only where PEFT skips it for LoRA;
- keeps only the tests parametrised with ``RoseLoraConfig`` (the LoRA-specific, non-parametrised tests exercise
  LoRA features that RoseLoRA rejects, such as DoRA);
- deselects the tests in ``DESELECTED`` (each with its reason: a feature RoseLoRA refuses by design);
- with ``ROSELORA_RANDOM_MASKS=1``, gives every new adapter random masks (about half of each row/column kept, at
  least one entry) and zeroes the pruned weights, so that the checks see a genuinely sparse RoseLoRA adapter rather
  than dense LoRA.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

import torch


def _stub_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub


_stub_diffusers()

import peft_roselora  # noqa: E402
from peft_roselora import RoseLoraConfig, RoseLoraLayer  # noqa: E402


SCHEDULE = {"keep_ratio": 0.5, "prune_start_step": 1, "prune_end_step": 2, "total_step": 4}
UNSUPPORTED_KWARGS = {
    "use_dora",
    "kasa_config",
    "velora_config",
    "init_lora_weights",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "monteclora_config",
    "trainable_token_indices",
    "lora_ga_config",
    "use_qalora",
}
RANDOM_MASKS = os.environ.get("ROSELORA_RANDOM_MASKS") == "1"
# ROSELORA_SUITE_CONFIG=lora runs the very same selection with plain LoraConfig: the baseline whose skips RoseLoRA's
# skips are compared with
BASELINE = os.environ.get("ROSELORA_SUITE_CONFIG") == "lora"
# test function name -> why it cannot apply to RoseLoRA
DESELECTED = {
    "test_weighted_combination_of_adapters": "add_weighted_adapter with svd/linear/ties/dare combinations is refused "
    "by design (it would break the row/column masks); only 'cat' is supported and tested (test_roundtrip.py, and "
    "PEFT's test_multiple_active_adapters_* here)",
}
# (test function, model id, a target it adapts) -> why it cannot hold with random masks; such tests still run with
# the masks as created. Counted in the report so that the outer test compares pass counts with the LoRA baseline.
DESELECTED_WITH_RANDOM_MASKS = {
    ("test_only_params_are_updated", "EmbConv1D", "emb"): "with the embedding's lora_embedding_A initialised to "
    "zero (PEFT's init), lora_embedding_B moves only at second order in 3 SGD steps of y.sum() through a width-1 "
    "ReLU; LoRA's own move is 2e-4-2e-3 against the test's 1e-4 tolerance, and with half the entries pruned it falls "
    "below it for some masks (measured 8e-5). tests/test_layer_types.py trains the embedding for real",
}
_RANDOM_MASKS_CREATED = [0]
_DESELECTED_RANDOM = [0]


def _config_under_test():
    from peft import LoraConfig

    return LoraConfig if BASELINE else RoseLoraConfig


def _rose_kwargs(kwargs: dict) -> dict | None:
    if UNSUPPORTED_KWARGS & set(kwargs):
        if kwargs.get("init_lora_weights") not in (None, True, False, "gaussian"):
            return None
        if UNSUPPORTED_KWARGS - {"init_lora_weights"} & set(kwargs):
            return None
    return dict(kwargs) if BASELINE else {**kwargs, **SCHEDULE}


def _targets_supported(model_id: str, kwargs: dict) -> bool:
    # every layer type plain LoRA adapts in PEFT's custom models (Linear, Embedding, transformers Conv1D,
    # Conv1d/2d/3d incl. groups, MultiheadAttention, target_parameters) is a RoseLoRA target too
    return kwargs.get("target_modules") is not None or bool(kwargs.get("target_parameters"))


def _patch_custom_models(module) -> None:
    from peft import LoraConfig

    rows = []
    for name, model_id, config_cls, kwargs in module.TEST_CASES:
        if config_cls is not LoraConfig or not _targets_supported(model_id, kwargs):
            continue
        rose = _rose_kwargs(kwargs)
        if rose is not None:
            rows.append((name, model_id, _config_under_test(), rose))
    module.TEST_CASES[:] = rows
    module.ALL_PEFT_CONFIG_CLASSES[:] = [_config_under_test()]
    multi = []
    for name, method, config_cls, kwargs_1, kwargs_2 in module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES:
        if config_cls is not LoraConfig or method != "lora":
            continue
        if not (_targets_supported("MLP", kwargs_1) and _targets_supported("MLP", kwargs_2)):
            continue
        rose_1, rose_2 = _rose_kwargs(kwargs_1), _rose_kwargs(kwargs_2)
        if rose_1 is not None and rose_2 is not None:
            multi.append((name, method, _config_under_test(), rose_1, rose_2))
    module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = multi
    # PeftMixedModel compatibility is a hard-coded tuple inside PEFT, not available to plugins
    module.MIXED_ADAPTER_TEST_CASES[:] = []


def _tiny_decoders() -> list[str]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    root = os.environ.get("ROSELORA_SUITE_MODELS") or tempfile.mkdtemp(prefix="roselora-suite-models-")
    models = {
        "tiny-llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                vocab_size=1000,
                max_position_embeddings=128,
            )
        ),
        "tiny-gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
        ),
        "tiny-opt": lambda: OPTForCausalLM(
            OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=1000,
                word_embed_proj_dim=32,
                max_position_embeddings=128,
            )
        ),
    }
    ids = []
    for name, build in models.items():
        path = os.path.join(root, name)
        if not os.path.exists(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            build().save_pretrained(path)
        ids.append(f"roselora-suite/{name}")
        _LOCAL_MODELS[ids[-1]] = path
    _serve_local_models_under_hub_ids()
    return ids


# Hub-style ids of the tiny local decoders -> their folders. The models are served under these ids so that they look
# like Hub models to PEFT's tests (whose model-card check expects `base_model` to be the model's `_name_or_path`, and
# RoseLoRA, like the Hub, never writes a local path there).
_LOCAL_MODELS: dict[str, str] = {}


def _serve_local_models_under_hub_ids() -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__
    if getattr(original, "_roselora_suite", False):
        return

    def from_pretrained(cls, name, *args, **kwargs):
        local = _LOCAL_MODELS.get(name)
        if local is None:
            return original(cls, name, *args, **kwargs)
        model = original(cls, local, *args, **kwargs)
        model.config._name_or_path = name
        model.name_or_path = name
        return model

    from_pretrained._roselora_suite = True
    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


def _patch_decoder_models(module) -> None:
    from peft import LoraConfig

    rows = []
    for config_cls, kwargs in module.ALL_CONFIGS:
        if config_cls is LoraConfig:
            rose = _rose_kwargs(kwargs)
            if rose is not None:
                rows.append((_config_under_test(), rose))
    module.ALL_CONFIGS[:] = rows
    module.PEFT_DECODER_MODELS_TO_TEST[:] = _tiny_decoders()


def _rebind_lora_config(*modules) -> None:
    for module in modules:
        if hasattr(module, "LoraConfig"):
            module.LoraConfig = RoseLoraConfig
    testing_utils = sys.modules.get("tests.testing_utils")
    if testing_utils is not None:
        original = testing_utils.set_init_weights_false

        def set_init_weights_false(config_cls, kwargs):
            # compares config classes by identity: treat RoseLoRA like LoRA
            if config_cls is RoseLoraConfig:
                return {**kwargs, "init_lora_weights": False}
            return original(config_cls, kwargs)

        for module in (testing_utils, *modules):
            if hasattr(module, "set_init_weights_false"):
                module.set_init_weights_false = set_init_weights_false


def _install_random_masks() -> None:
    original = RoseLoraLayer.init_rose_state

    def init_rose_state(self, adapter_name):
        original(self, adapter_name)
        with torch.no_grad():
            weights = self.factor_parameters(adapter_name)
            if any(weight.device.type == "meta" for weight in weights):
                return
            rows = [torch.rand(row.shape, device=row.device) < 0.5 for row in self.term_rows(*weights)]
            for row in rows:  # at least one kept entry per row of A / column of B (term rows)
                row[torch.arange(row.shape[0]), torch.randint(row.shape[1], (row.shape[0],))] = True
            for masks, weight, mask in zip((self.lora_mask_A, self.lora_mask_B), weights, self.from_term_rows(*rows)):
                masks[adapter_name] = mask.contiguous()
                weight.masked_fill_(~masks[adapter_name], 0)
                _RANDOM_MASKS_CREATED[0] += 1
            self.refresh_mask_state(adapter_name)

    RoseLoraLayer.init_rose_state = init_rose_state


def pytest_configure(config):
    import tests.test_custom_models as custom
    import tests.test_decoder_models as decoder
    import tests.testing_common as common

    _patch_custom_models(custom)
    _patch_decoder_models(decoder)
    if not BASELINE:
        _rebind_lora_config(custom, decoder, common)
    if RANDOM_MASKS:
        _install_random_masks()
    assert peft_roselora.RoseLoraConfig is RoseLoraConfig


def pytest_collection_modifyitems(config, items):
    from peft import LoraConfig

    selected, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not BASELINE and params.get("config_cls") is LoraConfig and "test_name" not in params:
            # a generic test parametrised with a literal list of config classes that includes LoraConfig: run it
            # with RoseLoraConfig instead
            params["config_cls"] = RoseLoraConfig
        keep = params.get("config_cls") is _config_under_test() and item.originalname not in DESELECTED
        if keep and RANDOM_MASKS and _random_masks_deselect(item.originalname, params):
            keep = False
            _DESELECTED_RANDOM[0] += 1
        (selected if keep else deselected).append(item)
    items[:] = selected
    config.hook.pytest_deselected(items=deselected)


def _random_masks_deselect(name: str, params: dict) -> bool:
    targets = (params.get("config_kwargs") or {}).get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return any(
        name == test and params.get("model_id") == model_id and target in targets
        for test, model_id, target in DESELECTED_WITH_RANDOM_MASKS
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.write_line(
        f"roselora-suite: random masks {'on' if RANDOM_MASKS else 'off'}, "
        f"random masks created: {_RANDOM_MASKS_CREATED[0]}"
    )
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"roselora-suite: skipped {count}x: {reason}")
    for name, reason in DESELECTED.items():
        terminalreporter.write_line(f"roselora-suite: deselected {name}: {reason}")
    if RANDOM_MASKS:
        for key, reason in DESELECTED_WITH_RANDOM_MASKS.items():
            terminalreporter.write_line(
                f"roselora-suite: deselected with random masks ({_DESELECTED_RANDOM[0]} in all) {key}: {reason}"
            )
    report_path = os.environ.get("ROSELORA_SUITE_REPORT")
    if report_path:
        stats = terminalreporter.stats
        with open(report_path, "w") as handle:
            json.dump(
                {
                    "config": _config_under_test().__name__,
                    "random_masks": RANDOM_MASKS,
                    "random_masks_created": _RANDOM_MASKS_CREATED[0],
                    "passed": len(stats.get("passed", [])),
                    "failed": [r.nodeid for r in stats.get("failed", [])] + [r.nodeid for r in stats.get("error", [])],
                    "skipped": sorted(r.nodeid for r in stats.get("skipped", [])),
                    "skip_reasons": reasons,
                    "deselected": len(stats.get("deselected", [])),
                    "deselected_with_random_masks": _DESELECTED_RANDOM[0],
                },
                handle,
                indent=1,
            )
