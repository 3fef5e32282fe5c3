"""The ``align``, ``finetune`` and ``evaluate`` subcommands of ``antibody-fast`` (dispatched by
:mod:`antibody_fast.cli`): ``main(command, argv) -> exit status``.

Pipeline on a real model (a local directory or a hub id; ``HF_HUB_OFFLINE=1`` is respected)::

    antibody-fast align    --model M --align-data align.jsonl --harmful-data beavertails.jsonl --output run/align
    antibody-fast finetune --model M --adapter run/align/adapter --task sst2 --task-data sst2.jsonl \\
                           --harmful-data beavertails.jsonl --harmful-ratio 0.2 --num-samples 1000 --output run/ft
    antibody-fast evaluate --model M --adapter run/align/adapter --adapter run/ft/adapter --task sst2 \\
                           --task-data sst2_test.jsonl --harmful-prompts beavertails_test.jsonl --output run/eval

* **Methods** (``--method``): ``align`` runs ``antibody`` (:func:`~antibody_fast.align_step`, λ rule
  ``--rule``), ``booster`` (``align_step`` with a constant λ = η and no refusal term), ``vaccine``
  (:func:`~antibody_fast.baselines.vaccine_step`, ``--vaccine-rho``) or ``sft`` (safety SFT on the alignment
  data); ``finetune`` runs ``antibody`` (:func:`~antibody_fast.weighted_step`), ``sft`` or ``lisa``
  (:func:`~antibody_fast.baselines.lisa_step` alternating ``--lisa-align-steps`` steps on ``--align-data`` and
  ``--lisa-finetune-steps`` on the user data, proximal weight ``--lisa-rho``, no proximal term while
  step <= ``--lisa-warmup-fraction`` x the run's steps). An option only another method reads is an error.
* **Configuration**: ``--recipe default|paper`` (:mod:`antibody_fast.recipes`) < ``--config FILE`` (YAML or
  JSON; keys are option names with ``_`` or ``-``) < flags on the command line. ``--help`` names each
  recipe's default; ``--dry-run`` prints the resolved options and where each came from, and exits.
  ``run_config.json`` records the same (``option_sources``).
* **Adapters**: ``--adapter DIR`` (repeatable). ``align`` and ``evaluate`` merge them into the base model, in
  order; ``align`` then trains a fresh LoRA (``--lora-r``, ``--lora-alpha``, ``--lora-targets``). ``finetune``
  merges all but the last, and ``--adapter-mode continue`` keeps training the last one (the authors' "single
  LoRA", its own rank and targets) while ``merge`` merges it too and trains a fresh LoRA. The default follows
  the authors: ``merge`` when the adapter's metadata (``adapter/antibody_fast_adapter.json``, which every
  adapter this CLI saves carries: command, method) says ``align --method vaccine`` made it, else ``continue``.
* **Data**: ``--refusals FILE`` (the refusal pool, :func:`~antibody_fast.data.load_refusals`),
  ``--truncation right|left``, ``--max-length``, ``--drop-overlong`` (samples whose answer truncation cuts away
  are left out and counted in ``run_config.json``; without it they are an error), ``--epochs`` (instead of
  ``--steps``: epochs x ceil(samples / global batch)).
* **Progress**: a tqdm bar with the step time, tokens/s, λ_t (align) or the harmful / benign mean weights
  (finetune); ``--no-progress`` turns it off.
* **Checkpoints**: every ``--save-every`` steps (``OUTPUT/checkpoint.pt``, written atomically: adapter
  weights, optimizer, scheduler, AlignState, RNG, data position and suppression statistics);
  ``--resume`` continues from it and ends with the same adapter as an uninterrupted run.
* **Outputs** (``--output DIR``): ``adapter/`` (PEFT ``save_pretrained`` + ``antibody_fast_adapter.json``),
  ``metrics.jsonl`` (one JSON line per logged step; ``align`` logs ``loss_combined`` = L_A + λ_t (L_H - L_P) +
  λ_ref L_R next to ``loss_align``), ``run_config.json``; ``finetune`` also writes the per-sample suppression report
  ``suppression_report.csv`` (Antibody: each uploaded sample's mean weight over training) and, when harmful flags exist,
  ``suppression_summary.json`` (AUROC of the weights, benign vs harmful) and ``suppression_hist.png``
  (weights by class; needs matplotlib); ``evaluate`` writes ``eval.json`` and ``samples.jsonl``.
* **Several processes**: launched with ``torchrun --nproc-per-node N -m antibody_fast align|finetune ...``,
  ``align`` and ``finetune`` run data-parallel (NCCL on CUDA, one GPU per local rank; gloo on CPU).
  ``--batch-size`` is per process: each step the ranks take consecutive slices of one global batch of
  ``N x batch_size`` samples. The steps reduce the gradients, token counts and (``finetune``) the softmax over
  that global batch, so the update equals one process with ``--batch-size N x batch_size``. Only rank 0 writes
  (metrics, checkpoints, adapter, suppression report); per-sample weights are summed over ranks first. The
  metrics' weight statistics are rank 0's slice. A checkpoint resumes with another number of processes when
  ``N x batch_size`` stays the same (otherwise ``--resume`` is refused). ``evaluate`` runs in one process.
* **Bad input** (malformed JSON, a missing field, an empty dataset, a ratio outside [0, 1], an unknown model,
  a bad option) is reported as ``antibody-fast <command>: error: ...`` with exit status 2, naming the file,
  line and field, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data.collate import TRUNCATION_SIDES
from .models import ADAPTER_MODES
from .recipes import RECIPES, recipe_values

__all__ = ["main", "CLIError", "auroc", "COMMANDS", "parse_options", "resolve_options"]

COMMANDS = ("align", "finetune", "evaluate")
ALIGN_METHODS = ("antibody", "booster", "vaccine", "sft")
FINETUNE_METHODS = ("antibody", "sft", "lisa")


class CLIError(ValueError):
    """A user error: reported without a traceback, exit status 2."""


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Opt:
    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    list_: bool = False
    flag: bool = False


def _float(x):
    return float(x)


COMMON = [
    Opt("model", str, None, "base model: a local directory or a hub id (required)"),
    Opt(
        "adapter",
        str,
        [],
        "LoRA adapter directory (repeatable). align / evaluate: merged into the model, in order. finetune: "
        "see --adapter-mode",
        list_=True,
    ),
    Opt("output", str, None, "output directory (required)"),
    Opt("device", str, "auto", "torch device (auto: cuda when available, else cpu)"),
    Opt("dtype", str, "float32", "model weight dtype", choices=("float32", "bfloat16", "float16")),
    Opt("seed", int, 0, "random seed (data order, LoRA init)"),
    Opt("max_length", int, 512, "maximum prompt + answer tokens"),
    Opt("batch_size", int, 8, "samples per step (per batch for evaluate)"),
    Opt("no_progress", bool, False, "disable the progress bar", flag=True),
    Opt("no_template", bool, False, "use prompts as given (no Alpaca template) for align data", flag=True),
]
TRAIN = [
    Opt(
        "recipe",
        str,
        "default",
        "option preset: 'default' runs on a laptop CPU in minutes; 'paper' is the authors' recipe (flags "
        "and --config override it)",
        choices=tuple(RECIPES),
    ),
    Opt(
        "dry_run", bool, False, "print the resolved configuration (JSON) and exit; loads no model", flag=True
    ),
    Opt("steps", int, 100, "optimizer steps (replaced by --epochs when that is given)"),
    Opt("epochs", int, None, "run epochs x ceil(N / global batch) steps, N = training samples kept"),
    Opt("lr", _float, 1e-4, "learning rate (AdamW)"),
    Opt("weight_decay", _float, 0.0, "AdamW weight decay"),
    Opt("lr_scheduler", str, "constant", "LR schedule", choices=("constant", "linear", "cosine")),
    Opt("warmup_steps", int, 0, "LR warm-up steps"),
    Opt("max_grad_norm", _float, 1.0, "gradient clipping norm (0: off)"),
    Opt(
        "amp",
        str,
        "auto",
        "autocast dtype (auto: bf16 on cuda with float32 weights, else none; antibody/booster/sft only)",
        choices=("auto", "none", "bf16", "fp16"),
    ),
    Opt("lora_r", int, 8, "LoRA rank of a fresh adapter"),
    Opt("lora_alpha", _float, None, "LoRA alpha of a fresh adapter (default 2 * r)"),
    Opt(
        "lora_targets",
        str,
        ["q_proj", "k_proj", "v_proj"],
        "LoRA target modules of a fresh adapter (comma separated)",
        list_=True,
    ),
    Opt("refusals", str, None, "refusal pool: JSONL / JSON / text file (default: the shipped pool)"),
    Opt(
        "truncation",
        str,
        "right",
        "right: cut prompt + answer on the right (the authors'); left: the prompt loses its oldest tokens",
        choices=TRUNCATION_SIDES,
    ),
    Opt(
        "drop_overlong",
        bool,
        False,
        "leave out samples whose answer truncation cuts away (counted in run_config.json) instead of failing",
        flag=True,
    ),
    Opt("save_every", int, 0, "write a checkpoint every N steps (0: only at the end)"),
    Opt("resume", bool, False, "resume from OUTPUT/checkpoint.pt", flag=True),
    Opt(
        "force",
        bool,
        False,
        "with --resume: accept a checkpoint written with other run options (recorded in "
        "OUTPUT/resume_overrides.jsonl)",
        flag=True,
    ),
    Opt("stop_after", int, None, "stop after this many steps in this run (simulates an interruption)"),
    Opt("log_every", int, 1, "write a metrics line every N steps"),
    Opt("impl", str, "auto", "fused-op implementation", choices=("auto", "triton", "cpp", "torch")),
]
ALIGN = [
    Opt(
        "method",
        str,
        "antibody",
        "antibody (align_step), booster (align_step, constant lambda, no refusal term), vaccine (vaccine_step) "
        "or sft (safety SFT on the alignment data)",
        choices=ALIGN_METHODS,
    ),
    Opt("align_data", str, None, "alignment data: JSON/JSONL with prompt + refusal (required)"),
    Opt(
        "harmful_data",
        str,
        None,
        "harmful data: BeaverTails-style JSON/JSONL with prompt + response (required by antibody and booster)",
    ),
    Opt("num_align", int, None, "use only the first N alignment records"),
    Opt("num_harmful", int, None, "use only the first N harmful records"),
    Opt(
        "rule",
        str,
        None,
        "antibody's lambda rule (default cosine; constant + lambda_ref 0 = booster; none = safety SFT)",
        choices=("cosine", "kkt", "constant", "none"),
    ),
    Opt("eta", _float, 5.0, "eta (antibody, booster: the constant lambda)"),
    Opt("rho", _float, 0.1, "perturbation radius rho (antibody, booster)"),
    Opt("lambda_ref", _float, None, "weight of the refusal gradient (antibody; default 0.05; booster: 0)"),
    Opt("momentum", _float, 0.99, "EMA momentum of lambda (antibody, booster)"),
    Opt("vaccine_rho", _float, 5.0, "Vaccine's perturbation radius rho_V on the attention outputs"),
]
FINETUNE = [
    Opt("task", str, None, "user task format (required)", choices=("sst2", "agnews", "gsm8k", "alpaca")),
    Opt("task_data", str, None, "user task JSON/JSONL (required)"),
    Opt("harmful_data", str, None, "harmful JSON/JSONL mixed into the user data (required when ratio > 0)"),
    Opt("harmful_ratio", _float, 0.1, "fraction p of harmful samples in the user set, in [0, 1]"),
    Opt("num_samples", int, 1000, "number n of user samples"),
    Opt(
        "method",
        str,
        "antibody",
        "antibody (weighted_step), sft (plain SFT) or lisa (lisa_step, alternating with --align-data)",
        choices=FINETUNE_METHODS,
    ),
    Opt(
        "adapter_mode",
        str,
        None,
        "with --adapter: continue = keep training the (last) adapter, the authors' single LoRA; merge = merge "
        "it and train a fresh LoRA. Default: merge when the adapter was made by align --method vaccine (its "
        "metadata says so), else continue",
        choices=ADAPTER_MODES,
    ),
    Opt("tau", _float, 1.0, "softmax temperature of the sample weights (antibody)"),
    Opt(
        "refusal_scoring",
        str,
        "prefix_cache",
        "how refusals are scored (antibody)",
        choices=("prefix_cache", "full"),
    ),
    Opt(
        "align_data",
        str,
        None,
        "alignment data (prompt + refusal) of Lisa's alignment state (lisa: required)",
    ),
    Opt("num_align", int, None, "use only the first N alignment records (lisa)"),
    Opt("lisa_align_steps", int, 100, "Lisa's K_a: steps of each alignment state"),
    Opt("lisa_finetune_steps", int, 900, "Lisa's K_f: steps of each fine-tuning state"),
    Opt("lisa_rho", _float, 0.01, "Lisa's proximal weight rho_L"),
    Opt(
        "lisa_warmup_fraction",
        _float,
        0.1,
        "Lisa: no proximal term while step <= fraction x total steps (the authors' warm-up)",
    ),
]
EVALUATE = [
    Opt("task", str, None, "task format of --task-data", choices=("sst2", "agnews", "gsm8k", "alpaca")),
    Opt("task_data", str, None, "task test JSON/JSONL (FA)"),
    Opt("harmful_prompts", str, None, "BeaverTails-style JSON/JSONL of harmful prompts (HS)"),
    Opt(
        "judge_model",
        str,
        None,
        "local HF moderation model used as HS judge (default: refusal-pattern proxy)",
    ),
    Opt(
        "judge_kind",
        str,
        "classifier",
        "kind of --judge-model: a sequence classifier, or a causal LM that answers safe/unsafe (Llama-Guard style)",
        choices=("classifier", "causal-lm"),
    ),
    Opt("max_new_tokens", int, 128, "greedy generation length"),
    Opt("num_eval", int, None, "use only the first N records of each evaluation file"),
]
SPECS = {
    "align": COMMON + TRAIN + ALIGN,
    "finetune": COMMON + TRAIN + FINETUNE,
    "evaluate": COMMON + EVALUATE,
}
REQUIRED = {
    "align": ("model", "output", "align_data"),
    "finetune": ("model", "output", "task", "task_data"),
    "evaluate": ("model", "output"),
}
# options only some methods read: given explicitly (flag or --config) to another method, they are an error
METHOD_OPTIONS = {
    "align": {
        "harmful_data": ("antibody", "booster"),
        "num_harmful": ("antibody", "booster"),
        "rule": ("antibody", "booster", "sft"),
        "eta": ("antibody", "booster"),
        "rho": ("antibody", "booster"),
        "momentum": ("antibody", "booster"),
        "lambda_ref": ("antibody", "booster"),
        "vaccine_rho": ("vaccine",),
    },
    "finetune": {
        "tau": ("antibody",),
        "refusal_scoring": ("antibody",),
        "align_data": ("lisa",),
        "num_align": ("lisa",),
        "lisa_align_steps": ("lisa",),
        "lisa_finetune_steps": ("lisa",),
        "lisa_rho": ("lisa",),
        "lisa_warmup_fraction": ("lisa",),
    },
}
DESCRIPTIONS = {
    "align": "Alignment stage with LoRA: Antibody (align_step), Booster, Vaccine or safety SFT (--method).",
    "finetune": "Fine-tuning stage on a poisoned user set: Antibody (weighted_step, with a per-sample "
    "suppression report), plain SFT or Lisa (--method); continues the alignment adapter by default.",
    "evaluate": "Fine-tune accuracy (FA) on a task test set and harmful score (HS) on harmful prompts.",
}
DEFAULT_SOURCE = "default"
CLI_SOURCE = "command line"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits 2; keep that but as our error
        raise CLIError(message)


def _parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"antibody-fast {command}",
        description=DESCRIPTIONS[command],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    for o in SPECS[command]:
        flag = "--" + o.name.replace("_", "-")
        default_txt = _default_help(command, o)
        if o.flag:
            p.add_argument(flag, dest=o.name, action="store_true", help=o.help)
        elif o.list_:
            p.add_argument(flag, dest=o.name, action="append", type=str, help=o.help + default_txt)
        else:
            p.add_argument(flag, dest=o.name, type=o.type, choices=o.choices, help=o.help + default_txt)
    return p


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _default_help(command: str, o: Opt) -> str:
    """`` (default: X; --recipe paper: Y)``: where each default comes from, recipe by recipe."""
    shown = (
        o.default is not None and o.default is not False and o.default != []
    )  # (0 == False: test identity)
    parts = [f"default: {_show(o.default)}"] if shown else []
    for name in RECIPES:
        values = recipe_values(name, command)
        if name != "default" and o.name in values and values[o.name] != o.default:
            parts.append(f"--recipe {name}: {_show(values[o.name])}")
    return f" ({'; '.join(parts)})" if parts else ""


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise CLIError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a JSON config"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise CLIError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: the config must be a mapping of option names to values")
    return data


def _coerce(o: Opt, value: Any, where: str) -> Any:
    if o.list_:
        items = value if isinstance(value, list) else [value]
        out = []
        for v in items:
            if not isinstance(v, str):
                raise CLIError(f"{where}: option {o.name!r} must be a string or a list of strings, got {v!r}")
            if o.name == "lora_targets":
                out.extend(t.strip() for t in v.split(",") if t.strip())
            else:
                out.append(v)
        return out
    if o.flag:
        if not isinstance(value, bool):
            raise CLIError(f"{where}: option {o.name!r} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    try:
        if o.type is int and (
            isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
        ):
            raise ValueError
        v = o.type(value)
    except (TypeError, ValueError):
        raise CLIError(
            f"{where}: option {o.name!r} must be {getattr(o.type, '__name__', 'a number')}, got {value!r}"
        ) from None
    if o.choices is not None and v not in o.choices:
        raise CLIError(f"{where}: option {o.name!r} must be one of {list(o.choices)}, got {v!r}")
    return v


def parse_options(command: str, argv: Sequence[str]) -> dict[str, Any]:
    """Resolve the options of ``command`` (see :func:`resolve_options`); raises :class:`CLIError`."""
    return resolve_options(command, argv)[0]


def resolve_options(
    command: str, argv: Sequence[str], *, allow_missing: bool = False
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Resolve the options of ``command``: built-in defaults < ``--recipe`` (align / finetune) < ``--config``
    file < command-line flags. The parser's defaults are ``SUPPRESS``, so an option counts as given only when
    it is on the command line or in the file. Validates types, choices, ranges, required options and the
    options each ``--method`` reads.

    Returns ``(options, sources, missing)``: ``sources[name]`` says where each value came from (``"default"``,
    ``"recipe paper"``, ``"config FILE"``, ``"command line"``); ``missing`` lists the unmet requirements, which
    raise :class:`CLIError` unless ``allow_missing`` (``--dry-run``)."""
    ns = vars(_parser(command).parse_args(list(argv)))
    spec = {o.name: o for o in SPECS[command]}
    opts = {name: (list(o.default) if o.list_ else o.default) for name, o in spec.items()}
    sources = dict.fromkeys(spec, DEFAULT_SOURCE)
    cfg_path = ns.pop("config", None)
    from_file: dict[str, Any] = {}
    if cfg_path is not None:
        for key, value in _read_config(cfg_path).items():
            name = str(key).replace("-", "_")
            if name not in spec:
                raise CLIError(
                    f"{cfg_path}: unknown option {key!r} for {command} (known: {', '.join(sorted(spec))})"
                )
            from_file[name] = _coerce(spec[name], value, cfg_path)
    from_cli = {name: _coerce(spec[name], value, CLI_SOURCE) for name, value in ns.items()}
    layers = []
    if "recipe" in spec:
        recipe = from_cli.get("recipe", from_file.get("recipe", opts["recipe"]))
        layers.append((f"recipe {recipe}", recipe_values(recipe, command)))
    layers += [(f"config {cfg_path}", from_file), (CLI_SOURCE, from_cli)]
    for label, layer in layers:
        if "epochs" in spec and layer.get("epochs") is not None and "steps" in layer:
            raise CLIError(f"{label}: give --steps or --epochs, not both")
        for name, value in layer.items():
            opts[name], sources[name] = value, label
        if "epochs" in spec:  # the later layer decides the run's length
            if "steps" in layer:
                opts["epochs"], sources["epochs"] = None, label
            elif layer.get("epochs") is not None:
                opts["steps"], sources["steps"] = None, label + " (from --epochs)"
    _check_ranges(command, opts)
    if command in METHOD_OPTIONS:
        _resolve_method(command, opts, sources)
    missing = _missing(command, opts)
    if missing and not allow_missing:
        raise CLIError(missing[0])
    return opts, sources, missing


