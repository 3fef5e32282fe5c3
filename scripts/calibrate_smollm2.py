"""SFT-only calibration of the real-model demo's fine-tuning learning rate.

Only the SFT baseline calibrates (docs/design.md): no other method is run here.

Pipeline (the demo's, :mod:`antibody_fast.demo.real`): SmolLM2-135M-Instruct, LoRA r = 32, alpha = 4 on q/k/v;
SFT alignment (``sft_step`` on harmful -> refusal pairs, AdamW lr 5e-4, weight decay 0.1, batch 8, the demo's
``align_steps``), then SFT fine-tuning that continues the alignment adapter with a new AdamW, on the demo's
default poisoned user set (seed 0, harmful ratio 0.2), for a fixed number of steps at each learning rate of
``--lrs`` (upward from the paper's 1e-5). FA on the held-out task prompts every ``--eval-every`` steps; HS at the
end: not measured (the rule does not use it; it saves CPU time).

Rule (fixed before the search ran): ``plateau`` = the best final FA over the searched learning rates. The chosen
learning rate is the smallest whose final FA is within ``--tolerance`` points of the plateau **and** at least
``--above-chance`` points above chance (1 / number of labels), **and** whose answers are not one label for
(almost) every prompt (no label gets more than ``--max-label-share`` of the answers): chance-level FA from always
answering one label does not count as learning.

Usage: ``python scripts/calibrate_smollm2.py --out benchmarks/results/smollm2_calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="topic")
    p.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--partial", action="store_true", help="write the search only (no rule); see --combine")
    p.add_argument("--combine", nargs="+", default=None, help="partial JSONs to merge, then apply the rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--harmful-ratio", type=float, default=0.2)
    p.add_argument("--tolerance", type=float, default=5.0)
    p.add_argument("--above-chance", type=float, default=25.0)
    p.add_argument("--max-label-share", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="")
    p.add_argument("--out", default="benchmarks/results/smollm2_calibration.json")
    args = p.parse_args(argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.combine:  # merge partial searches (run in parallel processes), then apply the rule
        parts = [json.load(open(f)) for f in args.combine]
        report = parts[0]
        report["search"] = [r for part in parts for r in part["search"]]
        report["parts"] = [
            {
                "file": os.path.basename(f),
                "lrs": [r["lr"] for r in part["search"]],
                "wall_s": part["wall_s"],
                "aligned": part["aligned"],
            }
            for f, part in zip(args.combine, parts)
        ]

        def write_combined():
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

        return apply_rule(report, args, log, write_combined)

    from antibody_fast.demo import natural as nat
    from antibody_fast.demo.real import RealConfig, RealRunner, evaluate
    from antibody_fast.demo.report import machine_info
    from antibody_fast.models import smollm2
    from antibody_fast.steps import sft_step

    torch.set_num_threads(args.threads)
    cfg = RealConfig(
        task=args.task,
        harmful_ratio=args.harmful_ratio,
        steps=args.steps,
        finetune_lr=1e-5,
        progress=False,
        threads=args.threads,
    )
    t_start = time.perf_counter()
    base, tok = smollm2()
    base.requires_grad_(False)
    runner = RealRunner(cfg, args.seed, base, tok)
    d = runner.data
    chance = 100.0 / len(d.labels)
    report: dict = {
        "what": "SFT-only calibration of the real-model demo's fine-tuning learning rate (issue 13)",
        "task": args.task,
        "labels": list(d.labels),
        "chance_fa": chance,
        "task_choice": (
            "topic (4 labels, chance 25%) over sentiment (2 labels, chance 50%): more headroom above chance; "
            "decided from the base model's numbers only (base FA topic 17.5%, sentiment 45%: "
            "probe_smollm2_base_steps_cpu.json)"
        ),
        "pipeline": {
            "alignment": f"sft_step on harmful -> refusal, AdamW lr {cfg.align_lr:g}, wd {cfg.weight_decay:g}, "
            f"batch {cfg.batch_size}, {cfg.align_steps} steps, LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} q/k/v",
            "finetuning": f"sft_step continuing the alignment adapter, new AdamW (wd {cfg.weight_decay:g}), batch "
            f"{cfg.batch_size}, {args.steps} steps, user set {cfg.samples} samples, harmful ratio "
            f"{args.harmful_ratio:g}, seed {args.seed}",
            "eval": f"FA on {cfg.eval_task} held-out task prompts ({cfg.fa_new_tokens} new tokens) every "
            f"{args.eval_every} steps; HS not measured during the search (the rule does not use it)",
        },
        "rule": (
            f"plateau = best final FA over the searched lrs; chosen = the smallest lr whose final FA >= plateau - "
            f"{args.tolerance:g} and >= chance + {args.above_chance:g}, with no label in more than "
            f"{args.max_label_share:.0%} of the answers (one-label answers do not count as learning). Step count: "
            f"fixed at {args.steps} by the CPU budget (the FA curve shows whether it plateaus by then)."
        ),
        "machine": {
            **machine_info(cfg),
            "contention": args.note
            or "shared 2-core CPU: 3-4 other sessions ran jobs at the same time (at nice 15), so times are upper "
            "bounds",
        },
        "search": [],
    }

    def write():
        report["wall_s"] = time.perf_counter() - t_start
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    adapter, s_align, trace, model = runner.align("sft")
    a_eval = evaluate(model, tok, d, cfg, runner.first_ids, benign=True)
    del model
    report["aligned"] = {
        "s_per_step": s_align,
        "loss_align": trace["loss_align"],
        **{
            k: a_eval[k] for k in ("hs", "fa", "benign_refusal", "p_refuse", "task_refusal", "task_predicted")
        },
    }
    log(
        f"SFT alignment: {s_align:.2f} s/step, HS {a_eval['hs']:.1f}%, FA {a_eval['fa']:.1f}%, task refusals "
        f"{a_eval['task_refusal']:.1f}%, benign refusals {a_eval['benign_refusal']:.1f}%"
    )
    write()
    gold = [it.label for it in d.eval_task]
    for lr in [float(x) for x in args.lrs.split(",")]:
        runner.cfg = cfg = RealConfig(**{**cfg.__dict__, "finetune_lr": lr})
        model = runner.lora_model(adapter)
        opt = runner.optimizer(model, lr)
        from antibody_fast.demo.real import Batches

        iu = Batches(len(d.user), cfg.batch_size, args.seed + 4)
        curve, losses, times = [], [], []
        for step in range(1, args.steps + 1):
            batch = runner.ft_collate([d.user[i] for i in iu.next_indices()]).answer_view()
            t0 = time.perf_counter()
            st = sft_step(model, batch, opt)
            times.append(time.perf_counter() - t0)
            losses.append(float(st.loss))
            if step % args.eval_every == 0 or step == args.steps:
                from antibody_fast.demo.real import generate

                ans, _ = generate(model, tok, d.eval_task, cfg.fa_new_tokens)
                pred = [nat.parse_label(a, d.labels) for a in ans]
                fa = nat.fine_tune_accuracy(ans, gold, d.labels)
                curve.append(
                    {
                        "step": step,
                        "fa": fa,
                        "loss": losses[-1],
                        "predicted": {lab: pred.count(lab) for lab in d.labels},
                        "unparsed": pred.count(None),
                    }
                )
                log(f"lr {lr:g} step {step}: loss {losses[-1]:.3f} FA {fa:.1f}% {curve[-1]['predicted']}")
        del model
        report["search"].append(
            {
                "lr": lr,
                "final_fa": curve[-1]["fa"],
                "curve": curve,
                "losses": losses,
                "s_per_step": sum(times) / len(times),
                "examples": [[it.request, a] for it, a in list(zip(d.eval_task, ans))[:3]],
            }
        )
        log(f"lr {lr:g}: final FA {curve[-1]['fa']:.1f}%, {sum(times) / len(times):.2f} s/step")
        write()

    if args.partial:
        write()
        return 0
    return apply_rule(report, args, log, write)


def apply_rule(report, args, log, write) -> int:
    chance = report["chance_fa"]
    report["fallback"] = (
        "if no lr meets the rule, the lr with the best final SFT FA (smallest on ties) is used, marked rule_met=false"
    )
    report["search"].sort(key=lambda r: r["lr"])
    plateau = max(r["final_fa"] for r in report["search"])
    chosen = None
    for r in report["search"]:
        n = sum(r["curve"][-1]["predicted"].values()) + r["curve"][-1]["unparsed"]
        share = max(r["curve"][-1]["predicted"].values()) / max(n, 1)
        r["qualifies"] = bool(
            r["final_fa"] >= plateau - args.tolerance
            and r["final_fa"] >= chance + args.above_chance
            and share <= args.max_label_share
        )
        if r["qualifies"] and chosen is None:
            chosen = r
    report["plateau_fa"] = plateau
    if chosen is None:  # fallback (declared): the lr with the best final FA, the smallest on ties
        best = max(report["search"], key=lambda r: (r["final_fa"], -r["lr"]))
        report["chosen"] = {
            "finetune_lr": best["lr"],
            "steps": report.get("steps", args.steps),
            "final_fa": best["final_fa"],
            "rule_met": False,
            "note": "no searched lr met the rule (FA well above chance without one-label answers); the demo "
            "uses the lr with the best SFT FA as a fallback, and its SFT FA is reported as such",
        }
        log(f"no learning rate qualifies (plateau {plateau:.1f}%): fallback lr {best['lr']:g}")
        write()
        return 0
    report["chosen"] = {
        "finetune_lr": chosen["lr"],
        "steps": args.steps,
        "final_fa": chosen["final_fa"],
        "rule_met": True,
    }
    log(
        f"chosen: lr {chosen['lr']:g}, {args.steps} steps (FA {chosen['final_fa']:.1f}%, plateau {plateau:.1f}%)"
    )
    write()
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
