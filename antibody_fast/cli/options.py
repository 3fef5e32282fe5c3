"""The options of ``antibody-fast align``, ``finetune`` and ``evaluate``: one typed dataclass per command.

Each field is one option (``--max-length`` is ``max_length``) and carries its flag's help, choices and kind
in its metadata; the parser (:mod:`antibody_fast.cli.resolve`) and ``--help`` are built from the fields, in
field order (the order of ``--help``, ``--dry-run`` and ``run_config.json``). The classes share their
options by inheritance: :class:`CommonOptions` (every command) < :class:`TrainOptions` (``align``,
``finetune``) < :class:`AlignOptions` / :class:`FinetuneOptions`; :class:`EvaluateOptions` extends
:class:`CommonOptions`.

:meth:`CommonOptions.validate` checks types' ranges, :meth:`TrainOptions.apply_method` rejects options the
chosen ``--method`` does not read and fills in what it implies, :meth:`CommonOptions.missing` lists unmet
requirements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..data.collate import TRUNCATION_SIDES
from ..data.tasks import TASKS
from ..models import ADAPTER_MODES
from ..recipes import RECIPES
from .console import CLIError

__all__ = [
    "Opt",
    "CommonOptions",
    "TrainOptions",
    "AlignOptions",
    "FinetuneOptions",
    "EvaluateOptions",
    "OPTIONS",
    "SPECS",
    "ALIGN_METHODS",
    "FINETUNE_METHODS",
    "CLI_SOURCE",
    "DEFAULT_SOURCE",
    "given",
    "flag_name",
]

ALIGN_METHODS = ("antibody", "booster", "vaccine", "sft")
FINETUNE_METHODS = ("antibody", "sft", "lisa")
DEFAULT_SOURCE = "default"
CLI_SOURCE = "command line"


@dataclass(frozen=True)
class Opt:
    """One option as the parser sees it: ``type`` converts a flag's text (its ``__name__`` is shown in type
    errors), ``list_`` options repeat (``action="append"``), ``flag`` options take no value."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    list_: bool = False
    flag: bool = False


def _float(x):  # argparse names the converter in its errors: "invalid _float value"
    return float(x)


def _opt(type_, default, help: str, *, choices: tuple | None = None, list_: bool = False, flag: bool = False):
    """A dataclass field declaring one option (see :class:`Opt`)."""
    meta = {
        "opt": {
            "type": type_,
            "default": default,
            "help": help,
            "choices": choices,
            "list_": list_,
            "flag": flag,
        }
    }
    if list_:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def given(sources: dict, name: str) -> bool:
    """Whether ``name`` was given by the user (a flag or the config file), not a default or a recipe."""
    return sources[name] == CLI_SOURCE or sources[name].startswith("config ")


