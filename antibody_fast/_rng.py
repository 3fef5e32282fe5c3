"""Every random-number generator's state, for checkpoints: torch CPU, torch CUDA (every device, when CUDA is
initialised), Python ``random`` and NumPy's legacy global RNG, as plain tensors / lists (so a checkpoint loads
with ``torch.load(weights_only=True)``).

Foundation layer (docs/design.md §7): imports nothing from the package.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["check_rng", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    v, internal, gauss = random.getstate()
    state["python"] = [v, list(internal), gauss]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        s = state["numpy"]
        np.random.set_state(  # noqa: NPY002 - restoring the legacy global RNG is the point
            (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )


def check_rng(rng: Any) -> None:
    if not isinstance(rng, dict) or not isinstance(rng.get("torch_cpu"), torch.Tensor):
        raise ValueError("load_checkpoint: corrupt 'rng' entry (no torch_cpu state)")
    t = rng["torch_cpu"]
    if t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        raise ValueError("load_checkpoint: corrupt 'rng' entry (torch_cpu state has the wrong shape/dtype)")
    if "python" in rng:
        py = rng["python"]
        if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple))):
            raise ValueError("load_checkpoint: corrupt 'rng' entry (python state)")
    if "numpy" in rng:
        s = rng["numpy"]
        if not (isinstance(s, dict) and {"name", "keys", "pos", "has_gauss", "cached_gaussian"} <= set(s)):
            raise ValueError("load_checkpoint: corrupt 'rng' entry (numpy state)")
    if "torch_cuda" in rng and not (
        isinstance(rng["torch_cuda"], (list, tuple))
        and all(isinstance(x, torch.Tensor) for x in rng["torch_cuda"])
    ):
        raise ValueError("load_checkpoint: corrupt 'rng' entry (torch_cuda states)")
