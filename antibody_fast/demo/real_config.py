"""Configuration of the real-model demo (:mod:`antibody_fast.demo.real`): :class:`RealConfig` and the committed
SFT-only calibration of the fine-tuning learning rate and step count (:func:`load_calibration`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import natural as nat
from .methods import DEFAULT_METHODS

LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "smollm2_calibration.json"
"""The committed SFT-only calibration of the fine-tuning learning rate and step count."""


@dataclass
class RealConfig:
    """Everything that defines a real-model run.

    ``finetune_lr`` / ``steps`` ``None``: the calibrated values of :data:`CALIBRATION_FILE`."""

    seed: int = 0
    seeds: tuple[int, ...] = ()
    harmful_ratio: float = 0.2
    harmful_ratios: tuple[
        float, ...
    ] = ()  # several: stage 1 once per seed, stage 2 per ratio (OUT/ratio_<r>/)
    task: str = "topic"
    methods: tuple[str, ...] = DEFAULT_METHODS
    samples: int = 160  # user fine-tuning set
    steps: int | None = None  # fine-tuning steps (None: calibrated)
    align_steps: int = 40  # chosen on SFT alone: benchmarks/results/smollm2_align_calibration.json
    align_samples: int = 160  # A and H sizes
    benign_mix: float = 0.0  # fraction of A replaced by benign -> helpful pairs (0: the authors' setting)
    batch_size: int = 8
    align_lr: float = 5e-4  # the paper's
    finetune_lr: float | None = None  # None: calibrated
    weight_decay: float = 0.1
    lora_rank: int = 32
    lora_alpha: float = 4.0
    max_length: int = 128  # prompt + answer; harmful answers are cut on the right (the authors' rule)
    eval_harmful: int = 32
    eval_task: int = 32
    eval_benign: int = 16
    eval_every: int = 0  # held-out HS/FA every N fine-tuning steps (0: end only)
    hs_new_tokens: int = 24
    fa_new_tokens: int = 6
    lisa_cycles: int = 5  # Lisa's 100/900 alternation scaled to about this many cycles over the run
    threads: int = (
        1  # 1: a second OpenMP thread on a busy 2-core CPU made small matmuls ~10x slower (measured)
    )
    out: str = "antibody_demo_smollm2"
    quick: bool = False
    progress: bool = True
    calibration: str = field(default_factory=lambda: str(CALIBRATION_FILE))

    @classmethod
    def quick_config(cls, **overrides) -> RealConfig:
        """A run of a few minutes (numbers are not meaningful beyond showing the pipeline works)."""
        base = dict(
            samples=48,
            steps=6,
            align_steps=4,
            align_samples=32,
            eval_harmful=8,
            eval_task=8,
            eval_benign=8,
            eval_every=0,
            hs_new_tokens=16,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        for r in self.ratio_list():
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"--harmful-ratio must be in [0, 1], got {r}")
        if not 0.0 <= self.benign_mix < 1.0:
            raise ValueError(f"--benign-mix must be in [0, 1), got {self.benign_mix}")
        if len(set(self.harmful_ratios)) != len(self.harmful_ratios):
            raise ValueError("--harmful-ratio lists a ratio twice")
        if self.task not in nat.TASKS:
            raise ValueError(f"task must be one of {nat.TASKS}, got {self.task!r}")
        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: choose a non-empty subset of {','.join(DEFAULT_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("--methods lists a method twice")
        for name in ("align_steps", "batch_size", "align_samples", "samples", "threads", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_harmful", "eval_task", "eval_benign", "hs_new_tokens", "fa_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ValueError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if self.samples < self.batch_size:
            raise ValueError(f"--samples ({self.samples}) must be >= the batch size ({self.batch_size})")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if any(s < 0 for s in self.seed_list()) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct non-negative integers")

    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.seed,)

    def ratio_list(self) -> tuple[float, ...]:
        return tuple(self.harmful_ratios) or (self.harmful_ratio,)

    def resolved(self) -> RealConfig:
        """This configuration with ``finetune_lr`` and ``steps`` filled in from the calibration file."""
        if self.finetune_lr is not None and self.steps is not None:
            return self
        cal = load_calibration(self.calibration)
        if cal.get("task") != self.task:
            raise ValueError(
                f"the calibration {self.calibration} is for task {cal.get('task')!r}, not {self.task!r}; "
                "pass --finetune-lr and --steps"
            )
        return replace(
            self,
            finetune_lr=self.finetune_lr
            if self.finetune_lr is not None
            else float(cal["chosen"]["finetune_lr"]),
            steps=self.steps if self.steps is not None else int(cal["chosen"]["steps"]),
        )


def load_calibration(path: str | os.PathLike = CALIBRATION_FILE) -> dict:
    """The calibration JSON (``task``, ``chosen: {finetune_lr, steps}``, the search and its rule)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no fine-tuning calibration at {p}: run `python scripts/calibrate_smollm2.py` or pass --finetune-lr "
            "and --steps"
        )
    cal = json.loads(p.read_text())
    if "chosen" not in cal or "finetune_lr" not in cal["chosen"] or "steps" not in cal["chosen"]:
        raise ValueError(f"{p}: not a calibration file (no chosen.finetune_lr / chosen.steps)")
    return cal
