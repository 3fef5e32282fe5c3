"""Named option presets of ``antibody-fast align`` / ``finetune`` (``--recipe NAME``).

* ``default``: the built-in defaults of every option: small enough to run on a laptop CPU in minutes
  (100 steps, LoRA r = 8, batch 8, fp32 weights). Its numbers are not the paper's.
* ``paper``: the authors' scripts (docs/design.md §2.4): LoRA r = 32, α = 4 on q/k/v; AdamW
  with weight decay 0.1 and a constant schedule; lr 5e-4 for alignment and 1e-5 for fine-tuning; batch 16, max
  length 256, 20 epochs, seed 5, bf16 weights; η = 5, ρ = 0.1, λ_ref = 0.05, EMA momentum 0.99, τ = 1.

Precedence, lowest first: the built-in default < the recipe < ``--config FILE`` < flags on the command line. An
option the recipe leaves out keeps its built-in default. Setting ``--steps`` in a layer above the one that set
``--epochs`` (or the reverse) replaces it: the later layer decides how long the run is.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "recipe_values"]

_PAPER_COMMON: dict[str, Any] = {
    "lora_r": 32,
    "lora_alpha": 4.0,
    "lora_targets": ["q_proj", "k_proj", "v_proj"],
    "weight_decay": 0.1,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "batch_size": 16,
    "max_length": 256,
    "truncation": "right",
    "epochs": 20,
    "seed": 5,
    "dtype": "bfloat16",
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"align": {}, "finetune": {}},
    "paper": {
        "align": {
            **_PAPER_COMMON,
            "lr": 5e-4,
            "eta": 5.0,
            "rho": 0.1,
            "lambda_ref": 0.05,
            "momentum": 0.99,
        },
        "finetune": {**_PAPER_COMMON, "lr": 1e-5, "tau": 1.0},
    },
}
"""``RECIPES[name][command]``: option name -> value (option names as in :mod:`antibody_fast.cli.options`)."""


def recipe_values(name: str, command: str) -> dict[str, Any]:
    """The options recipe ``name`` sets for ``command`` (a copy; ``{}`` for a command it does not cover)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in RECIPES[name].get(command, {}).items()}