# ----------------------------------------------------------------------------------------------- classes
@dataclass
class CommonOptions:
    """Options of every command."""

    command: ClassVar[str] = ""
    description: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ("model", "output")
    # positive options (>= 1) of any command, checked in this order
    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "batch_size",
        "max_length",
        "steps",
        "lora_r",
        "log_every",
        "stop_after",
        "num_samples",
        "num_align",
        "num_harmful",
        "num_eval",
        "max_new_tokens",
        "epochs",
    )

    model: str | None = _opt(str, None, "base model: a local directory or a hub id (required)")
    adapter: list[str] = _opt(
        str,
        [],
        "LoRA adapter directory (repeatable). align / evaluate: merged into the model, in order. finetune: "
        "see --adapter-mode",
        list_=True,
    )
    output: str | None = _opt(str, None, "output directory (required)")
    device: str = _opt(str, "auto", "torch device (auto: cuda when available, else cpu)")
    dtype: str = _opt(str, "float32", "model weight dtype", choices=("float32", "bfloat16", "float16"))
    seed: int = _opt(int, 0, "random seed (data order, LoRA init)")
    max_length: int = _opt(int, 512, "maximum prompt + answer tokens")
    batch_size: int = _opt(int, 8, "samples per step (per batch for evaluate)")
    no_progress: bool = _opt(bool, False, "disable the progress bar", flag=True)
    no_template: bool = _opt(
        bool, False, "use prompts as given (no Alpaca template) for align data", flag=True
    )

    @classmethod
    def specs(cls) -> list[Opt]:
        """The command's options in field order."""
        return [Opt(f.name, **f.metadata["opt"]) for f in fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        """Option name -> value, in field order (what ``--dry-run`` prints and ``run_config.json`` records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Check value ranges (types and choices are checked when the options are read); raises
        :class:`~antibody_fast.cli.console.CLIError`."""
        for name in self._POSITIVE:
            v = getattr(self, name, None)
            if v is not None and v < 1:
                raise CLIError(f"{flag_name(name)} must be >= 1, got {v}")
        if self.max_length is not None and self.max_length < 2:
            raise CLIError(f"--max-length must be >= 2, got {self.max_length}")
        for name in ("save_every", "warmup_steps"):
            v = getattr(self, name, None)
            if v is not None and v < 0:
                raise CLIError(f"{flag_name(name)} must be >= 0, got {v}")

    def missing(self) -> list[str]:
        """Unmet requirements (required options, data a method needs), as error messages."""
        out = []
        missing = [n for n in self.required if getattr(self, n) in (None, "")]
        if missing:
            out.append("missing required option(s): " + ", ".join(flag_name(n) for n in missing))
        return out


@dataclass
class TrainOptions(CommonOptions):
    """Options of the two training commands."""

    # option -> the --methods that read it; given explicitly (flag or --config) to another method: an error
    method_options: ClassVar[dict[str, tuple[str, ...]]] = {}

    recipe: str = _opt(
        str,
        "default",
        "option preset: 'default' runs on a laptop CPU in minutes; 'paper' is the authors' recipe (flags "
        "and --config override it)",
        choices=tuple(RECIPES),
    )
    dry_run: bool = _opt(
        bool, False, "print the resolved configuration (JSON) and exit; loads no model", flag=True
    )
    steps: int | None = _opt(int, 100, "optimizer steps (replaced by --epochs when that is given)")
    epochs: int | None = _opt(
        int, None, "run epochs x ceil(N / global batch) steps, N = training samples kept"
    )
    lr: float = _opt(_float, 1e-4, "learning rate (AdamW)")
    weight_decay: float = _opt(_float, 0.0, "AdamW weight decay")
    lr_scheduler: str = _opt(str, "constant", "LR schedule", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _opt(int, 0, "LR warm-up steps")
    max_grad_norm: float = _opt(_float, 1.0, "gradient clipping norm (0: off)")
    amp: str = _opt(
        str,
        "auto",
        "autocast dtype (auto: bf16 on cuda with float32 weights, else none; antibody/booster/sft only; fp16 "
        "is refused: the steps use no grad scaler)",
        choices=("auto", "none", "bf16", "fp16"),
    )
    lora_r: int = _opt(int, 8, "LoRA rank of a fresh adapter")
    lora_alpha: float | None = _opt(_float, None, "LoRA alpha of a fresh adapter (default 2 * r)")
    lora_targets: list[str] = _opt(
        str,
        ["q_proj", "k_proj", "v_proj"],
        "LoRA target modules of a fresh adapter (comma separated)",
        list_=True,
    )
    refusals: str | None = _opt(
        str, None, "refusal pool: JSONL / JSON / text file (default: the shipped pool)"
    )
    truncation: str = _opt(
        str,
        "right",
        "right: cut prompt + answer on the right (the authors'); left: the prompt loses its oldest tokens",
        choices=TRUNCATION_SIDES,
    )
    drop_overlong: bool = _opt(
        bool,
        False,
        "leave out samples whose answer truncation cuts away (counted in run_config.json) instead of failing",
        flag=True,
    )
    save_every: int = _opt(int, 0, "write a checkpoint every N steps (0: only at the end)")
    resume: bool = _opt(bool, False, "resume from OUTPUT/checkpoint.pt", flag=True)
    force: bool = _opt(
        bool,
        False,
        "with --resume: accept a checkpoint written with other run options (recorded in "
        "OUTPUT/resume_overrides.jsonl)",
        flag=True,
    )
    stop_after: int | None = _opt(
        int, None, "stop after this many steps in this run (simulates an interruption)"
    )
    log_every: int = _opt(int, 1, "write a metrics line every N steps")
    fsdp: bool = _opt(bool, False, "shard the model with FSDP2 (see README 'Scaling out')", flag=True)
    impl: str = _opt(str, "auto", "fused-op implementation", choices=("auto", "triton", "cpp", "torch"))

    def validate(self) -> None:
        super().validate()
        for name in ("lr", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise CLIError(f"{flag_name(name)} must be a finite number >= 0, got {v}")
        if self.lr * self.weight_decay >= 1:
            raise CLIError(
                f"--lr x --weight-decay must be < 1 (AdamW multiplies the weights by 1 - lr * weight_decay each "
                f"step), got {self.lr} x {self.weight_decay}"
            )
        a = self.lora_alpha
        if a is not None and not (math.isfinite(a) and a > 0):
            raise CLIError(f"--lora-alpha must be a finite number > 0, got {a}")
        if self.amp == "fp16":  # as the HF trainers (fp16=True is refused there too)
            raise CLIError(
                "--amp fp16: float16 mixed precision needs a grad scaler, which the steps do not use; "
                "use --amp bf16, or --amp none"
            )

    def apply_method(self, sources: dict) -> None:
        """Reject options the chosen ``--method`` does not read (when given explicitly)."""
        for name, methods in self.method_options.items():
            if self.method not in methods and given(sources, name) and getattr(self, name) not in (None, []):
                users = " / ".join(methods)
                raise CLIError(f"{flag_name(name)} is an option of --method {users}, not of {self.method}")

    def resolve_steps(self, n: int, global_batch: int) -> int:
        """``--steps``, or ``--epochs`` x ceil(n / global batch) (the authors' HF Trainer: ceil(n / batch)
        steps per epoch), written back into :attr:`steps`."""
        if self.epochs is not None:
            self.steps = self.epochs * math.ceil(n / global_batch)
        return self.steps


@dataclass
class AlignOptions(TrainOptions):
    """``antibody-fast align``."""

    command: ClassVar[str] = "align"
    description: ClassVar[str] = (
        "Alignment stage with LoRA: Antibody (align_step), Booster, Vaccine or safety SFT (--method)."
    )
    required: ClassVar[tuple[str, ...]] = ("model", "output", "align_data")
    method_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "harmful_data": ("antibody", "booster"),
        "num_harmful": ("antibody", "booster"),
        "rule": ("antibody", "booster", "sft"),
        "eta": ("antibody", "booster"),
        "rho": ("antibody", "booster"),
        "momentum": ("antibody", "booster"),
        "lambda_ref": ("antibody", "booster"),
        "vaccine_rho": ("vaccine",),
    }
    # --method -> (the λ rule it implies, its λ_ref default); vaccine has neither
    _IMPLIED: ClassVar[dict[str, tuple[str | None, float | None]]] = {
        "antibody": (None, 0.05),
        "booster": ("constant", 0.0),
        "sft": ("none", None),
    }

    method: str = _opt(
        str,
        "antibody",
        "antibody (align_step), booster (align_step, constant lambda, no refusal term), vaccine (vaccine_step) "
        "or sft (safety SFT on the alignment data)",
        choices=ALIGN_METHODS,
    )
    align_data: str | None = _opt(str, None, "alignment data: JSON/JSONL with prompt + refusal (required)")
    harmful_data: str | None = _opt(
        str,
        None,
        "harmful data: BeaverTails-style JSON/JSONL with prompt + response (required by antibody and booster)",
    )
    num_align: int | None = _opt(int, None, "use only the first N alignment records")
    num_harmful: int | None = _opt(int, None, "use only the first N harmful records")
    rule: str | None = _opt(
        str,
        None,
        "antibody's lambda rule (default cosine; constant + lambda_ref 0 = booster; none = safety SFT)",
        choices=("cosine", "kkt", "constant", "none"),
    )
    eta: float = _opt(_float, 5.0, "eta (antibody, booster: the constant lambda)")
    rho: float = _opt(_float, 0.1, "perturbation radius rho (antibody, booster)")
    lambda_ref: float | None = _opt(
        _float, None, "weight of the refusal gradient (antibody; default 0.05; booster: 0)"
    )
    momentum: float = _opt(_float, 0.99, "EMA momentum of lambda (antibody, booster)")
    vaccine_rho: float = _opt(_float, 5.0, "Vaccine's perturbation radius rho_V on the attention outputs")

    @property
    def two_sets(self) -> bool:
        """Whether the method trains on alignment and harmful data (align_step: A, H and R) rather than on the
        alignment data alone (sft, vaccine)."""
        return self.method in ("antibody", "booster")

    def validate(self) -> None:
        super().validate()
        for name in ("eta", "rho", "momentum", "vaccine_rho", "lambda_ref"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise CLIError(f"{flag_name(name)} must be a finite number >= 0, got {v}")
        if not self.momentum < 1:
            raise CLIError(f"--momentum must be in [0, 1), got {self.momentum}")

    def apply_method(self, sources: dict) -> None:
        """Also fill in the λ rule and λ_ref the method implies (an explicit contradiction is an error)."""
        super().apply_method(sources)
        implied = self._IMPLIED.get(self.method)
        if implied is None:  # vaccine
            return
        rule, lambda_ref = implied
        method = self.method
        if rule is not None and given(sources, "rule") and self.rule != rule:
            raise CLIError(f"--method {method} uses --rule {rule}, got --rule {self.rule}")
        if method == "booster" and given(sources, "lambda_ref") and self.lambda_ref != 0:
            raise CLIError(
                f"--method booster has no refusal term (lambda_ref 0), got --lambda-ref {self.lambda_ref}"
            )
        if rule is not None:
            self.rule = rule
        elif self.rule is None:
            self.rule = "cosine"
        if method == "booster" or self.lambda_ref is None:
            self.lambda_ref = lambda_ref if lambda_ref is not None else 0.0
            sources["lambda_ref"] = f"--method {method}"

    def missing(self) -> list[str]:
        out = super().missing()
        if self.two_sets and not self.harmful_data:
            out.append(f"--method {self.method} needs --harmful-data")
        return out


@dataclass
class FinetuneOptions(TrainOptions):
    """``antibody-fast finetune``."""

    command: ClassVar[str] = "finetune"
    description: ClassVar[str] = (
        "Fine-tuning stage on a poisoned user set: Antibody (weighted_step, with a per-sample "
        "suppression report), plain SFT or Lisa (--method); continues the alignment adapter by default."
    )
    required: ClassVar[tuple[str, ...]] = ("model", "output", "task", "task_data")
    method_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "tau": ("antibody",),
        "refusal_scoring": ("antibody",),
        "align_data": ("lisa",),
        "num_align": ("lisa",),
        "lisa_align_steps": ("lisa",),
        "lisa_finetune_steps": ("lisa",),
        "lisa_rho": ("lisa",),
        "lisa_warmup_fraction": ("lisa",),
    }

    task: str | None = _opt(str, None, "user task format (required)", choices=TASKS)
    task_data: str | None = _opt(str, None, "user task JSON/JSONL (required)")
    harmful_data: str | None = _opt(
        str, None, "harmful JSON/JSONL mixed into the user data (required when ratio > 0)"
    )
    harmful_ratio: float = _opt(_float, 0.1, "fraction p of harmful samples in the user set, in [0, 1]")
    num_samples: int = _opt(int, 1000, "number n of user samples")
    method: str = _opt(
        str,
        "antibody",
        "antibody (weighted_step), sft (plain SFT) or lisa (lisa_step, alternating with --align-data)",
        choices=FINETUNE_METHODS,
    )
    adapter_mode: str | None = _opt(
        str,
        None,
        "with --adapter: continue = keep training the (last) adapter, the authors' single LoRA; merge = merge "
        "it and train a fresh LoRA. Default: merge when the adapter was made by align --method vaccine (its "
        "metadata says so), else continue",
        choices=ADAPTER_MODES,
    )
    tau: float = _opt(_float, 1.0, "softmax temperature of the sample weights (antibody)")
    refusal_scoring: str = _opt(
        str, "prefix_cache", "how refusals are scored (antibody)", choices=("prefix_cache", "full")
    )
    align_data: str | None = _opt(
        str, None, "alignment data (prompt + refusal) of Lisa's alignment state (lisa: required)"
    )
    num_align: int | None = _opt(int, None, "use only the first N alignment records (lisa)")
    lisa_align_steps: int = _opt(int, 100, "Lisa's K_a: steps of each alignment state")
    lisa_finetune_steps: int = _opt(int, 900, "Lisa's K_f: steps of each fine-tuning state")
    lisa_rho: float = _opt(_float, 0.01, "Lisa's proximal weight rho_L")
    lisa_warmup_fraction: float = _opt(
        _float, 0.1, "Lisa: no proximal term while step <= fraction x total steps (the authors' warm-up)"
    )

    def validate(self) -> None:
        super().validate()
        p = self.harmful_ratio
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise CLIError(f"--harmful-ratio must be in [0, 1], got {p}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise CLIError(f"--tau must be > 0, got {self.tau}")
        for name in ("lisa_align_steps", "lisa_finetune_steps"):
            if getattr(self, name) < 0:
                raise CLIError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.lisa_align_steps + self.lisa_finetune_steps == 0:
            raise CLIError("--lisa-align-steps + --lisa-finetune-steps must be > 0")
        if not (math.isfinite(self.lisa_rho) and self.lisa_rho >= 0):
            raise CLIError(f"--lisa-rho must be a finite number >= 0, got {self.lisa_rho}")
        w = self.lisa_warmup_fraction
        if not (math.isfinite(w) and 0.0 <= w <= 1.0):
            raise CLIError(f"--lisa-warmup-fraction must be in [0, 1], got {w}")

    def missing(self) -> list[str]:
        out = super().missing()
        if self.harmful_ratio > 0 and not self.harmful_data:
            out.append("--harmful-ratio > 0 needs --harmful-data")
        if self.method == "lisa" and not self.align_data:
            out.append("--method lisa needs --align-data (Lisa's alignment state)")
        return out


@dataclass
class EvaluateOptions(CommonOptions):
    """``antibody-fast evaluate``."""

    command: ClassVar[str] = "evaluate"
    description: ClassVar[str] = (
        "Fine-tune accuracy (FA) on a task test set and harmful score (HS) on harmful prompts."
    )

    task: str | None = _opt(str, None, "task format of --task-data", choices=TASKS)
    task_data: str | None = _opt(str, None, "task test JSON/JSONL (FA)")
    harmful_prompts: str | None = _opt(str, None, "BeaverTails-style JSON/JSONL of harmful prompts (HS)")
    judge_model: str | None = _opt(
        str, None, "local HF moderation model used as HS judge (default: refusal-pattern proxy)"
    )
    judge_kind: str = _opt(
        str,
        "classifier",
        "kind of --judge-model: a sequence classifier, or a causal LM that answers safe/unsafe (Llama-Guard style)",
        choices=("classifier", "causal-lm"),
    )
    max_new_tokens: int = _opt(int, 128, "greedy generation length")
    num_eval: int | None = _opt(int, None, "use only the first N records of each evaluation file")

    def validate(self) -> None:
        super().validate()
        if not self.task_data and not self.harmful_prompts:
            raise CLIError("nothing to evaluate: give --task-data (with --task) and/or --harmful-prompts")
        if self.task_data and not self.task:
            raise CLIError("--task-data needs --task (sst2, agnews, gsm8k or alpaca)")


OPTIONS: dict[str, type[CommonOptions]] = {
    "align": AlignOptions,
    "finetune": FinetuneOptions,
    "evaluate": EvaluateOptions,
}
SPECS: dict[str, list[Opt]] = {command: cls.specs() for command, cls in OPTIONS.items()}
