"""Command line of the demo: ``antibody-fast demo [options]`` / ``python -m antibody_fast.demo [options]``
(the toy demo, :mod:`antibody_fast.demo.run`; ``--model smollm2`` hands over to
:mod:`antibody_fast.demo.real_cli`)."""

from __future__ import annotations

import argparse
import sys

from ._args import add_overrides


def build_parser(prog: str = "antibody-fast demo") -> argparse.ArgumentParser:
    from .config import DemoConfig
    from .methods import ALL_METHODS, DEFAULT_METHODS

    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Antibody vs SFT, Vaccine, Lisa and Booster on a tiny Llama trained from scratch (CPU, "
        "no download). Writes report.md, report.json and PNG plots (weights, hs_fa, finetuning, alignment) into --out.",
    )
    # fmt: off
    add = p.add_argument
    add("--harmful-ratio", type=float, default=d.harmful_ratio,
        help=f"fraction of harmful samples in the user's fine-tuning set, in [0, 1] (default {d.harmful_ratio:g})")
    add("--samples", type=int, default=None, help=f"size of the user's fine-tuning set (default {d.samples})")
    add("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    add("--seeds", type=str, default=None,
        help="comma-separated seeds, e.g. 0,1,2,3,4: one run per seed in OUT/seed_<k>/ plus a summary table "
             "(mean and range) in OUT; overrides --seed")
    add("--methods", type=str, default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
             "antibody_align = Antibody's alignment then SFT, antibody_ft = SFT alignment then Antibody's "
             "weighted_step: stage ablations)")
    add("--steps", type=int, default=None, help=f"fine-tuning steps per method (default {d.steps})")
    add("--align-steps", type=int, default=None, help=f"alignment steps per method (default {d.align_steps})")
    add("--base-steps", type=int, default=None, help=f"base-training steps (default {d.base_steps})")
    add("--align-lr", type=float, default=None, help=f"AdamW learning rate of stage 1 (default {d.align_lr:g})")
    add("--finetune-lr", type=float, default=None,
        help=f"learning rate of stage 2 (default {d.finetune_lr:g})")
    add("--finetune-optimizer", choices=("adamw", "sgd"), default=d.finetune_optimizer,
        help="optimizer of stage 2: adamw (default, the paper's) or sgd (momentum 0.9), for comparison")
    add("--eval-every", type=int, default=None,
        help=f"held-out HS/FA every N fine-tuning steps, for finetuning.png (default {d.eval_every}; 0: end only)")
    add("--threads", type=int, default=d.threads,
        help=f"torch CPU threads, fixed for reproducibility (default {d.threads})")
    add("--out", type=str, default=d.out, help=f"output directory (default ./{d.out})")
    add("--quick", action="store_true", help="tiny seconds-scale run for tests (numbers not meaningful)")
    add("--model", choices=("toy", "smollm2"), default="toy",
        help="toy (default): this tiny Llama; smollm2: the real-model demo on SmolLM2-135M-Instruct, with its own "
             "options (antibody-fast demo --model smollm2 --help)")
    add("--no-progress", action="store_true", help="no progress bars")
    # fmt: on
    return p


def config_from_args(args: argparse.Namespace):
    """A validated :class:`~antibody_fast.demo.run.DemoConfig` from parsed arguments (raises ``ValueError``)."""
    from .config import DemoConfig

    methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    kw = dict(
        seed=args.seed,
        harmful_ratio=args.harmful_ratio,
        methods=methods,
        threads=args.threads,
        finetune_optimizer=args.finetune_optimizer,
        out=args.out,
        progress=not args.no_progress,
    )
    add_overrides(
        kw, args, ("samples", "steps", "align_steps", "base_steps", "align_lr", "finetune_lr", "eval_every")
    )
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    cfg.validate()
    return cfg


def _model_choice(argv: list[str]) -> str | None:
    """The value of ``--model`` (``toy`` by default; ``smollm2``: the real-model demo), removed from ``argv`` in
    place; ``None`` (with a message) for a bad value."""
    model = "toy"
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            model = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--model="):
            model = a.split("=", 1)[1]
            del argv[i]
            break
    if model not in ("toy", "smollm2"):
        print(f"antibody-fast demo: error: --model must be toy or smollm2, got {model!r}", file=sys.stderr)
        return None
    return model


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``antibody-fast demo`` / ``python -m antibody_fast.demo``. Returns the exit status:
    0 on success, 2 for bad options (with a message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model = _model_choice(argv)
    if model is None:
        return 2
    if model == "smollm2":  # the real-model demo: its own options (antibody_fast.demo.real)
        from .real_cli import main as real_main

        return real_main(argv, prog="antibody-fast demo --model smollm2")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a malformed option (2)
        return int(e.code or 0)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    from .run import run

    run(cfg)
    return 0
