"""Command line of the real-model demo: ``antibody-fast demo --model smollm2 [options]``
(:mod:`antibody_fast.demo.real`)."""

from __future__ import annotations

import argparse
import sys

from ._args import add_overrides


def build_parser(prog: str = "antibody-fast demo --model smollm2") -> argparse.ArgumentParser:
    from .real_config import DEFAULT_METHODS, RealConfig

    d, q = RealConfig(), RealConfig.quick_config()
    p = argparse.ArgumentParser(
        prog=prog,
        description="SFT, Vaccine, Lisa, Booster and Antibody on SmolLM2-135M-Instruct with a natural-language "
        "scenario, on CPU (needs the real-model extras: bash scripts/setup_env.sh --real-model). Writes report.md, "
        "report.json and PNG plots into --out. Fine-tuning lr and steps come from the committed SFT-only "
        "calibration unless given.",
    )
    # fmt: off
    add = p.add_argument
    add("--harmful-ratio", type=str, default=f"{d.harmful_ratio:g}",
        help=f"fraction of harmful samples in the user's set (default {d.harmful_ratio:g}); a comma-separated list "
             "(0.1,0.2,0.5) aligns once per seed and fine-tunes once per ratio into OUT/ratio_<r>/")
    add("--benign-mix", type=float, default=d.benign_mix,
        help="fraction of the alignment set replaced by benign -> helpful pairs, against over-refusal (default 0: "
             "the authors align on harmful -> refusal pairs only); report such a run as its own row, never as the "
             "default")
    add("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    add("--seeds", type=str, default=None, help="comma-separated seeds: one run each in OUT/seed_<k>/ plus a summary")
    add("--methods", type=str, default=",".join(DEFAULT_METHODS), help="comma-separated subset of the five methods")
    add("--task", choices=("topic", "sentiment"), default=d.task, help=f"the user's task (default {d.task})")
    add("--samples", type=int, default=None, help=f"user set size (default {d.samples}; quick {q.samples})")
    add("--steps", type=int, default=None, help="fine-tuning steps (default: calibrated; quick {q.steps})")
    add("--align-steps", type=int, default=None, help=f"alignment steps (default {d.align_steps}; quick {q.align_steps})")
    add("--finetune-lr", type=float, default=None, help="fine-tuning lr (default: calibrated)")
    add("--eval-every", type=int, default=None, help=f"HS/FA every N fine-tuning steps (default {d.eval_every}; 0: end only)")
    add("--eval-harmful", type=int, default=None, help=f"held-out harmful prompts (default {d.eval_harmful})")
    add("--eval-task", type=int, default=None, help=f"held-out task prompts (default {d.eval_task})")
    add("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    add("--out", "--output", dest="out", type=str, default=d.out, help=f"output directory (default ./{d.out})")
    add("--quick", action="store_true", help="a few-minute run (tiny step and sample counts; numbers not meaningful)")
    add("--no-progress", action="store_true", help="no progress bars")
    # fmt: on
    return p


def config_from_args(args: argparse.Namespace):
    from .real_config import RealConfig

    try:
        ratios = tuple(float(r) for r in args.harmful_ratio.split(",") if r.strip())
    except ValueError:
        raise ValueError(
            f"--harmful-ratio: not a number or comma-separated numbers: {args.harmful_ratio!r}"
        ) from None
    if not ratios:
        raise ValueError("--harmful-ratio: give at least one ratio")
    kw = dict(
        seed=args.seed,
        harmful_ratio=ratios[0],
        benign_mix=args.benign_mix,
        harmful_ratios=ratios if len(ratios) > 1 else (),
        task=args.task,
        methods=tuple(m.strip().lower() for m in args.methods.split(",") if m.strip()),
        threads=args.threads,
        out=args.out,
        progress=not args.no_progress,
    )
    add_overrides(
        kw,
        args,
        ("samples", "steps", "align_steps", "finetune_lr", "eval_every", "eval_harmful", "eval_task"),
    )
    cfg = RealConfig.quick_config(**kw) if args.quick else RealConfig(**kw)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None, prog: str = "antibody-fast demo --model smollm2") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        cfg = config_from_args(args)
        cfg = cfg.resolved()
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    from .real import run

    run(cfg)
    return 0
