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
  ``--fsdp`` shards the model with FSDP2 instead (:mod:`antibody_fast.fsdp`): the same update, 1/N of the model
  state per rank, checkpoints as torch.distributed.checkpoint shards that resume on any N (README "Scaling out").
* **Bad input** (malformed JSON, a missing field, an empty dataset, a ratio outside [0, 1], an unknown model,
  a bad option) is reported as ``antibody-fast <command>: error: ...`` with exit status 2, naming the file,
  line and field, before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from .console import CLIError, one_line, say, user_errors
from .options import FinetuneOptions
from .outputs import auroc, release_locks
from .resolve import parse_options, resolve, resolve_options
from .runtime import WORLD, launched_world_size

__all__ = ["main", "CLIError", "auroc", "COMMANDS", "parse_options", "resolve_options"]

COMMANDS = ("align", "finetune", "evaluate")


def _dry_run(opts, sources: dict, missing: list[str]) -> int:
    """``--dry-run``: print the resolved configuration as JSON on stdout (options, where each came from, what
    is still missing, and for ``finetune`` the adapter mode) and return 0; loads no model and no data."""
    out = {
        "command": opts.command,
        "recipe": opts.recipe,
        "options": {k: v for k, v in opts.as_dict().items() if k != "dry_run"},
        "sources": {k: v for k, v in sources.items() if k != "dry_run"},
        "missing": missing,
    }
    if opts.epochs is not None:
        out["steps_rule"] = f"{opts.epochs} epochs x ceil(training samples / (batch size x processes))"
    if isinstance(opts, FinetuneOptions) and opts.adapter:
        from .loading import adapter_mode

        out["adapter_mode"], out["adapter_mode_reason"] = adapter_mode(opts, sources)
    print(json.dumps(out, indent=2))
    return 0


def _run(command: str, opts, sources: dict) -> int:
    if command == "align":
        from .align import run_align

        return run_align(opts, sources)
    if command == "finetune":
        from .finetune import run_finetune

        return run_finetune(opts, sources)
    from .evaluate import run_evaluate

    return run_evaluate(opts)


def main(command: str, argv: Sequence[str] | None = None) -> int:
    """Run ``antibody-fast <command> <argv>`` for ``command`` in ``align``, ``finetune``, ``evaluate``.

    Returns the exit status: 0 on success, 2 on a user error: one line on stderr, no traceback
    (``ANTIBODY_FAST_DEBUG=1`` re-raises it). The user errors are
    :func:`~antibody_fast.cli.console.user_errors` (bad options or data, non-UTF-8 or too deeply nested input, a
    missing / read-only / locked / full output, a checkpoint of another run, repeated non-finite steps); other
    exceptions are bugs and keep their traceback.
    """
    if command not in COMMANDS:
        say(
            f"antibody-fast: unknown command {command!r} for train_cli (expected one of {', '.join(COMMANDS)})"
        )
        return 2
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        if command == "evaluate":
            opts, sources, _ = resolve(command, args)
            if launched_world_size() > 1:
                raise CLIError(
                    "evaluate runs in one process: launch it without torchrun (WORLD_SIZE > 1 here)"
                )
        else:
            opts, sources, missing = resolve(command, args, allow_missing=True)
            if opts.dry_run:
                return _dry_run(opts, sources, missing)
            if missing:
                raise CLIError(missing[0])
        try:
            return _run(command, opts, sources)
        finally:
            WORLD.close()
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except Exception as e:  # one handler: the library's typed errors and user errors -> one line, exit 2
        if not isinstance(e, user_errors()) or os.environ.get("ANTIBODY_FAST_DEBUG"):
            raise
        say(f"antibody-fast {command}: error: {one_line(e)}")
        return 2
    finally:
        release_locks()