def _given(sources: dict, name: str) -> bool:
    """Whether ``name`` was given by the user (a flag or the config file), not a default or a recipe."""
    return sources[name] == CLI_SOURCE or sources[name].startswith("config ")


def _resolve_method(command: str, opts: dict, sources: dict) -> None:
    """Reject options the chosen ``--method`` does not read (when given explicitly) and fill in the values the
    method implies (align: the λ rule and λ_ref)."""
    method = opts["method"]
    for name, methods in METHOD_OPTIONS[command].items():
        if method not in methods and _given(sources, name) and opts[name] not in (None, []):
            users = " / ".join(methods)
            raise CLIError(f"--{name.replace('_', '-')} is an option of --method {users}, not of {method}")
    if command != "align":
        return
    implied = {"antibody": (None, 0.05), "booster": ("constant", 0.0), "sft": ("none", None)}.get(method)
    if implied is None:  # vaccine
        return
    rule, lambda_ref = implied
    if rule is not None and _given(sources, "rule") and opts["rule"] != rule:
        raise CLIError(f"--method {method} uses --rule {rule}, got --rule {opts['rule']}")
    if method == "booster" and _given(sources, "lambda_ref") and opts["lambda_ref"] != 0:
        raise CLIError(
            f"--method booster has no refusal term (lambda_ref 0), got --lambda-ref {opts['lambda_ref']}"
        )
    if rule is not None:
        opts["rule"] = rule
    elif opts["rule"] is None:
        opts["rule"] = "cosine"
    if method == "booster" or opts["lambda_ref"] is None:
        opts["lambda_ref"] = lambda_ref if lambda_ref is not None else 0.0
        sources["lambda_ref"] = f"--method {method}"


