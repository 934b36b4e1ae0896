"""RoseLoRA on every layer type PEFT LoRA adapts besides Linear / Conv1D: nn.Embedding, nn.Conv1d/2d/3d (incl.
groups), nn.MultiheadAttention and bare parameters (``target_parameters``, incl. expert tensors with a leading expert
dimension). For each: the schedule prunes every row of A and column of B (term rows, docs/method.md) to the keep
ratio, the merged update respects the Prop. 1 and ``r * tau^2`` bounds, merge / unmerge / save / load / compact /
plain-LoRA export reproduce the outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model

import peft_roselora
from peft_roselora import RoseLoraConfig, RoseLoraLayer, register_optimizer_hooks
from peft_roselora import sparsity as sparsity_math


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class ConvModel(nn.Module):
    def __init__(self, dims: int = 2, groups: int = 1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(4, 8, 3, groups=groups, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(2).mean(-1))


class AttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0].mean(1))


class Experts(nn.Module):
    """Expert weights as one bare parameter ``(experts, in, out)``, as Qwen3-MoE / gpt-oss / Llama 4 store them."""

    def __init__(self, experts: int):
        super().__init__()
        shape = (experts, 16, 12) if experts > 1 else (12, 16)
        self.weight = nn.Parameter(torch.randn(shape) * 0.2)

    def forward(self, x):
        if self.weight.dim() == 2:
            return x @ self.weight.T
        return torch.einsum("bi,eio->bo", x, self.weight)


class ExpertModel(nn.Module):
    def __init__(self, experts: int = 3):
        super().__init__()
        self.experts = Experts(experts)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.experts(x)))


CASES = {
    "embedding": (EmbeddingModel, lambda g: torch.randint(0, 40, (8, 5), generator=g), {"target_modules": ["emb"]}),
    "conv1d": (lambda: ConvModel(1), lambda g: torch.randn(8, 4, 7, generator=g), {"target_modules": ["conv"]}),
    "conv2d": (lambda: ConvModel(2), lambda g: torch.randn(8, 4, 5, 5, generator=g), {"target_modules": ["conv"]}),
    "conv3d": (lambda: ConvModel(3), lambda g: torch.randn(8, 4, 3, 3, 3, generator=g), {"target_modules": ["conv"]}),
    "conv2d-groups": (
        lambda: ConvModel(2, groups=2),
        lambda g: torch.randn(8, 4, 5, 5, generator=g),
        {"target_modules": ["conv"]},
    ),
    "mha": (AttentionModel, lambda g: torch.randn(8, 5, 16, generator=g), {"target_modules": ["mha"]}),
    "parameter": (
        lambda: ExpertModel(1),
        lambda g: torch.randn(8, 16, generator=g),
        {"target_modules": [], "target_parameters": ["experts.weight"]},
    ),
    "experts": (
        lambda: ExpertModel(3),
        lambda g: torch.randn(8, 16, generator=g),
        {"target_modules": [], "target_parameters": ["experts.weight"]},
    ),
}
MERGEABLE = [name for name in CASES if name != "conv2d-groups"]  # PEFT cannot merge grouped convolutions either


def _train(name: str, keep_ratio: float = 0.5, rank: int = 4, steps: int = 6, seed: int = 0, mode="reselect"):
    build, data, targets = CASES[name]
    torch.manual_seed(seed)
    model = get_peft_model(
        build(),
        RoseLoraConfig(
            r=rank,
            keep_ratio=keep_ratio,
            total_step=steps,
            prune_start_step=1,
            prune_end_step=steps - 2,
            prune_mode=mode,
            **targets,
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    register_optimizer_hooks(model, optimizer)
    inputs = data(torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), inputs


def _layers(model) -> list[RoseLoraLayer]:
    return [module for module in model.modules() if isinstance(module, RoseLoraLayer)]


def _check_term_rows_pruned(model, keep_ratio: float) -> None:
    for layer in _layers(model):
        weights = layer.term_rows(*layer.masked_factors("default"))
        masks = layer.term_rows(layer.lora_mask_A["default"], layer.lora_mask_B["default"])
        for weight, mask in zip(weights, masks):
            keep = sparsity_math.kept_count(keep_ratio, mask.shape[1])
            assert (mask.sum(dim=1) == keep).all(), (type(layer).__name__, mask.sum(dim=1), keep)
            assert not weight[~mask].any()
        raw = layer.term_rows(*layer.factor_parameters("default"))
        assert all(not value[~mask].any() for value, mask in zip(raw, masks))  # the parameters themselves


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_prunes_every_term_row_and_the_update_respects_the_bounds(name):
    model, _ = _train(name)
    expected_layers = 2 if name == "mha" else 1  # MultiheadAttention: in-projection and out_proj
    assert len(_layers(model)) == expected_layers
    _check_term_rows_pruned(model, 0.5)
    report = model.base_model.sparsity_report()
    assert report.keep_ratio_reached <= 0.5 + 1e-9
    assert report.within_bounds, str(report)
    support = model.base_model.sparsity_report(support_only=True)
    assert support.within_bounds and support.delta_nonzeros >= report.delta_nonzeros


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_unmerge_save_load_and_plain_lora_export(name, tmp_path):
    model, inputs = _train(name)
    with torch.no_grad():
        expected = model(inputs)
        model.merge_adapter()
        assert torch.allclose(model(inputs), expected, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(inputs), expected, atol=1e-6)
        with model.disable_adapter():
            base_output = model(inputs)
        assert not torch.allclose(base_output, expected, atol=1e-4)

    build, _, _ = CASES[name]
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    peft_roselora.export_to_lora(model, tmp_path / "lora")
    torch.manual_seed(0)
    plain = PeftModel.from_pretrained(build(), tmp_path / "lora").eval()
    assert isinstance(plain.peft_config["default"], LoraConfig)
    assert not isinstance(plain.peft_config["default"], RoseLoraConfig)
    peft_roselora.save_compact(model, tmp_path / "compact")
    torch.manual_seed(0)
    compact = peft_roselora.load_compact(build(), tmp_path / "compact").eval()
    with torch.no_grad():
        for other in (loaded, plain, compact):
            assert torch.allclose(other(inputs), expected, atol=1e-6)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(inputs), expected, atol=1e-5)
    for layer_a, layer_b in zip(_layers(model), _layers(compact)):
        assert torch.equal(layer_a.lora_mask_A["default"], layer_b.lora_mask_A["default"])
        assert torch.equal(layer_a.lora_mask_B["default"], layer_b.lora_mask_B["default"])


def test_grouped_convolution_report_counts_the_update_the_forward_applies():
    model, inputs = _train("conv2d-groups")
    layer = _layers(model)[0]
    delta = layer.effective_delta_weight("default")  # dense kernel (out, in, k, k)
    base = layer.get_base_layer()
    assert delta.shape == (base.out_channels, base.in_channels, *base.kernel_size)
    with torch.no_grad():
        features = model.base_model.model.conv(inputs)
        with model.disable_adapter():
            base_features = model.base_model.model.conv(inputs)
        applied = nn.functional.conv2d(inputs, delta, padding=1)
    assert torch.allclose(features - base_features, applied, atol=1e-5)
    with pytest.raises(NotImplementedError, match="groups"):
        model.merge_adapter()


def test_grouped_convolution_saves_loads_compacts_and_exports(tmp_path):
    model, inputs = _train("conv2d-groups")
    build = CASES["conv2d-groups"][0]
    with torch.no_grad():
        expected = model(inputs)
    model.save_pretrained(tmp_path / "adapter")
    peft_roselora.save_compact(model, tmp_path / "compact")
    peft_roselora.export_to_lora(model, tmp_path / "lora")
    loaded = []
    for folder in ("adapter", "lora"):
        torch.manual_seed(0)
        loaded.append(PeftModel.from_pretrained(build(), tmp_path / folder).eval())
    torch.manual_seed(0)
    loaded.append(peft_roselora.load_compact(build(), tmp_path / "compact").eval())
    with torch.no_grad():
        for other in loaded:
            assert torch.allclose(other(inputs), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["embedding", "conv2d", "mha", "experts"])
def test_persistent_mode_keeps_pruned_entries_pruned(name):
    model, _ = _train(name, mode="persistent", steps=8)
    _check_term_rows_pruned(model, 0.5)
    assert model.base_model.sparsity_report().within_bounds


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(list(CASES)),
    keep_ratio=st.sampled_from([0.1, 0.25, 0.4, 0.7]),
    rank=st.sampled_from([2, 4]),
    seed=st.integers(0, 1000),
)
def test_row_column_sparsity_and_proposition1_after_training(name, keep_ratio, rank, seed):
    model, _ = _train(name, keep_ratio=keep_ratio, rank=rank, seed=seed)
    _check_term_rows_pruned(model, keep_ratio)
    for row in model.base_model.sparsity_report().modules:
        assert row.delta_density <= row.proposition1_bound + 1e-12
        assert row.delta_density <= row.nominal_bound + 1e-12
        # r * tau^2 with tau rounded up to whole entries, per block (expert / group)
        density_a = sparsity_math.kept_count(keep_ratio, row.in_features) / row.in_features
        density_b = sparsity_math.kept_count(keep_ratio, row.out_features) / row.out_features
        assert math.isclose(row.nominal_bound, min(1.0, row.rank * density_a * density_b))


def test_expert_parameter_layout_pairs_rows_and_columns_per_expert():
    model, _ = _train("experts", rank=2)
    layer = _layers(model)[0]
    weight_a, weight_b = layer.masked_factors("default")
    rows_a, rows_b = layer.term_rows(weight_a, weight_b)
    delta = layer.effective_delta_weight("default")  # PEFT's per-expert updates, (E, 16, 12) like the parameter
    blocks = sparsity_math.blockwise_outer_sum(rows_a, rows_b, layer.term_blocks) * layer.scaling["default"]
    assert delta.shape == blocks.shape == (3, 16, 12)  # PEFT swaps in/out for (E, in, out) parameters
    assert torch.allclose(delta, blocks, atol=1e-7)
    back_a, back_b = layer.from_term_rows(rows_a, rows_b)
    assert torch.equal(back_a, weight_a) and torch.equal(back_b, weight_b)


@pytest.mark.parametrize("name", ["embedding", "conv2d", "mha", "experts"])
def test_only_adapter_parameters_train_and_every_factor_moves(name):
    build, data, targets = CASES[name]
    torch.manual_seed(0)
    reference = build()
    model, _ = _train(name)
    adapted = dict(model.base_model.model.named_parameters())
    for key, value in reference.state_dict().items():  # the base model's weights, under their wrapped names
        matches = [p for n, p in adapted.items() if n.replace(".base_layer", "") == key and "lora_" not in n]
        # MultiheadAttention merges and unmerges around every forward (PEFT LoRA's way): float round-off only
        assert matches and torch.allclose(matches[0], value, atol=1e-6, rtol=0), key
    for layer in _layers(model):
        for weight in layer.factor_parameters("default"):
            assert weight.abs().sum() > 0  # trained (lora_B / lora_embedding_A start at zero)
