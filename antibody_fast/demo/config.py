"""Configuration of the toy demo (:mod:`antibody_fast.demo.run`): :class:`DemoConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from .methods import ALL_METHODS, DEFAULT_METHODS

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Stages 1 and 2 train LoRA adapters on every linear layer of the trunk."""


@dataclass
class DemoConfig:
    """Everything that defines a demo run (see :func:`antibody_fast.demo.main` for the command line)."""

    seed: int = 0
    harmful_ratio: float = 0.2
    samples: int = 1000  # size of the user's fine-tuning set
    methods: tuple[str, ...] = DEFAULT_METHODS
    # fine-tuning steps (stage 2): 600 so that plain SFT learns the user's task on every seed. Measured SFT FA
    # on seeds 0-4 (SFT alignment, 20% harmful): 88/99/10/2/10% after 300 steps, 100/100/96/95/96% after 600.
    steps: int = 600
    eval_every: int = (
        100  # HS/FA on the held-out prompts every this many fine-tuning steps (0: only at the end)
    )
    seeds: tuple[int, ...] = ()  # several seeds: one run per seed plus a summary; empty = (seed,)
    align_steps: int = 300  # stage 1
    base_steps: int = 800  # stage 0
    batch_size: int = 16
    base_batch_size: int = 32
    base_lr: float = 3e-3
    align_lr: float = 1e-3
    finetune_lr: float = 1e-3
    finetune_optimizer: str = (
        "adamw"  # stage 2: "adamw" (the paper's) or "sgd" (momentum 0.9), for comparison
    )
    base_user_samples: int = 100  # distinct user-task (INC) samples in the base training mix
    align_samples: int = 400  # alignment set (harmful prompt -> refusal) and harmful set sizes
    eval_harmful: int = 200
    eval_benign: int = 200
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    lora_rank: int = 8
    lora_alpha: float = 1.0  # scaling alpha / r = 1/8, the authors' LoRA setting (r = 32, alpha = 4)
    threads: int = 1
    out: str = "antibody_demo"
    quick: bool = False
    progress: bool = True

    @classmethod
    def quick_config(cls, **overrides) -> DemoConfig:
        """A seconds-scale configuration for tests (the numbers are not meaningful)."""
        base = dict(
            samples=120,
            steps=8,
            align_steps=4,
            base_steps=30,
            batch_size=8,
            base_batch_size=16,
            align_samples=48,
            eval_harmful=24,
            eval_benign=24,
            hidden=32,
            eval_every=4,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        if not (0.0 <= self.harmful_ratio <= 1.0):
            raise ValueError(f"--harmful-ratio must be in [0, 1], got {self.harmful_ratio}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("--methods is empty; choose from " + ", ".join(ALL_METHODS))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")
        for name in ("steps", "align_steps", "base_steps", "batch_size", "base_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples < self.batch_size:
            raise ValueError(f"--samples ({self.samples}) must be >= the batch size ({self.batch_size})")
        if self.finetune_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--finetune-optimizer must be adamw or sgd, got {self.finetune_optimizer!r}")
        for name in ("base_lr", "align_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("align_samples", "eval_harmful", "eval_benign"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be non-negative integers, got {','.join(map(str, self.seeds))}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds lists a seed twice: {','.join(map(str, self.seeds))}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")

    def seed_list(self) -> tuple[int, ...]:
        """The seeds this configuration runs (``seeds`` or ``(seed,)``)."""
        return tuple(self.seeds) or (self.seed,)
