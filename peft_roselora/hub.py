"""Sharing RoseLoRA adapters: a correct model card for ``save_pretrained`` / ``push_to_hub``, and Trainer pushes.

PEFT's ``PeftModel.push_to_hub`` is transformers' generic one and replaces the PEFT model card with a generic card
(``library_name: transformers``, no tags); PEFT only tags ``lora`` for ``peft_type == "LORA"``; and a base model
loaded from disk puts a local path into ``base_model``, which the Hub rejects ("Invalid metadata in README.md").
``import peft_roselora`` therefore routes ``create_or_update_model_card`` and ``push_to_hub`` of PEFT models holding
RoseLoRA adapters through this module (other PEFT models are untouched).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import warnings
from typing import Any, Optional

from huggingface_hub import HfApi, ModelCard
from peft import PeftModel


CARD_SECTION_HEADING = "## RoseLoRA"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def is_hub_repo_id(value: Optional[str]) -> bool:
    """Whether ``value`` can be a Hub model id (``name`` or ``org/name``) rather than a local path."""
    if not value or not isinstance(value, str) or os.path.exists(value) or ".." in value:
        return False
    return bool(_REPO_ID.match(value))


def _roselora_tuner(model: Any):
    from .model import RoseLoraModel

    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, RoseLoraModel) else None


def card_section(model: PeftModel) -> str:
    """The RoseLoRA section of the card: what the adapter is, how to load it, its config and sparsity."""
    tuner = _roselora_tuner(model)
    name = tuner.active_adapters[0]
    config = tuner.peft_config[name]
    # under FSDP2 / DeepSpeed ZeRO only the main process writes the card, and reading the whole factors is collective:
    # measure the masks (whole on every process) instead
    sharded = tuner.factors_partitioned(name)
    report = tuner.sparsity_report(name, support_only=sharded)
    measured = "mask" if sharded else "factor"
    fields = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules or [])
        if isinstance(config.target_modules, (set, list))
        else config.target_modules,
        "keep_ratio": config.keep_ratio,
        "prune_start_step": config.prune_start_step,
        "prune_end_step": config.prune_end_step,
        "total_step": config.total_step,
        "importance_beta": config.importance_beta,
        "prune_mode": config.prune_mode,
        "clamp_value": config.clamp_value,
    }
    return "\n".join(
        [
            CARD_SECTION_HEADING,
            "",
            "A [RoseLoRA](https://arxiv.org/abs/2406.10777) adapter (row- and column-wise sparse LoRA) trained with "
            "[peft-roselora](https://pypi.org/project/peft-roselora/). Every row of `lora_A` and every column of "
            "`lora_B` keeps at most a fraction `keep_ratio` of its entries, so the merged update touches at most "
            "`r * keep_ratio^2` of each adapted weight matrix.",
            "",
            "Loading needs the plugin imported first (otherwise PEFT raises `KeyError: 'ROSELORA'`):",
            "",
            "```python",
            "import peft_roselora  # registers RoseLoRA with PEFT",
            "from peft import PeftModel",
            'model = PeftModel.from_pretrained(base_model, "<this repo>")',
            "```",
            "",
            "### Configuration",
            "",
            "```json",
            json.dumps(fields, indent=2),
            "```",
            "",
            "### Sparsity",
            "",
            f"- schedule step: {report.step}; keep ratio reached: {report.keep_ratio_reached:.4f} "
            f"(target {report.target_keep_ratio})",
            f"- {measured} non-zeros: {report.factor_nonzeros} / {report.factor_numel} "
            f"({report.factor_nonzeros / max(1, report.factor_numel):.4f})",
            f"- merged-delta non-zeros{' (at most, from the masks)' if sharded else ''}: "
            f"{report.delta_nonzeros} / {report.delta_numel} (density "
            f"{report.delta_density:.6f}; r * tau^2 bound {report.nominal_bound:.6f})",
            f"- adapted modules: {len(report.modules)}",
            "",
        ]
    )


def update_model_card(
    model: PeftModel, output_dir: str, base_model: Optional[str] = None, extra_tags: Optional[list[str]] = None
) -> ModelCard:
    """Fix the card PEFT wrote in ``output_dir``: ``library_name: peft``, tags ``roselora``, ``peft``, ``lora`` (and
    ``base_model:adapter:<id>`` for a Hub base), ``base_model`` only when it is a Hub id (an explicit ``base_model``
    wins; a local path is dropped with a warning), and the RoseLoRA section (replaced if present)."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    base = base_model if base_model is not None else card.data.get("base_model")
    tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:")]
    if base and not is_hub_repo_id(base):
        warnings.warn(
            f"base_model {base!r} is not a Hub model id (a local path?): it is left out of the model card, which "
            "the Hub would reject. Pass base_model='org/name' to push_to_hub, or set "
            "peft_config.base_model_name_or_path to the Hub id before saving.",
            stacklevel=3,
        )
        base = None
    card.data.base_model = base or None
    if base:
        tags.append(f"base_model:adapter:{base}")
    card.data.library_name = "peft"
    card.data.tags = sorted(set(tags) | {"roselora", "peft", "lora"} | set(extra_tags or []))
    text = card.text
    if CARD_SECTION_HEADING in text:
        text = text[: text.index(CARD_SECTION_HEADING)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + card_section(model)
    card.save(path)
    return card


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    commit_message: str = "Upload RoseLoRA adapter",
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
):
    """Push a RoseLoRA ``PeftModel`` to the Hub with its PEFT model card (``model.push_to_hub`` calls this).

    The adapter is written with ``save_pretrained`` (same files, same card as locally) and uploaded in one commit.

    Args:
        model (PeftModel): the model with RoseLoRA adapters.
        repo_id (str): ``org/name`` of the target repo (created if missing).
        base_model (str, optional): Hub id of the base model for the card, when the base was loaded from disk.
        commit_message, private, token, revision, create_pr: as for ``HfApi.upload_folder``.
        tags (list[str], optional): extra card tags.
        **save_kwargs: passed to ``save_pretrained`` (e.g. ``selected_adapters``).

    Returns:
        CommitInfo: the commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        if base_model is not None or tags:
            update_model_card(model, folder, base_model=base_model, extra_tags=tags)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
        )


def push_trainer_to_hub(trainer, *, base_model: Optional[str] = None, **kwargs: Any):
    """``trainer.push_to_hub(**kwargs)`` followed by the RoseLoRA push of the trained adapter, so that the repo ends
    with the PEFT model card (the Trainer's own push writes a generic ``library_name: transformers`` card).

    Returns:
        CommitInfo: the final commit.
    """
    trainer.push_to_hub(**kwargs)
    repo_id = trainer.hub_model_id or trainer.args.hub_model_id
    return push_to_hub(
        trainer.model,
        repo_id,
        base_model=base_model,
        token=trainer.args.hub_token,
        commit_message="RoseLoRA adapter and model card",
    )


def install_peft_model_hooks() -> None:
    """Route ``create_or_update_model_card`` and ``push_to_hub`` of PEFT models with RoseLoRA adapters through this
    module (idempotent; other PEFT models keep PEFT's behaviour)."""
    if getattr(PeftModel.create_or_update_model_card, "_roselora", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        original_card(self, output_dir)
        if _roselora_tuner(self) is not None:
            update_model_card(self, output_dir)

    @functools.wraps(original_push)
    def peft_push_to_hub(self, repo_id: str, *args, **kwargs):
        if _roselora_tuner(self) is None:
            return original_push(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub of a RoseLoRA model takes keyword arguments only after repo_id.")
        for unused in ("use_temp_dir", "max_shard_size"):
            if kwargs.pop(unused, None) is not None:
                warnings.warn(f"push_to_hub: `{unused}` does not apply to RoseLoRA adapters; ignored.", stacklevel=2)
        return push_to_hub(self, repo_id, **kwargs)

    create_or_update_model_card._roselora = True
    peft_push_to_hub._roselora = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = peft_push_to_hub