def _missing(command: str, o: dict) -> list[str]:
    """Unmet requirements (required options, data a method needs), as error messages."""
    out = []
    missing = [n for n in REQUIRED[command] if o.get(n) in (None, "")]
    if missing:
        out.append("missing required option(s): " + ", ".join("--" + n.replace("_", "-") for n in missing))
    if command == "align" and o["method"] in ("antibody", "booster") and not o.get("harmful_data"):
        out.append(f"--method {o['method']} needs --harmful-data")
    if command == "finetune":
        if o["harmful_ratio"] > 0 and not o.get("harmful_data"):
            out.append("--harmful-ratio > 0 needs --harmful-data")
        if o["method"] == "lisa" and not o.get("align_data"):
            out.append("--method lisa needs --align-data (Lisa's alignment state)")
    return out


def _check_ranges(command: str, o: dict) -> None:
    def positive(name):
        v = o.get(name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {v}")

    for name in (
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
    ):
        positive(name)
    if o.get("max_length") is not None and o["max_length"] < 2:
        raise CLIError(f"--max-length must be >= 2, got {o['max_length']}")
    for name in ("save_every", "warmup_steps"):
        if o.get(name) is not None and o[name] < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {o[name]}")
    if command in ("align", "finetune"):
        for name in ("lr", "weight_decay", "max_grad_norm"):
            v = o[name]
            if not math.isfinite(v) or v < 0:
                raise CLIError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if o["lr"] * o["weight_decay"] >= 1:
            raise CLIError(
                f"--lr x --weight-decay must be < 1 (AdamW multiplies the weights by 1 - lr * weight_decay each "
                f"step), got {o['lr']} x {o['weight_decay']}"
            )
        a = o.get("lora_alpha")
        if a is not None and not (math.isfinite(a) and a > 0):
            raise CLIError(f"--lora-alpha must be a finite number > 0, got {a}")
    if command == "finetune":
        p = o["harmful_ratio"]
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise CLIError(f"--harmful-ratio must be in [0, 1], got {p}")
        if not (math.isfinite(o["tau"]) and o["tau"] > 0):
            raise CLIError(f"--tau must be > 0, got {o['tau']}")
        for name in ("lisa_align_steps", "lisa_finetune_steps"):
            if o[name] < 0:
                raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {o[name]}")
        if o["lisa_align_steps"] + o["lisa_finetune_steps"] == 0:
            raise CLIError("--lisa-align-steps + --lisa-finetune-steps must be > 0")
        if not (math.isfinite(o["lisa_rho"]) and o["lisa_rho"] >= 0):
            raise CLIError(f"--lisa-rho must be a finite number >= 0, got {o['lisa_rho']}")
        w = o["lisa_warmup_fraction"]
        if not (math.isfinite(w) and 0.0 <= w <= 1.0):
            raise CLIError(f"--lisa-warmup-fraction must be in [0, 1], got {w}")
    if command == "align":
        for name in ("eta", "rho", "momentum", "vaccine_rho", "lambda_ref"):
            v = o[name]
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise CLIError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if not o["momentum"] < 1:
            raise CLIError(f"--momentum must be in [0, 1), got {o['momentum']}")
    if command == "evaluate":
        if not o.get("task_data") and not o.get("harmful_prompts"):
            raise CLIError("nothing to evaluate: give --task-data (with --task) and/or --harmful-prompts")
        if o.get("task_data") and not o.get("task"):
            raise CLIError("--task-data needs --task (sst2, agnews, gsm8k or alpaca)")


# ----------------------------------------------------------------------------------------------- models
def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        try:  # e.g. mps / xpu: usable only when this torch build supports it
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise CLIError(
                f"--device {name!r}: not usable with this torch build ({' '.join(str(e).split())})"
            ) from None
    return dev


class _World:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        self.rank, self.size, self.owned = 0, 1, False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False
        self.rank, self.size = 0, 1


_WORLD = _World()


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def _init_distributed(device):
    """Join the ``torchrun`` process group when launched with several processes; returns the device to use
    (``cuda:LOCAL_RANK`` on CUDA). Single process: ``device`` unchanged."""
    import torch
    import torch.distributed as dist

    world = _launched_world_size()
    if world <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CLIError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _WORLD.owned = True
    _WORLD.rank, _WORLD.size = dist.get_rank(), dist.get_world_size()
    return device


def _sync_trainable(model) -> None:
    """Every rank starts from rank 0's trainable parameters (they are equal already when every rank used the
    same seed; this makes it certain): one broadcast per flat parameter buffer (the steps' own buffers)."""
    if _WORLD.size > 1:
        import torch
        import torch.distributed as dist

        from .steps import flat_parameters

        with torch.no_grad():
            for buf in flat_parameters(model).param_buffers:
                dist.broadcast(buf, src=0)


def _check_model_source(model: str) -> None:
    """Fail early (before anything is written) on a model that cannot be found."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CLIError(f"--model {model!r}: the directory has no config.json (not a saved HF model)")
        return
    local_like = (
        model.startswith((".", "/", "~"))
        or os.path.exists(os.path.dirname(model) or "\0")
        or model.count("/") > 1
    )
    if local_like:
        raise CLIError(f"--model {model!r}: no such model directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return
    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return
    if offline:
        raise CLIError(
            f"--model {model!r}: not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            "forbids downloading it"
        )


def _load_model(opts: dict, device, *, train: bool, adapter_mode: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = opts["model"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts["dtype"]]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    except (OSError, ValueError) as e:
        raise CLIError(f"--model {model_id!r}: cannot load the model or its tokenizer: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise CLIError(f"--model {model_id!r}: the tokenizer has no EOS token")
    from .models import add_lora, load_adapter, merge_adapter

    adapters = list(opts["adapter"])
    continued = adapters.pop() if train and adapter_mode == "continue" and adapters else None
    for path in adapters:  # merged into the weights, in order
        try:
            model = merge_adapter(model, path)
        except Exception as e:
            raise CLIError(f"--adapter {path!r}: cannot load it onto {model_id!r}: {e}") from None
    model.to(device)
    if not train:
        model.eval()
        return model, tokenizer
    if continued is not None:  # the authors' single LoRA: keep training the alignment adapter
        try:
            model = load_adapter(model, continued, trainable=True)
        except Exception as e:
            raise CLIError(f"--adapter {continued!r}: cannot load it onto {model_id!r}: {e}") from None
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(
            model,
            r=opts["lora_r"],
            targets=tuple(opts["lora_targets"]),
            seed=opts["seed"],
            alpha=opts["lora_alpha"],
        )
    model.to(device)
    model.train()
    return model, tokenizer


def _check_adapters(opts: dict) -> None:
    for path in opts["adapter"]:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise CLIError(f"--adapter {path!r}: not a PEFT adapter directory (no adapter_config.json)")


def _adapter_mode(opts: dict, sources: dict) -> tuple[str | None, str]:
    """``(mode, why)`` for ``finetune``: ``None`` without ``--adapter`` (a fresh LoRA); an explicit
    ``--adapter-mode``; else ``merge`` when the last adapter's metadata says ``align --method vaccine`` made it
    (the authors' pipeline), ``continue`` otherwise (Antibody, Booster, SFT, and adapters without metadata)."""
    from .models import read_adapter_metadata

    if not opts["adapter"]:
        if opts["adapter_mode"] is not None and _given(sources, "adapter_mode"):
            raise CLIError("--adapter-mode needs --adapter (without one, fine-tuning trains a fresh LoRA)")
        return None, "no --adapter: a fresh LoRA"
    if opts["adapter_mode"] is not None:
        mode, why = opts["adapter_mode"], f"--adapter-mode {opts['adapter_mode']} ({sources['adapter_mode']})"
    else:
        path = opts["adapter"][-1]
        try:
            meta = read_adapter_metadata(path) if os.path.isdir(path) else {}
        except ValueError as e:
            raise CLIError(f"--adapter {path!r}: {e}") from None
        made_by = meta.get("method") if meta.get("command", "align") == "align" else None
        mode = "merge" if made_by == "vaccine" else "continue"
        why = (
            f"the adapter was made by align --method {made_by}"
            if made_by
            else "the adapter records no alignment method"
        ) + f": {mode} (the authors' pipeline)"
    if mode == "continue":
        _check_continued_lora(opts, sources, opts["adapter"][-1])
    return mode, why


def _check_continued_lora(opts: dict, sources: dict, path: str) -> None:
    """``continue`` trains the adapter with its own rank, alpha and targets: an explicit ``--lora-r``,
    ``--lora-alpha`` or ``--lora-targets`` that contradicts its ``adapter_config.json`` is an error."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError):
        return  # reported when the adapter is checked / loaded
    r = saved.get("r")
    have = {
        "lora_r": r,
        "lora_alpha": saved.get("lora_alpha"),
        "lora_targets": sorted(saved.get("target_modules") or []),
    }
    want = {
        "lora_r": opts["lora_r"],
        "lora_alpha": opts["lora_alpha"] if opts["lora_alpha"] is not None else 2 * opts["lora_r"],
        "lora_targets": sorted(opts["lora_targets"]),
    }
    for name in ("lora_r", "lora_alpha", "lora_targets"):
        if _given(sources, name) and have[name] is not None and want[name] != have[name]:
            raise CLIError(
                f"--{name.replace('_', '-')} {_show(want[name])} differs from the adapter's {_show(have[name])} "
                f"({path}): --adapter-mode continue trains that adapter as it is; drop the option or pass "
                "--adapter-mode merge"
            )


# ----------------------------------------------------------------------------------------------- outputs
def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_adapter(model, out_dir: str, metadata: dict | None = None) -> str:
    """PEFT ``save_pretrained`` into a temporary directory, plus ``metadata`` (which command and method made
    the adapter: :func:`antibody_fast.models.write_adapter_metadata`), then renamed to ``out_dir/adapter``.
    An adapter with non-finite values is never written (the last good one is kept)."""
    import torch

    from .checkpoint import NonFiniteCheckpointError
    from .models import write_adapter_metadata

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteCheckpointError(
            f"refusing to write the adapter: non-finite values (NaN/inf) in {', '.join(bad[:3])}"
            f"{'...' if len(bad) > 3 else ''}; the last good checkpoint is kept"
        )
    final = os.path.join(out_dir, "adapter")
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter.", dir=out_dir)
    try:
        model.save_pretrained(tmp)
        if metadata:
            write_adapter_metadata(tmp, **metadata)
        if os.path.exists(final):
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class _Metrics:
    """Append-only JSONL of logged steps; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            keep = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        break
            _atomic_write_text(path, "".join(keep))
        elif resume_step is None and os.path.exists(path):
            os.unlink(path)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` separating positives from negatives: P(pos > neg) + P(tie)/2
    (Mann-Whitney U / (n_pos n_neg), average ranks for ties). NaN if a class is empty."""
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    allv = sorted([(s, 1) for s in scores_pos] + [(s, 0) for s in scores_neg], key=lambda t: t[0])
    rank_sum = 0.0
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        rank_sum += avg * sum(1 for k in range(i, j + 1) if allv[k][1] == 1)
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _suppression_outputs(out_dir: str, examples: list[dict], sum_w, count, batch_size: int) -> dict | None:
    """CSV of each sample's mean weight (and ``relative_weight`` = mean weight x batch size, 1.0 = the uniform
    weight of plain SFT); AUROC + PNG histogram when harmful flags exist."""
    sums = sum_w.detach().cpu().tolist()
    counts = count.detach().cpu().tolist()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "is_harmful", "task", "times_seen", "mean_weight", "relative_weight"])
    benign, harmful = [], []
    for ex, s, c in zip(examples, sums, counts):
        mean = s / c if c > 0 else float("nan")
        flag = ex.get("is_harmful")
        w.writerow(
            [
                ex["index"],
                "" if flag is None else int(bool(flag)),
                ex.get("task", ""),
                int(c),
                "" if c == 0 else f"{mean:.8g}",
                "" if c == 0 else f"{mean * batch_size:.6g}",
            ]
        )
        if c > 0 and flag is not None:
            (harmful if flag else benign).append(mean)
    _atomic_write_text(os.path.join(out_dir, "suppression_report.csv"), buf.getvalue())
    if not harmful and not benign:
        return None
    summary = {
        "num_seen": int(sum(1 for c in counts if c > 0)),
        "num_harmful_seen": len(harmful),
        "num_benign_seen": len(benign),
        "mean_weight_harmful": sum(harmful) / len(harmful) if harmful else None,
        "mean_weight_benign": sum(benign) / len(benign) if benign else None,
        "auroc_benign_vs_harmful": None,
        "auroc_definition": "P(mean weight of a benign sample > that of a harmful sample); 1.0 = perfect suppression",
    }
    if harmful and benign:
        summary["auroc_benign_vs_harmful"] = auroc(benign, harmful)
        summary["histogram"] = _histogram(os.path.join(out_dir, "suppression_hist.png"), benign, harmful)
    _atomic_write_text(
        os.path.join(out_dir, "suppression_summary.json"), json.dumps(summary, indent=2) + "\n"
    )
    return summary


def _histogram(path: str, benign: list[float], harmful: list[float]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = min(benign + harmful), max(benign + harmful)
    bins = 30 if hi > lo else 1
    ax.hist(
        benign, bins=bins, range=(lo, hi) if hi > lo else None, alpha=0.6, label=f"benign (n={len(benign)})"
    )
    ax.hist(
        harmful,
        bins=bins,
        range=(lo, hi) if hi > lo else None,
        alpha=0.6,
        label=f"harmful (n={len(harmful)})",
    )
    ax.set_xlabel("mean sample weight over training")
    ax.set_ylabel("samples")
    ax.set_title("Antibody per-sample suppression")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return os.path.basename(path)


# ----------------------------------------------------------------------------------------------- training
def _order(n: int, seed: int, position: int, count: int) -> list[int]:
    """Positions ``position .. position+count-1`` of the infinite sequence of seeded epoch shuffles of
    ``range(n)`` (epoch e is ``random.Random(seed * 1_000_003 + e)``-shuffled)."""
    out = []
    epoch, offset = divmod(position, n)
    while len(out) < count:
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = perm[offset : offset + count - len(out)]
        out.extend(take)
        epoch, offset = epoch + 1, 0
    return out


def _amp(opts: dict, device):
    import torch

    amp = opts["amp"]
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and opts["dtype"] == "float32" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _optimizer(model, opts: dict, total_steps: int):
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    sched = get_scheduler(
        opts["lr_scheduler"], opt, num_warmup_steps=opts["warmup_steps"], num_training_steps=total_steps
    )
    return opt, sched


def _progress(opts: dict, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=opts["no_progress"],
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _prepare_output(opts: dict, command: str) -> tuple[str, str | None]:
    """Check the output directory (nothing is written here). Returns (dir, checkpoint path if resuming)."""
    out = opts["output"]
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--output {out!r} exists and is not a directory")
    if opts.get("resume"):
        if not os.path.isfile(ckpt):
            raise CLIError(f"--resume: no checkpoint at {ckpt!r}")
        return out, ckpt
    if os.path.isfile(ckpt):
        raise CLIError(
            f"--output {out!r} already holds a checkpoint: pass --resume, or choose another --output"
        )
    return out, None


def _template(prompt: str, opts: dict) -> str:
    from .data.loaders import alpaca_prompt

    return prompt if opts["no_template"] else alpaca_prompt(prompt)


class _Stats:
    """A step's statistics as a dict of device tensors (the baselines' :class:`BaselineStats`: ``loss``,
    ``grad_norm`` and its ``extra``), with :meth:`as_dict` like :class:`~antibody_fast.steps.StepStats`."""

    def __init__(self, stats, **more):
        self.tensors = {"loss": stats.loss, "grad_norm": stats.grad_norm, **stats.extra, **more}

    def as_dict(self) -> dict:
        out = {}
        for k, v in self.tensors.items():
            if hasattr(v, "detach"):
                v = v.detach().cpu()
                v = v.item() if v.dim() == 0 else v.tolist()
            out[k] = v
        return out


def _train_loop(
    opts, command, model, scheduler, out_dir, resumed, start, make_batch, do_step, log_fields, save, run_info
) -> bool:
    """The loop `align` and `finetune` share: progress bar, metrics JSONL (host copies on logged steps only),
    checkpoints every ``--save-every`` steps, ``--stop-after``, and the final adapter + checkpoint.

    ``make_batch(step) -> (batch on the device, real tokens)``, ``do_step(batch) -> StepStats`` (or anything
    with ``as_dict()``), ``log_fields(stats_dict) -> (metrics fields, progress-bar fields)``, ``save(step)``
    writes the checkpoint. ``run_info`` (a dict: ``option_sources``, the resolved adapter mode, dropped samples,
    ...) goes into ``run_config.json`` after the options. Returns False when stopped early by ``--stop-after``
    (a checkpoint to resume from is left), else True.
    """
    main = _WORLD.main
    if main:
        os.makedirs(out_dir, exist_ok=True)
        _lock_output(out_dir)
        from .checkpoint import cleanup_temporaries

        cleanup_temporaries(os.path.join(out_dir, "checkpoint.pt"))
        config = {"command": command, **opts, "world_size": _WORLD.size, **run_info}
        _atomic_write_text(os.path.join(out_dir, "run_config.json"), json.dumps(config, indent=2))
    metrics = _Metrics(os.path.join(out_dir, "metrics.jsonl"), start if resumed else None) if main else None
    total = opts["steps"]
    end = total if opts["stop_after"] is None else min(total, start + opts["stop_after"])
    label = f"{command} ({opts['method']})"
    bar = _progress({**opts, "no_progress": opts["no_progress"] or not main}, total, start, label)
    try:
        for step in range(start, end):
            batch, ntok = make_batch(step)
            t0 = time.perf_counter()
            stats = do_step(batch)
            if main and ((step + 1) % opts["log_every"] == 0 or step + 1 == end):
                s = stats.as_dict()  # host copy (synchronises) only on logged steps
                dt = time.perf_counter() - t0
                row = {
                    "step": step + 1,
                    "lr": scheduler.get_last_lr()[0],
                    "step_time_s": dt,
                    "tokens_per_s": ntok / dt if dt > 0 else None,
                }
                post = {"step_s": f"{dt:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                more_row, more_post = log_fields(s)
                row.update(more_row)
                post.update(more_post)
                metrics.write(row)
                bar.set_postfix(post)
            bar.update(1)
            done = step + 1
            if opts["save_every"] and done % opts["save_every"] == 0 and done < total:
                save(done)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    save(end)
    if end < total:  # interrupted on purpose (--stop-after): the checkpoint above resumes it
        if main:
            _say(f"{command}: stopped after step {end}/{total}; resume with --resume")
        return False
    if main:
        meta = {
            "command": command,
            "method": opts["method"],
            "recipe": opts["recipe"],
            "base_model": opts["model"],
        }
        if "adapter_mode" in run_info:
            meta["adapter_mode"] = run_info["adapter_mode"]
        _save_adapter(model, out_dir, meta)
    _WORLD.barrier()
    return True


_LOCKS: list = []  # open lock files of this process (released in main())


def _lock_output(out_dir: str) -> None:
    """Hold ``OUTPUT/.lock`` (an exclusive ``flock``, released when the process ends, even on SIGKILL): a second
    run into the same ``--output`` stops with exit 2 instead of overwriting the first one's files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return
    f = open(os.path.join(out_dir, ".lock"), "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CLIError(
            f"--output {out_dir!r} is in use by another antibody-fast run (lock {os.path.join(out_dir, '.lock')!r}); "
            "wait for it to finish or choose another --output"
        ) from None
    _LOCKS.append(f)


# options that do not change what a run computes (everything else is part of the resume fingerprint)
_NOT_FINGERPRINTED = frozenset(
    (
        "output",
        "resume",
        "force",
        "save_every",
        "stop_after",
        "no_progress",
        "log_every",
        "device",
        "impl",
        "config",
        "recipe",  # the resolved values are fingerprinted, not where they came from
        "dry_run",
        # per-process batch: the global batch (batch size x processes) is what defines the data order; it is
        # checked on resume by _checked_extra, so a run may resume with another number of processes
        "batch_size",
    )
    + ("batch_size", "steps")  # checked on their own: global batch (processes x batch) and steps >= completed
)


def _fingerprint(opts: dict, command: str) -> dict:
    """The options that define a run (data, method, seed, model, LoRA shape, hyper-parameters), as plain values."""
    fp = {"command": command}
    for k, v in sorted(opts.items()):
        if k not in _NOT_FINGERPRINTED:
            fp[k] = list(v) if isinstance(v, (list, tuple)) else v
    return fp


def _resume_checked(ckpt: str, opts: dict, command: str, out_dir: str) -> dict:
    """Load-time fingerprint arguments for ``load_checkpoint``; with ``--force`` a mismatch is recorded."""
    fp = _fingerprint(opts, command)
    if opts.get("force"):
        from .checkpoint import fingerprint_diff, read_checkpoint

        diff = fingerprint_diff(read_checkpoint(ckpt).get("fingerprint"), fp)
        if diff and _WORLD.main:
            _say(f"{command}: --force: resuming despite changed options: {'; '.join(diff)}")
            with open(os.path.join(out_dir, "resume_overrides.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "differing": diff}) + "\n")
    return {"fingerprint": fp, "force": bool(opts.get("force"))}


def _templated(records: list[dict], opts: dict) -> list[dict]:
    """Prompt/response records with the prompt template applied and ``index`` = position in the file."""
    return [
        {"prompt": _template(e["prompt"], opts), "response": e["response"], "index": i}
        for i, e in enumerate(records)
    ]


def _training_device(opts: dict):
    """Checks that need no model (source, adapters), the process group under torchrun, the device, the seed."""
    import torch

    _check_model_source(opts["model"])
    _check_adapters(opts)
    device = _init_distributed(_resolve_device(opts["device"]))
    torch.manual_seed(opts["seed"])
    return device


def _refusal_pool(opts: dict) -> list[str] | None:
    """``--refusals FILE`` read with :func:`~antibody_fast.data.load_refusals` (``None``: the shipped pool)."""
    if not opts["refusals"]:
        return None
    from .data.loaders import load_refusals

    return load_refusals(opts["refusals"])


def _collator_args(opts: dict, tokenizer, refusals) -> dict:
    return {
        "tokenizer": tokenizer,
        "refusals": refusals,
        "max_length": opts["max_length"],
        "truncation": opts["truncation"],
    }


def _resolve_steps(opts: dict, n: int, global_batch: int) -> int:
    """``--steps``, or ``--epochs`` x ceil(n / global batch) (the authors' HF Trainer: ceil(n / batch) steps per
    epoch); written back into ``opts["steps"]``."""
    if opts["epochs"] is not None:
        opts["steps"] = opts["epochs"] * math.ceil(n / global_batch)
    return opts["steps"]


def _kept(split, what: str, total: int) -> list:
    kept, dropped = split
    if not kept:
        raise CLIError(f"{what}: every one of the {total} samples is overlong (--drop-overlong left none)")
    return kept


def _amp_for(opts: dict, device, method: str):
    """The autocast dtype; Vaccine's and Lisa's steps have no autocast option: ``auto`` gives none for them
    and an explicit ``--amp bf16|fp16`` is an error."""
    if method in ("vaccine", "lisa"):
        if opts["amp"] in ("bf16", "fp16"):
            raise CLIError(
                f"--amp {opts['amp']}: --method {method} runs without autocast (use --dtype instead)"
            )
        return None
    return _amp(opts, device)


def _run_align(opts: dict, sources: dict) -> int:
    from .data.loaders import load_alignment, load_harmful

    method = opts["method"]
    two_sets = method in ("antibody", "booster")  # align_step: A, H and R; sft / vaccine: A only
    out_dir, ckpt = _prepare_output(opts, "align")
    align = _templated(load_alignment(opts["align_data"], limit=opts["num_align"]), opts)
    harmful = (
        _templated(load_harmful(opts["harmful_data"], limit=opts["num_harmful"]), opts) if two_sets else None
    )
    refusals = _refusal_pool(opts)
    device = _training_device(opts)
    amp_dtype = _amp_for(opts, device, method)

    from .baselines import vaccine_step
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import AlignCollator
    from .steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step

    config = None
    if two_sets:
        config = AlignConfig(
            rule=opts["rule"],
            eta=opts["eta"],
            rho=opts["rho"],
            lambda_ref=opts["lambda_ref"],
            momentum=opts["momentum"],
            max_grad_norm=opts["max_grad_norm"] or None,
            amp_dtype=amp_dtype,
            impl=opts["impl"],
        )
        config.check()
    sft_config = FinetuneConfig(
        max_grad_norm=opts["max_grad_norm"] or None, amp_dtype=amp_dtype, impl=opts["impl"]
    )
    model, tokenizer = _load_model(opts, device, train=True)
    collator = AlignCollator(**_collator_args(opts, tokenizer, refusals))
    what = opts["align_data"] + (" / " + opts["harmful_data"] if two_sets else "")
    dropped = {}
    if opts["drop_overlong"]:
        try:
            split_a, split_h = collator.split_overlong(align, harmful)
        except (ValueError, TypeError) as e:
            raise CLIError(f"{what}: {e}") from None
        n_a, n_h = len(align), len(harmful or ())
        align = _kept(split_a, opts["align_data"], n_a)
        dropped["align"] = n_a - len(align)
        if two_sets:
            harmful = _kept(split_h, opts["harmful_data"], n_h)
            dropped["harmful"] = n_h - len(harmful)
    chunk = 64
    if two_sets:
        _precheck(
            collator,
            [(align[i : i + chunk], harmful[: min(chunk, len(harmful))]) for i in range(0, len(align), chunk)]
            + [(align[:1], harmful[i : i + chunk]) for i in range(0, len(harmful), chunk)],
            what,
        )
    else:
        _precheck(collator.align_batch, [(align[i : i + chunk],) for i in range(0, len(align), chunk)], what)
    bs, seed = opts["batch_size"], opts["seed"]
    rank, world = _WORLD.rank, _WORLD.size
    total = _resolve_steps(opts, len(align), bs * world)
    _sync_trainable(model)
    optimizer, scheduler = _optimizer(model, opts, total)
    state = AlignState() if two_sets else None  # λ's EMA (Antibody; Booster keeps it constant)
    start = 0
    if ckpt is not None:
        extra = load_checkpoint(
            ckpt, model, optimizer, scheduler, state, **_resume_checked(ckpt, opts, "align", out_dir)
        )
        start = _checked_extra(extra, "align", ckpt, bs * world, method, opts["steps"])["step"]

    def make_batch(step):  # this rank's slice of the step's global batch
        pos = (step * world + rank) * bs
        a = [align[i] for i in _order(len(align), seed, pos, bs)]
        if not two_sets:
            batch = collator.align_batch(a)  # CPU tensors
            return batch.to(device), int(batch.attention_mask.sum())
        h_idx = _order(len(harmful), seed + 1, pos, bs)
        batch = collator(a, [harmful[i] for i in h_idx])  # CPU tensors
        ntok = int(sum(b.attention_mask.sum() for b in (batch.align, batch.harmful, batch.refusal)))
        return batch.to(device), ntok

    def do_step(batch):
        if method == "vaccine":
            stats = vaccine_step(
                model,
                batch,
                optimizer,
                rho=opts["vaccine_rho"],
                max_grad_norm=opts["max_grad_norm"] or None,
                scheduler=scheduler,
                impl=opts["impl"],
            )
            return _Stats(stats)
        if method == "sft":
            return sft_step(model, batch, optimizer, sft_config, scheduler)
        return align_step(model, batch, optimizer, state, config, scheduler)

    keys = ("loss", "grad_norm", "lambda_t", "lambda_raw", "cos", "loss_align", "loss_combined")
    keys += ("loss_harmful", "loss_perturbed", "loss_refusal", "clean_loss", "perturbation_grad_norm")

    def log_fields(s):
        post = {"loss": f"{s['loss']:.4g}"}
        if two_sets:
            post["lambda_t"] = f"{s.get('lambda_t', 0.0):.3g}"
        return {k: s[k] for k in keys if k in s}, post

    def save(step):
        if _WORLD.main:
            path = os.path.join(out_dir, "checkpoint.pt")
            extra = {"command": "align", "method": method, "step": step, "global_batch": bs * world}
            save_checkpoint(
                path, model, optimizer, scheduler, state, extra=extra, fingerprint=_fingerprint(opts, "align")
            )
        _WORLD.barrier()

    run_info = {"option_sources": sources, "num_align_used": len(align)}
    if two_sets:
        run_info["num_harmful_used"] = len(harmful)
    if opts["drop_overlong"]:
        run_info["dropped_overlong"] = dropped
        if _WORLD.main:
            _say(
                "align: --drop-overlong left out "
                + ", ".join(f"{v} {k}" for k, v in dropped.items())
                + " samples"
            )
    finished = _train_loop(
        opts,
        "align",
        model,
        scheduler,
        out_dir,
        ckpt is not None,
        start,
        make_batch,
        do_step,
        log_fields,
        save,
        run_info,
    )
    if finished and _WORLD.main:
        _say(f"align ({method}): {total} steps done; adapter in {os.path.join(out_dir, 'adapter')}")
    return 0


def _precheck(collate, batches: list, what: str) -> None:
    """Collate every batch once before anything is written, so that data the collator rejects (e.g. a
    response truncated to zero tokens) is reported up front."""
    for args in batches:
        try:
            collate(*args)
        except (ValueError, TypeError) as e:
            raise CLIError(f"{what}: {e}") from None


def _checked_extra(extra, command: str, path: str, global_batch: int, method: str, steps: int) -> dict:
    if (
        not isinstance(extra, dict)
        or extra.get("command") != command
        or not isinstance(extra.get("step"), int)
    ):
        raise CLIError(f"--resume: {path!r} is not a checkpoint of `antibody-fast {command}`")
    saved_method = extra.get("method", "antibody" if command == "align" else method)
    if saved_method != method:
        raise CLIError(
            f"--resume: {path!r} was written by --method {saved_method}, this run is --method {method}"
        )
    saved = extra.get("global_batch", global_batch)
    if saved != global_batch:
        raise CLIError(
            f"--resume: {path!r} was written with {saved} samples per step (--batch-size x processes), this run "
            f"has {global_batch}: the data order would not continue; keep --batch-size x processes the same"
        )
    if extra["step"] > steps:
        raise CLIError(
            f"--resume: {path!r} has already completed {extra['step']} steps, more than --steps {steps}"
        )
    return extra


def _phase_steps_before(cfg, step: int, phase: str) -> int:
    """How many of Lisa's steps ``0 .. step-1`` are in ``phase`` (``LisaState.phase``'s alternation), so that
    each state's data continues where its previous state stopped."""
    first = cfg.align_steps if cfg.first_phase == "align" else cfg.finetune_steps
    cycles, rem = divmod(step, cfg.align_steps + cfg.finetune_steps)
    n_first = cycles * first + min(rem, first)
    return n_first if phase == cfg.first_phase else step - n_first


def _run_finetune(opts: dict, sources: dict) -> int:
    from .data.loaders import build_poisoned_set, load_alignment, load_harmful, load_task

    method = opts["method"]
    antibody, lisa = method == "antibody", method == "lisa"
    out_dir, ckpt = _prepare_output(opts, "finetune")
    task = load_task(opts["task"], opts["task_data"])
    harmful = load_harmful(opts["harmful_data"]) if opts["harmful_ratio"] > 0 else []
    try:
        examples = build_poisoned_set(
            task, harmful, n=opts["num_samples"], harmful_ratio=opts["harmful_ratio"], seed=opts["seed"]
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    align = _templated(load_alignment(opts["align_data"], limit=opts["num_align"]), opts) if lisa else []
    refusals = _refusal_pool(opts)
    adapter_mode, adapter_why = _adapter_mode(opts, sources)
    device = _training_device(opts)
    amp_dtype = _amp_for(opts, device, method)

    import torch

    from .baselines import LisaConfig, LisaState, lisa_step
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import AlignCollator, FinetuneCollator
    from .distributed import all_reduce_sum
    from .steps import FinetuneConfig, sft_step, weighted_step

    config = FinetuneConfig(
        tau=opts["tau"],
        max_grad_norm=opts["max_grad_norm"] or None,
        refusal_scoring=opts["refusal_scoring"],
        amp_dtype=amp_dtype,
        impl=opts["impl"],
    )
    config.check()
    model, tokenizer = _load_model(opts, device, train=True, adapter_mode=adapter_mode)
    collator = FinetuneCollator(**_collator_args(opts, tokenizer, refusals))
    align_collator = AlignCollator(**_collator_args(opts, tokenizer, refusals)) if lisa else None
    kept, dropped = examples, {}
    if opts["drop_overlong"]:
        try:
            kept = _kept(collator.split_overlong(examples), "user data", len(examples))
            dropped["user"] = len(examples) - len(kept)
            if lisa:
                n_a = len(align)
                align = _kept(align_collator.split_overlong(align)[0], opts["align_data"], n_a)
                dropped["align"] = n_a - len(align)
        except (ValueError, TypeError) as e:
            raise CLIError(f"user data: {e}") from None
    _precheck(collator, [(kept[i : i + 64],) for i in range(0, len(kept), 64)], "user data")
    if lisa:
        _precheck(
            align_collator.align_batch,
            [(align[i : i + 64],) for i in range(0, len(align), 64)],
            opts["align_data"],
        )
    n_all, n = len(examples), len(kept)  # the report covers every sample; training samples the kept ones
    bs, seed = min(opts["batch_size"], n), opts["seed"]
    rank, world = _WORLD.rank, _WORLD.size
    total = _resolve_steps(opts, n, bs * world)
    lisa_config = lisa_state = None
    if lisa:
        lisa_config = LisaConfig(
            align_steps=opts["lisa_align_steps"],
            finetune_steps=opts["lisa_finetune_steps"],
            rho=opts["lisa_rho"],
            max_grad_norm=opts["max_grad_norm"] or None,
            warmup_fraction=opts["lisa_warmup_fraction"],
            total_steps=total,
        )
        lisa_config.validate()
        lisa_state = LisaState()
    _sync_trainable(model)
    optimizer, scheduler = _optimizer(model, opts, total)
    sum_w = torch.zeros(n_all, dtype=torch.float64, device=device)
    count = torch.zeros(n_all, dtype=torch.float64, device=device)
    start = 0
    if ckpt is not None:
        extra = load_checkpoint(
            ckpt, model, optimizer, scheduler, lisa_state, **_resume_checked(ckpt, opts, "finetune", out_dir)
        )
        start = _checked_extra(extra, "finetune", ckpt, bs * world, method, opts["steps"])["step"]
        if extra["sum_w"].shape != (n_all,):
            raise CLIError(
                f"--resume: {ckpt!r} was written for {extra['sum_w'].shape[0]} user samples, not {n_all}"
            )
        if _WORLD.main:  # the saved sums are global: one rank holds them, the others restart from zero
            sum_w.copy_(extra["sum_w"])
            count.copy_(extra["count"])
        if lisa and lisa_state.anchor is not None:  # checkpoints hold CPU copies
            lisa_state.anchor = [a.to(device) for a in lisa_state.anchor]

    def make_batch(step):  # this rank's slice of the step's global batch; CPU tensors
        k = step
        if lisa:
            phase = lisa_state.phase(lisa_config, step)
            k = _phase_steps_before(lisa_config, step, phase)
            if phase == "align":
                idx = _order(len(align), seed + 2, (k * world + rank) * bs, bs)
                batch = align_collator.align_batch([align[i] for i in idx])
                return batch.to(device), int(batch.attention_mask.sum())
        batch = collator([kept[i] for i in _order(n, seed, (k * world + rank) * bs, bs)])
        return batch.to(device), int(batch.attention_mask.sum())

    def do_step(batch):
        if lisa:
            phase = lisa_state.phase(lisa_config)
            lm = batch.answer_view() if hasattr(batch, "answer_view") else batch
            stats = lisa_step(
                model, lm, optimizer, lisa_state, lisa_config, scheduler=scheduler, impl=opts["impl"]
            )
            return _Stats(stats, lisa_phase=phase)
        if not antibody:
            return sft_step(model, batch, optimizer, config, scheduler)
        stats = weighted_step(model, batch, optimizer, config, scheduler)
        sum_w.index_add_(0, batch.index, stats.weights.to(torch.float64))
        count.index_add_(0, batch.index, torch.ones_like(stats.weights, dtype=torch.float64))
        return stats

    def log_fields(s):
        row = {"loss": s["loss"], "grad_norm": s["grad_norm"]}
        post = {"loss": f"{s['loss']:.4g}"}
        if lisa:
            row.update(proximal=s["proximal"], lisa_phase=s["lisa_phase"])
            post["state"] = s["lisa_phase"]
        if antibody:
            w = s["weights"]
            row.update(
                {
                    "weight_mean": sum(w) / len(w),
                    "weight_min": min(w),
                    "weight_max": max(w),
                    "d_mean": sum(s["d"]) / len(s["d"]),
                }
            )
            for k, short in (("harmful_weight", "w_harm"), ("benign_weight", "w_benign")):
                v = s.get(k)
                row[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                post[short] = "-" if row[k] is None else f"{row[k]:.3g}"
        return row, post

    def global_sums():
        return all_reduce_sum(sum_w.clone()), all_reduce_sum(count.clone())

    def save(step):
        total_w, total_c = global_sums()  # every rank joins the reduction; rank 0 writes
        if _WORLD.main:
            extra = {"command": "finetune", "method": method, "step": step, "global_batch": bs * world}
            extra.update(sum_w=total_w.cpu(), count=total_c.cpu())
            save_checkpoint(
                os.path.join(out_dir, "checkpoint.pt"),
                model,
                optimizer,
                scheduler,
                lisa_state,
                extra=extra,
                fingerprint=_fingerprint(opts, "finetune"),
            )
        _WORLD.barrier()

    run_info = {
        "option_sources": sources,
        "adapter_mode": adapter_mode,
        "adapter_mode_reason": adapter_why,
        "num_train_samples": n,
    }
    if lisa:
        run_info["lisa"] = {"total_steps": total, "num_align_used": len(align)}
    if opts["drop_overlong"]:
        run_info["dropped_overlong"] = dropped
        if _WORLD.main:
            _say(
                "finetune: --drop-overlong left out "
                + ", ".join(f"{v} {k}" for k, v in dropped.items())
                + " samples"
            )
    if not _train_loop(
        opts,
        "finetune",
        model,
        scheduler,
        out_dir,
        ckpt is not None,
        start,
        make_batch,
        do_step,
        log_fields,
        save,
        run_info,
    ):
        return 0
    if not antibody:
        summary = None
    else:
        total_w, total_c = global_sums()
        if not _WORLD.main:
            return 0
        summary = _suppression_outputs(out_dir, examples, total_w, total_c, bs * world)
    if not _WORLD.main:
        return 0
    mode = f", adapter {adapter_mode}" if adapter_mode else ""
    msg = f"finetune ({method}{mode}): {total} steps done; adapter in {os.path.join(out_dir, 'adapter')}"
    if summary and summary.get("auroc_benign_vs_harmful") is not None:
        msg += f"; suppression AUROC (benign vs harmful) = {summary['auroc_benign_vs_harmful']:.3f}"
    _say(msg)
    return 0


def _run_evaluate(opts: dict) -> int:
    from .data.loaders import load_harmful, load_task

    out_dir = opts["output"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--output {out_dir!r} exists and is not a directory")
    task_examples = (
        load_task(opts["task"], opts["task_data"], limit=opts["num_eval"]) if opts["task_data"] else None
    )
    harmful_prompts = None
    if opts["harmful_prompts"]:
        recs = load_harmful(
            opts["harmful_prompts"], only_unsafe=False, require_response=False, limit=opts["num_eval"]
        )
        harmful_prompts = [_template(r["prompt"], opts) for r in recs]
    _check_model_source(opts["model"])
    _check_adapters(opts)
    if opts["judge_model"] and not os.path.isdir(opts["judge_model"]):
        _check_model_source(opts["judge_model"])
    device = _resolve_device(opts["device"])

    from .evaluate import RefusalPatternJudge, evaluate_model, make_judge

    model, tokenizer = _load_model(opts, device, train=False)
    if opts["judge_model"]:
        try:
            judge = make_judge(opts["judge_model"], opts["judge_kind"], device=device)
        except (OSError, ValueError) as e:
            raise CLIError(f"--judge-model {opts['judge_model']!r}: {e}") from None
    else:
        judge = RefusalPatternJudge()
    total = (len(task_examples) if task_examples else 0) + (len(harmful_prompts) if harmful_prompts else 0)
    bar = _progress(opts, total, 0, "evaluate")
    try:
        result = evaluate_model(
            model,
            tokenizer,
            task=opts["task"],
            task_examples=task_examples,
            harmful_prompts=harmful_prompts,
            judge=judge,
            max_new_tokens=opts["max_new_tokens"],
            batch_size=opts["batch_size"],
            max_prompt_length=opts["max_length"],
            progress=bar.update,
        )
    finally:
        bar.close()
    samples = result.pop("samples")
    result["model"] = opts["model"]
    result["adapters"] = opts["adapter"]
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write_text(os.path.join(out_dir, "samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
    _atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(result, indent=2) + "\n")
    parts = []
    if result["fa"] is not None:
        parts.append(f"FA ({opts['task']}) = {result['fa']:.2f}%")
    if result["hs"] is not None:
        parts.append(f"HS = {result['hs']:.2f}% [judge: {result['judge']}]")
    _say("evaluate: " + ("; ".join(parts) if parts else "done") + f"; results in {out_dir}")
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _dry_run(command: str, opts: dict, sources: dict, missing: list[str]) -> int:
    """``--dry-run``: print the resolved configuration as JSON on stdout (options, where each came from, what
    is still missing, and for ``finetune`` the adapter mode) and return 0; loads no model and no data."""
    out = {
        "command": command,
        "recipe": opts["recipe"],
        "options": {k: v for k, v in opts.items() if k != "dry_run"},
        "sources": {k: v for k, v in sources.items() if k != "dry_run"},
        "missing": missing,
    }
    if opts["epochs"] is not None:
        out["steps_rule"] = f"{opts['epochs']} epochs x ceil(training samples / (batch size x processes))"
    if command == "finetune" and opts["adapter"]:
        out["adapter_mode"], out["adapter_mode_reason"] = _adapter_mode(opts, sources)
    print(json.dumps(out, indent=2))
    return 0


RUNNERS = {"align": _run_align, "finetune": _run_finetune, "evaluate": _run_evaluate}


def _user_errors() -> tuple:
    """The exceptions the CLI reports as a one-line message with exit 2 (no traceback): user errors and the
    library's typed errors. ValueError covers UnicodeDecodeError, json errors, CheckpointMismatchError and
    NonFiniteCheckpointError; OSError covers a read-only --output and a full disk."""
    from .data.loaders import DataError
    from .flat import StaleFlatParametersError
    from .guard import NonFiniteError

    return (
        CLIError,
        DataError,
        ValueError,
        OSError,
        RecursionError,
        NonFiniteError,
        StaleFlatParametersError,
    )


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (OSError, RecursionError, UnicodeDecodeError)) and type(e).__name__ not in msg:
        msg = f"{type(e).__name__}: {msg}"
    return msg[:2000]


def main(command: str, argv: Sequence[str] | None = None) -> int:
    """Run ``antibody-fast <command> <argv>`` for ``command`` in ``align``, ``finetune``, ``evaluate``.

    Returns the exit status: 0 on success, 2 on a user error: one line on stderr, no traceback
    (``ANTIBODY_FAST_DEBUG=1`` re-raises it). The user errors are :func:`_user_errors` (bad options or data,
    non-UTF-8 or too deeply nested input, a missing / read-only / locked / full output, a checkpoint of another
    run, repeated non-finite steps); other exceptions are bugs and keep their traceback.
    """
    if command not in RUNNERS:
        _say(
            f"antibody-fast: unknown command {command!r} for train_cli (expected one of {', '.join(COMMANDS)})"
        )
        return 2
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        if command == "evaluate":
            opts = parse_options(command, args)
            if _launched_world_size() > 1:
                raise CLIError(
                    "evaluate runs in one process: launch it without torchrun (WORLD_SIZE > 1 here)"
                )
            runner = lambda: _run_evaluate(opts)  # noqa: E731
        else:
            opts, sources, missing = resolve_options(command, args, allow_missing=True)
            if opts["dry_run"]:
                return _dry_run(command, opts, sources, missing)
            if missing:
                raise CLIError(missing[0])
            runner = lambda: RUNNERS[command](opts, sources)  # noqa: E731
        try:
            return runner()
        finally:
            _WORLD.close()
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except Exception as e:  # one handler: the library's typed errors and user errors -> one line, exit 2
        if not isinstance(e, _user_errors()) or os.environ.get("ANTIBODY_FAST_DEBUG"):
            raise
        _say(f"antibody-fast {command}: error: {_one_line(e)}")
        return 2
    finally:
        while _LOCKS:
            _LOCKS.pop().close()


if __name__ == "__main__":  # pragma: no cover
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.exit(main(cmd, sys.argv[2:]))
