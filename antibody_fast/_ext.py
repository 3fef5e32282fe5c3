"""Loader of the compiled C++ CPU extension ``antibody_fast._C``.

Order of attempts:
  1. the extension built by setup.py (``antibody_fast/_C*.so``), if it was built for this torch;
  2. a cached JIT build of the same sources (``~/.cache/antibody_fast/<torch version>``), with ninja;
  3. nothing: the ``cpp`` implementation is unavailable and ``auto`` falls back to the torch reference.

Each fallback emits exactly one warning; none raises. Nothing here touches CUDA.
"""

from __future__ import annotations

import glob
import os
import threading
import warnings

import torch

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "how": None, "reason": "not loaded yet"}

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_dir() -> str | None:
    for cand in (os.path.join(_PKG_DIR, "_csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if glob.glob(os.path.join(cand, "*.cpp")):
            return cand
    return None


def _load_prebuilt():
    import importlib

    mod = importlib.import_module("antibody_fast._C")
    built_for = getattr(mod, "torch_version", "unknown")
    if built_for != torch.__version__:
        raise ImportError(
            f"antibody_fast._C was built for torch {built_for}, this is torch {torch.__version__}"
        )
    return mod


def _load_jit():
    from torch.utils.cpp_extension import load

    src = _source_dir()
    if src is None:
        raise RuntimeError("no C++ sources found for a JIT build")
    build_dir = os.path.join(
        os.environ.get(
            "ANTIBODY_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "antibody_fast")
        ),
        "jit-torch-" + torch.__version__.replace("+", "_"),
    )
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="antibody_fast_C_jit",
        sources=sorted(glob.glob(os.path.join(src, "*.cpp"))),
        extra_cflags=["-O3", "-fopenmp", "-std=c++20", f"-DANTIBODY_FAST_TORCH_VERSION={torch.__version__}"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        verbose=False,
    )


def load_extension():
    """Return the loaded extension module, or None. Idempotent; never raises."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("ANTIBODY_FAST_DISABLE_EXT", "0") == "1":
            _state.update(tried=True, module=None, how=None, reason="disabled by ANTIBODY_FAST_DISABLE_EXT=1")
            return None
        try:
            _state.update(module=_load_prebuilt(), how="prebuilt", reason="")
        except Exception as e_pre:  # missing or built for another torch
            why = f"{type(e_pre).__name__}: {e_pre}"
            if os.environ.get("ANTIBODY_FAST_JIT", "1") == "0":
                _state.update(module=None, reason=f"prebuilt extension unusable ({why}); JIT disabled")
                warnings.warn(
                    f"antibody_fast: C++ extension unavailable ({why}); using the torch reference on CPU",
                    stacklevel=2,
                )
            else:
                try:
                    _state.update(module=_load_jit(), how="jit", reason="")
                    warnings.warn(
                        f"antibody_fast: prebuilt C++ extension unusable ({why}); using a cached JIT build",
                        stacklevel=2,
                    )
                except Exception as e_jit:
                    _state.update(
                        module=None, reason=f"prebuilt: {why}; JIT build: {type(e_jit).__name__}: {e_jit}"
                    )
                    warnings.warn(
                        "antibody_fast: C++ extension unavailable and the JIT build failed "
                        f"({_state['reason'][:300]}); using the torch reference on CPU",
                        stacklevel=2,
                    )
        _state["tried"] = True
        return _state["module"]


def extension_status() -> dict:
    """{'loaded': bool, 'how': 'prebuilt'|'jit'|None, 'reason': str, 'torch_version': str|None}."""
    mod = load_extension()
    return {
        "loaded": mod is not None,
        "how": _state["how"],
        "reason": _state["reason"],
        "torch_version": getattr(mod, "torch_version", None) if mod is not None else None,
        "openmp": getattr(mod, "openmp", None) if mod is not None else None,
    }


def extension_error() -> str | None:
    """Why the extension is not loaded (loading it first if needed), or None when it is. Never raises."""
    return None if load_extension() is not None else _state["reason"]


def cpp_ops():
    """``torch.ops.antibody_fast_cpp`` once the extension is loaded (raises if it is not)."""
    if load_extension() is None:
        raise RuntimeError(f"antibody_fast C++ extension not loaded: {_state['reason']}")
    return torch.ops.antibody_fast_cpp
