"""Loading RoseLoRA adapters in processes that never ``import peft_roselora``: the ``peft-roselora-autoload.pth``
hook installed with the package registers RoseLoRA when ``peft`` is imported (``_peft_roselora_autoload``).

Every check runs in a fresh interpreter of this environment (the hook acts at interpreter start): PEFT's
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM``, transformers' ``load_adapter`` and
``AutoModelForCausalLM.from_pretrained(adapter folder)``, a TRL script (``SFTTrainer`` on the loaded adapter); the
logits equal the saving process's. ``PEFT_ROSELORA_AUTOLOAD=0`` switches the hook off; a process that never imports
``peft`` imports neither peft, torch nor peft_roselora because of it; a broken ``peft_roselora`` never breaks
``import peft``."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, random_batch, trained_roselora
from safetensors.torch import save_file

import _peft_roselora_autoload


def _fresh(code: str, env_overrides: dict | None = None, **paths) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(_peft_roselora_autoload.ENVIRONMENT_VARIABLE, None)
    env.update(env_overrides or {})
    script = textwrap.dedent(code).format(**{key: repr(str(value)) for key, value in paths.items()})
    # run outside the checkout, so that the package comes from the installation (and a stand-in on PYTHONPATH can
    # shadow it), not from the current directory
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tempfile.gettempdir()
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained RoseLoRA adapter whose config names a local base folder, a tokenizer, and the expected logits."""
    folder = tmp_path_factory.mktemp("autoload")
    make_tiny_llama().save_pretrained(folder / "base")
    model = trained_roselora(make_tiny_llama(), ["q_proj", "v_proj", "down_proj"])
    model.peft_config["default"].base_model_name_or_path = str(folder / "base")
    model.save_pretrained(folder / "adapter")
    ids = random_batch(7)
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(input_ids=ids).logits}, folder / "expected.safetensors")
    return folder


def test_the_hook_is_installed_with_the_package():
    site_dirs = [Path(folder) for folder in site.getsitepackages()]
    assert any((folder / "peft-roselora-autoload.pth").exists() for folder in site_dirs), site_dirs


LOADERS = {
    "PeftModel.from_pretrained": """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), {adapter})
    """,
    "AutoPeftModelForCausalLM": """
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({adapter})
    """,
    "transformers load_adapter": """
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({base})
        model.load_adapter({adapter})
    """,
    "transformers from_pretrained(adapter folder)": """
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({adapter})
    """,
    "TRL SFTTrainer(model=AutoPeftModelForCausalLM(adapter folder))": """
        from trl import SFTConfig, SFTTrainer  # TRL imports peft itself: the hook registers inside TRL's import
        from datasets import Dataset
        from peft import AutoPeftModelForCausalLM
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({{"<pad>": 0, "<eos>": 1, "a": 2}}, unk_token="a")),
            eos_token="<eos>", pad_token="<pad>",
        )
        args = SFTConfig(output_dir={out}, max_steps=1, use_cpu=True, report_to=[], bf16=False)
        trainer = SFTTrainer(
            model=AutoPeftModelForCausalLM.from_pretrained({adapter}, is_trainable=True),
            args=args,
            train_dataset=Dataset.from_dict({{"text": ["a a a"] * 4}}),
            processing_class=tokenizer,
        )
        model = trainer.model
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("loader", list(LOADERS))
def test_adapter_loads_without_the_import_with_equal_logits(loader, saved, tmp_path):
    code = textwrap.dedent(LOADERS[loader]) + textwrap.dedent(
        """
        import sys
        import torch
        from safetensors.torch import load_file
        assert "peft_roselora" in sys.modules  # imported by the hook, not by this script
        from peft_roselora import RoseLoraLayer
        assert any(isinstance(m, RoseLoraLayer) for m in model.modules())
        expected = load_file({expected})
        with torch.no_grad():
            logits = model.eval()(input_ids=expected["ids"]).logits
        assert torch.allclose(logits, expected["logits"], atol=1e-6), (logits - expected["logits"]).abs().max()
        print("ok")
        """
    )
    assert "peft_roselora" not in code.split('assert "peft_roselora" in sys.modules')[0]
    result = _fresh(
        code,
        base=saved / "base",
        adapter=saved / "adapter",
        expected=saved / "expected.safetensors",
        out=tmp_path / "trl",
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.slow
def test_switched_off_by_the_environment_loading_fails_with_keyerror(saved):
    result = _fresh(
        "from peft import PeftConfig; PeftConfig.from_pretrained({adapter})",
        {_peft_roselora_autoload.ENVIRONMENT_VARIABLE: "0"},
        adapter=saved / "adapter",
    )
    assert result.returncode != 0 and "KeyError: 'ROSELORA'" in result.stderr


def test_a_process_that_never_imports_peft_imports_nothing_heavy():
    result = _fresh(
        """
        import sys
        names = ("peft", "torch", "peft_roselora", "_peft_roselora_autoload")
        print(sorted(name for name in names if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['_peft_roselora_autoload']"


@pytest.mark.slow
def test_a_broken_peft_roselora_never_breaks_import_peft(tmp_path):
    broken = tmp_path / "peft_roselora"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('broken on purpose')\n")
    result = _fresh(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        assert hasattr(peft, "PeftModel")
        print([str(w.message) for w in caught if "could not register RoseLoRA" in str(w.message)])
        """,
        {"PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "broken on purpose" in result.stdout


@pytest.mark.slow
def test_registration_waits_for_a_module_that_imports_peft_from_inside_its_own_import(tmp_path):
    # `circular` imports peft while it is itself being imported, and (this stand-in) peft_roselora needs `circular`:
    # the hook must wait until `circular` is complete, then register at the next import
    (tmp_path / "circular.py").write_text("import peft\nVALUE = 1\n")
    (tmp_path / "imported_later.py").write_text("")
    (tmp_path / "peft_roselora").mkdir()
    (tmp_path / "peft_roselora" / "__init__.py").write_text(
        "import sys\nfrom circular import VALUE\nsys.modules['registered_marker'] = sys\n"
    )
    result = _fresh(
        """
        import sys
        import circular
        assert "registered_marker" not in sys.modules
        import imported_later  # any later import
        assert "registered_marker" in sys.modules
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "error::RuntimeWarning"},
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_the_hook_registers_at_once_if_peft_is_already_imported_and_is_idempotent():
    result = _fresh(
        """
        import sys
        import peft
        import _peft_roselora_autoload as hook
        hook.install()
        hook.install()
        assert "peft_roselora" in sys.modules
        assert not any(isinstance(f, hook.PeftImportWatcher) for f in sys.meta_path)
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
