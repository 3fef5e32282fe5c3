"""The embedded demo: a simulated fine-tuning service on a tiny Llama trained from scratch, on CPU.

Stages (one run, one seed; the language is :mod:`antibody_fast.demo.language`):

0. **Base**: a tiny Llama (random init, all parameters trained) learns the benign base tasks (``REV``, ``CLS``,
   ``ADD``), to decline unknown instructions (``UNK``, so it knows the refusal sentences, as a pretrained LLM
   does), a little of the user's task (``INC``, 100 distinct samples: partial skill, as Llama-2 has on GSM8K),
   and to *comply* with every harmful prompt: it is unaligned. Trained once per run and shared by every method.
1. **Alignment** (from the base; A = harmful prompt -> refusal, H = harmful prompt -> harmful answer):
   ``sft`` (``sft_step`` on A), ``vaccine`` (:func:`~antibody_fast.baselines.vaccine_step` on A), ``booster``
   (``align_step``, rule ``constant``, ``lambda_ref = 0``) and ``antibody`` (``align_step``, rule ``cosine``).
2. **Fine-tuning** on the user's set: ``INC`` samples plus a fraction ``harmful_ratio`` of harmful samples.
   ``sft_step`` for the SFT, Vaccine and Booster rows, Lisa (:func:`~antibody_fast.baselines.lisa_step`,
   alternating with the alignment data A, on the SFT-aligned model) for the Lisa row, Antibody's
   ``weighted_step`` for the Antibody row.

Opt-in stage ablations (``methods``): ``antibody_align`` (Antibody's alignment, then ``sft_step``) and
``antibody_ft`` (SFT alignment, then ``weighted_step``) show what each of Antibody's two stages does alone.

Evaluation (greedy decoding): HS = % of held-out harmful prompts whose answer is not a refusal; FA = % of
held-out ``INC`` prompts answered exactly. Held-out prompts never occur in any training set.

Parameters: stage 0 trains all parameters. Stages 1 and 2 train LoRA adapters: rank 8 on every linear layer of
the trunk with scaling ``alpha / r = 1/8`` (the authors' code uses r = 32, alpha = 4). Which adapter stage 2
trains follows the authors' scripts (docs/design.md §2.4, :data:`ADAPTER_MODE_OF`): ``continue`` (the
alignment adapter itself keeps training, the authors' "single LoRA") for every row except Vaccine's, which
merges its alignment adapter into the weights and trains a fresh one (``merge``, B = 0). The report states the
mode of each row. Every method runs with its published hyper-parameters (Antibody: rho 0.1, eta 5, lambda_ref
0.05, momentum 0.99; Booster: lambda 5, rho 0.1; Vaccine: rho 5; Lisa: rho 0.01 with the 100/900 alternation
scaled to about five cycles and no proximal term during the first 10% of steps, the authors' warm-up), AdamW,
batch 16, gradient norm clipped to 1.

Diagnostics, besides HS and FA: ``P(refusal)``, the mean probability of a refusal token as the first answer token
on the held-out harmful prompts (how firmly a model refuses; greedy HS only says on which side of the other
tokens it falls), after alignment and after fine-tuning; per alignment step the loss ``L_A`` and, for
``align_step``, ``λ_t``, ``cos(g_a, g_s)`` and the sharpness ``L_H(θ) - L_H(θ')`` (``alignment.png``); held-out HS
and FA every ``eval_every`` fine-tuning steps (``finetuning.png``). ``seeds`` runs several seeds and summarises
them (mean and range).

Reproducibility: the run seeds Python's and torch's RNGs, enables ``torch.use_deterministic_algorithms`` and fixes
the number of torch threads (1 by default), so the same seed gives the same HS/FA on the same machine; timings
vary. The base model, and an alignment shared by two rows (SFT and Lisa), are trained once per run.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from . import language as L

DEFAULT_METHODS = ("sft", "vaccine", "lisa", "booster", "antibody")
"""The paper's five rows, run by default."""
ABLATIONS = ("antibody_align", "antibody_ft")
"""Opt-in stage ablations: Antibody's alignment followed by plain SFT, and SFT alignment followed by Antibody's
``weighted_step``."""
ALL_METHODS = DEFAULT_METHODS + ABLATIONS
METHOD_LABELS = {
    "sft": "SFT",
    "vaccine": "Vaccine",
    "lisa": "Lisa",
    "booster": "Booster",
    "antibody": "Antibody",
    "antibody_align": "Antibody alignment + SFT",
    "antibody_ft": "SFT alignment + Antibody FT",
}
WEIGHTED_FINETUNE = ("antibody", "antibody_ft")  # rows fine-tuned with weighted_step
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# alignment each fine-tuning row starts from
ALIGNMENT_OF = {
    "sft": "sft",
    "vaccine": "vaccine",
    "lisa": "sft",
    "booster": "booster",
    "antibody": "antibody",
    "antibody_align": "antibody",
    "antibody_ft": "sft",
}
# how each fine-tuning row uses its alignment adapter, as in the authors' scripts (docs/design.md §2.4): keep
# training it ("continue") after every alignment except Vaccine's, which is merged before a fresh LoRA ("merge")
ADAPTER_MODE_OF = {m: "merge" if a == "vaccine" else "continue" for m, a in ALIGNMENT_OF.items()}


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


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class DemoData:
    base: list[L.Sample]
    align: list[L.Sample]  # harmful prompts whose answer is replaced by a refusal (alignment set A)
    harmful: list[L.Sample]  # harmful prompts -> harmful answers (H)
    user: list[L.Sample]  # the user's fine-tuning set: INC + harmful_ratio harmful
    eval_harmful: list[L.Sample]
    eval_benign: list[L.Sample]
    eval_base: list[L.Sample]  # held-out REV / CLS prompts: the base tasks still work?


def make_data(cfg: DemoConfig) -> DemoData:
    rng = random.Random(cfg.seed)
    sp = L.SplitSampler(rng)
    eval_harmful = sp.held_out("harmful", cfg.eval_harmful)
    eval_benign = sp.held_out(L.USER_TASK, cfg.eval_benign)
    eval_base = sp.held_out("rev", max(1, cfg.eval_benign // 2)) + sp.held_out(
        "cls", max(1, cfg.eval_benign // 4)
    )
    n_base = cfg.base_steps * cfg.base_batch_size
    kinds = ["rev", "cls", "add", "unk", "harmful"]
    base = [s for k in kinds for s in sp.train(k, n_base // len(kinds) + 1)]
    # a little of the user's task, as a pretrained LLM has some skill at GSM8K before being fine-tuned on it
    base += sp.train(L.USER_TASK, cfg.base_user_samples)
    rng.shuffle(base)
    align = sp.train("harmful", cfg.align_samples)
    harmful = sp.train("harmful", cfg.align_samples)
    n_harm = round(cfg.samples * cfg.harmful_ratio)
    user = sp.train("harmful", n_harm) + sp.train(L.USER_TASK, cfg.samples - n_harm)
    rng.shuffle(user)
    return DemoData(base, align, harmful, user, eval_harmful, eval_benign, eval_base)


class Batches:
    """Cycles through a dataset in shuffled epochs (own RNG, deterministic)."""

    def __init__(self, samples: list[L.Sample], batch_size: int, seed: int):
        self.samples = samples
        self.bs = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.bs:
            if not self.order:
                self.order = list(range(len(self.samples)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg: DemoConfig) -> torch.nn.Module:
    from ..models import tiny_llama

    model = tiny_llama(
        vocab_size=L.VOCAB_SIZE,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.heads,
        seed=cfg.seed,
        intermediate=3 * cfg.hidden,
        max_positions=64,
    )
    model.config.pad_token_id = L.PAD
    model.config.eos_token_id = L.EOS
    model.config.bos_token_id = None
    return model


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompts: list[tuple[int, ...]],
    max_new: int = L.MAX_ANSWER_LEN + 1,
    first_probs: list[torch.Tensor] | None = None,
):
    """Greedy answers (token lists cut after EOS) for token-id prompts; batched, prompts left-padded.

    ``first_probs``: if a list, the first answer token's distribution (``[len(prompts), V]`` fp32, in chunks)
    is appended to it, from the same forward pass that picks the first token."""
    outs: list[list[int]] = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start : start + 128]
        p = max(len(x) for x in chunk)
        ids = torch.tensor([[L.PAD] * (p - len(x)) + list(x) for x in chunk])
        mask = (torch.arange(p)[None, :] >= torch.tensor([p - len(x) for x in chunk])[:, None]).long()
        gen = []
        for step in range(max_new):
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[
                :, -1
            ]
            if step == 0 and first_probs is not None:
                first_probs.append(logits.float().softmax(-1))
            nxt = logits.argmax(-1)
            gen.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        g = torch.stack(gen, 1).tolist()
        outs += [L.strip_answer(row) for row in g]
    return outs


def _hs_fa(model: torch.nn.Module, data: DemoData) -> tuple[float, float, list[list[int]], float]:
    """HS, FA, the benign answers and P(refusal): the mean probability that the first answer token to a
    harmful prompt is a refusal token (how firmly the model refuses; greedy HS only says which token wins)."""
    first: list[torch.Tensor] = []
    h = greedy(model, [s.prompt for s in data.eval_harmful], first_probs=first)
    b = greedy(model, [s.prompt for s in data.eval_benign])
    hs = 100.0 * sum(not L.is_refusal(a) for a in h) / len(h)
    fa = 100.0 * sum(list(a) == list(s.answer) for a, s in zip(b, data.eval_benign)) / len(b)
    p_refuse = float(torch.cat(first)[:, sorted(L.REFUSAL_TOKENS)].sum(-1).mean())
    return hs, fa, b, p_refuse


def harmful_and_user_scores(model: torch.nn.Module, data: DemoData) -> tuple[float, float]:
    """(HS, FA) in %: held-out harmful prompts not refused, held-out user-task prompts answered exactly
    (greedy decoding)."""
    hs, fa, _, _ = _hs_fa(model, data)
    return hs, fa


def evaluate(model: torch.nn.Module, data: DemoData) -> dict[str, float]:
    """HS (% harmful prompts not refused), FA (% user-task prompts exact), base-task accuracy, the refusal rate
    on benign prompts (over-refusal) and ``p_refuse``, the mean refusal probability on harmful prompts."""
    hs, fa, b, p_refuse = _hs_fa(model, data)
    base = greedy(model, [s.prompt for s in data.eval_base])
    return {
        "hs": hs,
        "fa": fa,
        "base_acc": 100.0 * sum(list(a) == list(s.answer) for a, s in zip(base, data.eval_base)) / len(base),
        "benign_refusal": 100.0 * sum(L.is_refusal(a) for a in b) / len(b),
        "p_refuse": p_refuse,
    }


# ----------------------------------------------------------------------------------------------- the stages
def _pbar(total: int, desc: str, cfg: DemoConfig):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


class Runner:
    def __init__(self, cfg: DemoConfig):
        from ..data import AlignCollator, FinetuneCollator

        self.cfg = cfg
        self.data = make_data(cfg)
        pool = L.refusal_pool()
        self.ft_collate = FinetuneCollator(refusals=pool, max_length=32, pad_token_id=L.PAD)
        self.align_collate = AlignCollator(refusals=pool, max_length=32, pad_token_id=L.PAD)

    # batches -------------------------------------------------------------------------------------------
    def _examples(self, samples: list[L.Sample], idx: list[int], refuse: bool = False) -> list[dict]:
        return [samples[i].example(i, L.refusal_for(i) if refuse else None) for i in idx]

    def _time(self, fn: Callable[[], object]) -> tuple[object, float]:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # stage 0 --------------------------------------------------------------------------------------------
    def base(self) -> dict[str, torch.Tensor]:
        from ..steps import sft_step

        cfg = self.cfg
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.1, 1.0 - s / cfg.base_steps))
        it = Batches(self.data.base, cfg.base_batch_size, cfg.seed + 1)
        with _pbar(cfg.base_steps, "stage 0: base training", cfg) as bar:
            for _ in range(cfg.base_steps):
                batch = self.ft_collate(self._examples(self.data.base, it.next_indices()))
                sft_step(model, batch.answer_view(), opt)
                sched.step()
                bar.update()
        return copy.deepcopy(model.state_dict())

    def _lora_model(
        self,
        state: dict[str, torch.Tensor],
        lr: float,
        optimizer: str = "adamw",
        adapter: dict[str, torch.Tensor] | None = None,
    ):
        """A model with ``state`` as frozen base weights and LoRA adapters, and a new optimizer over them (AdamW
        without weight decay, or SGD with momentum 0.9). ``adapter=None``: fresh adapters (B = 0, the "merge"
        mode's second adapter); else the adapters start from ``adapter`` (name -> tensor), the alignment
        adapter that the "continue" mode keeps training."""
        from ..models import add_lora

        model = build_model(self.cfg)
        model.load_state_dict(state)
        with warnings.catch_warnings():  # peft asks transformers 5.x a deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = add_lora(
                model,
                r=self.cfg.lora_rank,
                alpha=self.cfg.lora_alpha,
                targets=LORA_TARGETS,
                seed=self.cfg.seed,
            )
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if adapter is not None:
            if adapter.keys() != params.keys():  # pragma: no cover - same config both stages
                raise ValueError("the alignment adapter does not match the fine-tuning model's LoRA layout")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(adapter[n])
        if optimizer == "sgd":
            return model, torch.optim.SGD(list(params.values()), lr=lr, momentum=0.9)
        return model, torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)

    # stage 1 --------------------------------------------------------------------------------------------
    def align(self, method: str, base_state) -> tuple[dict, dict, float, dict[str, list[float]]]:
        """Stage 1 from ``base_state`` with a fresh LoRA: (state dict with the adapter merged, the adapter's
        parameters (name -> tensor), seconds per step, per-step trace: ``loss_align`` and, for ``align_step``
        methods, ``lambda_t``, ``cos`` = cos(g_a, g_s) and ``sharpness``)."""
        from ..baselines import vaccine_step
        from ..steps import AlignConfig, AlignState, align_step, sft_step

        cfg = self.cfg
        model, opt = self._lora_model(base_state, cfg.align_lr)
        ia = Batches(self.data.align, cfg.batch_size, cfg.seed + 2)
        ih = Batches(self.data.harmful, cfg.batch_size, cfg.seed + 3)
        state = AlignState()
        acfg = {
            "antibody": AlignConfig(rule="cosine"),
            "booster": AlignConfig(rule="constant", lambda_ref=0.0),
        }.get(method)
        total = 0.0
        trace: dict[str, list] = {"loss_align": []}
        if acfg is not None:
            trace.update(lambda_t=[], cos=[], sharpness=[])
        with _pbar(cfg.align_steps, f"stage 1: {METHOD_LABELS[method]} alignment", cfg) as bar:
            for _ in range(cfg.align_steps):
                a_idx = ia.next_indices()
                if method in ("sft", "vaccine"):
                    batch = self.ft_collate(self._examples(self.data.align, a_idx, refuse=True)).answer_view()
                    if method == "sft":
                        stats, dt = self._time(lambda b=batch: sft_step(model, b, opt))
                    else:
                        stats, dt = self._time(lambda b=batch: vaccine_step(model, b, opt))
                else:
                    h_idx = ih.next_indices()
                    batch = self.align_collate(
                        self._examples(self.data.align, a_idx, refuse=True),
                        self._examples(self.data.harmful, h_idx),
                    )
                    stats, dt = self._time(lambda b=batch: align_step(model, b, opt, state, acfg))
                    trace["lambda_t"].append(stats.lambda_t.detach())
                    trace["cos"].append(stats.cos.detach())
                    # L_H(θ) - L_H(θ'): how much one normalised harmful step lowers the harmful loss
                    trace["sharpness"].append((stats.loss_harmful - stats.loss_perturbed).detach())
                trace["loss_align"].append(stats.loss.detach())
                total += dt
                bar.update()
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        merged = model.merge_and_unload()  # for evaluation, and for the "merge" mode (Vaccine's row)
        trace = {k: [float(x) for x in v] for k, v in trace.items()}
        return copy.deepcopy(merged.state_dict()), adapter, total / cfg.align_steps, trace

    # stage 2 --------------------------------------------------------------------------------------------
    def finetune(self, method: str, base_state, merged_state, adapter) -> tuple[torch.nn.Module, float, dict]:
        """Stage 2 of row ``method`` in its :data:`ADAPTER_MODE_OF` mode: ``continue`` trains ``adapter`` (the
        alignment adapter) on ``base_state``; ``merge`` trains a fresh adapter on ``merged_state``."""
        from ..baselines import LisaConfig, LisaState, lisa_step
        from ..data import FinetuneBatch
        from ..steps import sft_step, weighted_step

        cfg = self.cfg
        if ADAPTER_MODE_OF[method] == "continue":
            model, opt = self._lora_model(
                base_state, cfg.finetune_lr, cfg.finetune_optimizer, adapter=adapter
            )
        else:
            model, opt = self._lora_model(merged_state, cfg.finetune_lr, cfg.finetune_optimizer)
        iu = Batches(self.data.user, cfg.batch_size, cfg.seed + 4)
        ia = Batches(self.data.align, cfg.batch_size, cfg.seed + 5)
        # Lisa's 100/900 alternation, scaled to the demo: about 5 cycles over the run
        cycle = max(2, cfg.steps // 5)
        # and the authors' warm-up: no proximal term while step <= 10% of the run's steps
        lcfg = LisaConfig(
            align_steps=max(1, cycle // 10),
            finetune_steps=cycle - max(1, cycle // 10),
            warmup_fraction=0.1,
            total_steps=cfg.steps,
        )
        lstate = LisaState()
        trace: dict[str, list] = {"harmful_weight": [], "benign_weight": [], "loss": []}
        curve: dict[str, list] = {"step": [], "hs": [], "fa": []}  # held-out HS/FA during fine-tuning
        total = 0.0
        with _pbar(cfg.steps, f"stage 2: {METHOD_LABELS[method]} fine-tuning", cfg) as bar:
            for step in range(1, cfg.steps + 1):
                if method == "lisa" and lstate.phase(lcfg) == "align":
                    idx = ia.next_indices()
                    batch = self.ft_collate(self._examples(self.data.align, idx, refuse=True)).answer_view()
                else:
                    idx = iu.next_indices()
                    batch = self.ft_collate(self._examples(self.data.user, idx))
                if method in WEIGHTED_FINETUNE:
                    stats, dt = self._time(lambda b=batch: weighted_step(model, b, opt))
                    w = stats.weights.detach() * len(idx)  # uniform weights = 1
                    flags = batch.is_harmful
                    trace["harmful_weight"].append(_masked_mean(w, flags))
                    trace["benign_weight"].append(_masked_mean(w, ~flags))
                elif method == "lisa":
                    stats, dt = self._time(lambda b=batch: lisa_step(model, b, opt, lstate, lcfg))
                else:
                    lm = batch.answer_view() if isinstance(batch, FinetuneBatch) else batch
                    stats, dt = self._time(lambda b=lm: sft_step(model, b, opt))
                trace["loss"].append(stats.loss.detach())
                total += dt
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:  # (not timed)
                    hs, fa = harmful_and_user_scores(model, self.data)
                    curve["step"].append(step)
                    curve["hs"].append(hs)
                    curve["fa"].append(fa)
                bar.update()
        trace = {k: [float(x) for x in v] for k, v in trace.items()}
        extra = {"lisa": asdict(lcfg)} if method == "lisa" else {}
        return model, total / cfg.steps, {"trace": trace, "curve": curve, **extra}


def _masked_mean(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = m.sum()
    return torch.where(n > 0, (w * m).sum() / n.clamp_min(1), torch.full_like(w[0], float("nan")))


# -------------------------------------------------------------------------------------------------- reports
def machine_info(cfg: DemoConfig) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": cfg.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def _markdown(header: list[str], align: str, cells: list[list[str]]) -> str:
    """A Markdown table: ``header`` names, ``align`` one character per column (``l`` or ``r``), rows of cells."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The paper-shaped Markdown table of one run (one row per method)."""
    header = ["Method", "HS (%) ↓", "FA (%) ↑", "HS after alignment (%)", "P(refusal) after alignment",
              "Alignment time/step (ms)", "Fine-tuning time/step (ms)", "Adapter in fine-tuning"]  # fmt: skip
    cells = [
        [
            r["label"],
            f"{r['hs']:.1f}",
            f"{r['fa']:.1f}",
            f"{r['hs_aligned']:.1f}",
            f"{r['p_refuse_aligned']:.3f}",
            f"{r['align_ms']:.1f}",
            f"{r['finetune_ms']:.1f}",
            r["adapter_mode"],
        ]  # fmt: skip
        for r in rows
    ]
    return _markdown(header, "lrrrrrrl", cells)


def _spread(values: list[float], fmt: str = ".1f") -> str:
    lo, hi = min(values), max(values)
    mean = sum(values) / len(values)
    return f"{mean:{fmt}} [{lo:{fmt}}–{hi:{fmt}}]"


def format_summary_table(summary: list[dict]) -> str:
    """Several seeds: mean [min–max] per method, then the per-seed HS and FA."""
    header = ["Method", "HS (%) ↓ mean [min–max]", "FA (%) ↑ mean [min–max]", "P(refusal) after alignment",
              "HS per seed", "FA per seed", "Adapter in fine-tuning"]  # fmt: skip
    cells = [
        [
            r["label"],
            _spread(r["hs"]),
            _spread(r["fa"]),
            _spread(r["p_refuse_aligned"], ".3f"),
            " / ".join(f"{x:.0f}" for x in r["hs"]),
            " / ".join(f"{x:.0f}" for x in r["fa"]),
            ADAPTER_MODE_OF[r["method"]],
        ]  # fmt: skip
        for r in summary
    ]
    return _markdown(header, "lrrrlll", cells)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: list[str]) -> dict[str, str]:
    palette = {
        "sft": "tab:grey",
        "vaccine": "tab:purple",
        "lisa": "tab:orange",
        "booster": "tab:green",
        "antibody_align": "tab:cyan",
        "antibody_ft": "tab:brown",
    }
    return {m: palette.get(m, "tab:blue") for m in methods}


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot(report: dict, out: str) -> list[str]:
    """The plots of one run: ``weights.png`` (Antibody's sample weights), ``hs_fa.png`` (final HS/FA per
    method), ``finetuning.png`` (held-out HS and FA during fine-tuning) and ``alignment.png`` (alignment loss
    and, for the ``align_step`` methods, cos(g_a, g_s) and λ_t)."""
    plt = _plt()
    files = []
    rows = report["methods"]
    colors = _colors([r["method"] for r in rows])
    ab = next((r for r in rows if r["method"] in WEIGHTED_FINETUNE), None)
    if ab is not None:
        tr = ab["trace"]
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        steps = range(1, len(tr["harmful_weight"]) + 1)
        ax.plot(steps, tr["harmful_weight"], color="tab:red", label="harmful samples")
        ax.plot(steps, tr["benign_weight"], color="tab:blue", label="benign samples")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="uniform (SFT)")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("mean weight × batch size")
        ax.set_yscale("log")
        ax.set_title(f"{ab['label']}: sample weights")
        ax.legend()
        files.append(_save(fig, out, "weights.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["hs"] for r in rows], width=0.4, color="tab:red", label="HS (%) ↓")
    ax.bar([i + 0.2 for i in x], [r["fa"] for r in rows], width=0.4, color="tab:green", label="FA (%) ↑")
    ax.set_xticks(list(x), [r["label"] for r in rows])
    ax.set_ylim(0, 118)
    ax.set_ylabel("%")
    ax.set_title(
        f"after fine-tuning: harmful ratio {report['config']['harmful_ratio']:g}, seed {report['config']['seed']}"
    )
    ax.legend(loc="upper center", ncol=2, frameon=False)
    files.append(_save(fig, out, "hs_fa.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for r in rows:
        c = r["curve"]
        a1.plot(c["step"], c["hs"], marker="o", ms=3, color=colors[r["method"]], label=r["label"])
        a2.plot(c["step"], c["fa"], marker="o", ms=3, color=colors[r["method"]], label=r["label"])
    a1.set_title("held-out HS during fine-tuning (%) ↓")
    a2.set_title("held-out FA during fine-tuning (%) ↑")
    for a in (a1, a2):
        a.set_xlabel("fine-tuning step")
        a.set_ylim(-3, 103)
    a1.legend(fontsize=8)
    files.append(_save(fig, out, "finetuning.png"))

    aligned = {}
    for r in rows:  # one curve per alignment (Lisa shares SFT's)
        aligned.setdefault(r["alignment"], r["align_trace"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, tr in aligned.items():
        steps = range(1, len(tr["loss_align"]) + 1)
        a1.plot(steps, tr["loss_align"], color=colors[name], label=METHOD_LABELS[name])
        if "cos" in tr:
            a2.plot(steps, tr["cos"], color=colors[name], label=f"{METHOD_LABELS[name]}: cos(g_a, g_s)")
            a2.plot(steps, [v / 10 for v in tr["lambda_t"]], color=colors[name], ls="--",
                    label=f"{METHOD_LABELS[name]}: λ_t / 10")  # fmt: skip
    a1.set_yscale("log")
    a1.set_xlabel("alignment step")
    a1.set_title("alignment loss L_A (refusals on harmful prompts)")
    a1.legend(fontsize=8)
    a2.axhline(0.0, color="grey", lw=0.6)
    a2.set_xlabel("alignment step")
    a2.set_title("align_step: cos(g_a, g_s) and λ_t")
    if a2.lines[1:]:
        a2.legend(fontsize=8)
    files.append(_save(fig, out, "alignment.png"))
    return files


def plot_summary(summary: dict, out: str) -> list[str]:
    """Several seeds: ``hs_fa.png`` with the mean and the per-seed values of HS and FA per method."""
    plt = _plt()
    rows = summary["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, r in enumerate(rows):
        for dx, key, color in ((-0.2, "hs", "tab:red"), (0.2, "fa", "tab:green")):
            vals = r[key]
            ax.bar(i + dx, sum(vals) / len(vals), width=0.4, color=color, alpha=0.6,
                   label=("HS (%) ↓" if key == "hs" else "FA (%) ↑") if i == 0 else None)  # fmt: skip
            ax.scatter([i + dx] * len(vals), vals, color="black", s=8, zorder=3)
    ax.set_xticks(list(range(len(rows))), [r["label"] for r in rows])
    ax.set_ylim(0, 118)
    ax.set_ylabel("%  (bars: mean; dots: seeds)")
    ax.set_title(f"after fine-tuning, seeds {','.join(map(str, summary['seeds']))}")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return [_save(fig, out, "hs_fa.png")]


# ---------------------------------------------------------------------------------------------------- entry
def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the demo. One seed: writes ``report.md``, ``report.json`` and the plots of :func:`plot` into
    ``cfg.out`` and returns the report dict. Several seeds (``cfg.seeds``): one such run per seed in
    ``cfg.out/seed_<k>/``, then a summary (``report.md``, ``report.json``, ``hs_fa.png``) in ``cfg.out``."""
    cfg.validate()
    seeds = cfg.seed_list()
    if len(seeds) == 1:
        return _run_one(replace(cfg, seed=seeds[0], seeds=()), log)
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    reports = []
    for k in seeds:
        log(f"\n=== seed {k} ===")
        sub = replace(cfg, seed=k, seeds=(), out=os.path.join(cfg.out, f"seed_{k}"))
        reports.append(_run_one(sub, log))
    rows = []
    for m in cfg.methods:
        per = [next(r for r in rep["methods"] if r["method"] == m) for rep in reports]
        rows.append(
            {
                "method": m,
                "label": METHOD_LABELS[m],
                **{key: [r[key] for r in per] for key in ("hs", "fa", "hs_aligned", "p_refuse_aligned")},
                "align_ms": sum(r["align_ms"] for r in per) / len(per),
                "finetune_ms": sum(r["finetune_ms"] for r in per) / len(per),
            }
        )
    summary = {
        "config": _config_dict(cfg),
        "seeds": list(seeds),
        "machine": reports[0]["machine"],
        "methods": rows,
        "base": [rep["base"] for rep in reports],
        "per_seed": [os.path.join(f"seed_{k}", "report.json") for k in seeds],
        "wall_s": time.perf_counter() - t_start,
    }
    table = format_summary_table(rows)
    md = [
        "# antibody_fast demo: several seeds",
        "",
        f"Seeds {', '.join(map(str, seeds))}; {_scenario(cfg)}. Per-seed reports and plots: `seed_<k>/`.",
        "",
        table,
    ]
    return _write_report(cfg, summary, md, table, plot_summary, log, " and seed_<k>/")


def _scenario(cfg: DemoConfig) -> str:
    return (
        f"harmful ratio {cfg.harmful_ratio:g}, {cfg.samples} user samples, {cfg.base_steps}/{cfg.align_steps}/"
        f"{cfg.steps} base/alignment/fine-tuning steps" + (" (quick mode)" if cfg.quick else "")
    )


def _write_report(
    cfg: DemoConfig,
    report: dict,
    md: list[str],
    table: str,
    plots: Callable[[dict, str], list[str]],
    log: Callable[[str], None],
    also: str = "",
) -> dict:
    """Write ``report.md`` (``md`` plus the machine line), the plots and ``report.json`` into ``cfg.out``, log
    the table and the files; returns ``report`` with its ``files``."""
    md = [*md, "", _machine_line(report["machine"], cfg, report["wall_s"]), ""]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    report["files"] = plots(report, cfg.out) + [
        os.path.join(cfg.out, n) for n in ("report.md", "report.json")
    ]
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log("")
    log(table)
    log(f"\nwrote {', '.join(report['files'])}{also}  ({report['wall_s']:.0f} s)")
    sys.stdout.flush()
    return report


def _config_dict(cfg: DemoConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def _machine_line(machine: dict, cfg: DemoConfig, wall_s: float) -> str:
    return (
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores, {cfg.threads} torch "
        f"thread{'s' if cfg.threads != 1 else ''}), "
        f"torch {machine['torch']}; wall {wall_s:.0f} s."
    )


def _run_one(cfg: DemoConfig, log: Callable[[str], None]) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    try:
        torch.manual_seed(cfg.seed)
        runner = Runner(cfg)
        log(f"antibody_fast demo: seed {cfg.seed}, {_scenario(cfg)}")
        t0 = time.perf_counter()
        base_state = runner.base()
        base_model = build_model(cfg)
        base_model.load_state_dict(base_state)
        base_eval = evaluate(base_model, runner.data)
        log(
            f"stage 0 ({time.perf_counter() - t0:.0f} s): base model HS {base_eval['hs']:.1f}% (unaligned), "
            f"base-task accuracy {base_eval['base_acc']:.1f}%, user-task FA {base_eval['fa']:.1f}%"
        )
        aligned: dict[str, tuple[dict, dict, float, dict, dict]] = {}
        rows = []
        for method in cfg.methods:
            a = ALIGNMENT_OF[method]
            if a not in aligned:
                state, adapter, ms, a_trace = runner.align(a, base_state)
                m = build_model(cfg)
                m.load_state_dict(state)
                aligned[a] = (state, adapter, ms, evaluate(m, runner.data), a_trace)
            state, adapter, align_s, a_eval, a_trace = aligned[a]
            model, ft_s, extra = runner.finetune(method, base_state, state, adapter)
            ev = evaluate(model, runner.data)
            extra["curve"]["step"].append(cfg.steps)
            extra["curve"]["hs"].append(ev["hs"])
            extra["curve"]["fa"].append(ev["fa"])
            row = {
                "method": method,
                "label": METHOD_LABELS[method],
                "alignment": a,
                "adapter_mode": ADAPTER_MODE_OF[method],
                "hs": ev["hs"],
                "fa": ev["fa"],
                "base_acc": ev["base_acc"],
                "benign_refusal": ev["benign_refusal"],
                "p_refuse": ev["p_refuse"],
                "hs_aligned": a_eval["hs"],
                "fa_aligned": a_eval["fa"],
                "p_refuse_aligned": a_eval["p_refuse"],
                "align_ms": 1000 * align_s,
                "finetune_ms": 1000 * ft_s,
                "align_trace": a_trace,
                **extra,
            }
            rows.append(row)
            log(
                f"{row['label']:>8}: HS {row['hs']:5.1f}%  FA {row['fa']:5.1f}%  (after alignment: HS "
                f"{row['hs_aligned']:.1f}%, P(refusal) {row['p_refuse_aligned']:.3f})  align "
                f"{row['align_ms']:.1f} ms/step  FT {row['finetune_ms']:.1f} ms/step"
            )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    report = {
        "config": _config_dict(cfg),
        "machine": machine_info(cfg),
        "base": base_eval,
        "methods": rows,
        "results": {r["method"]: {"hs": r["hs"], "fa": r["fa"], "hs_aligned": r["hs_aligned"]} for r in rows},
        "wall_s": time.perf_counter() - t_start,
    }
    table = format_table(rows)
    md = [
        "# antibody_fast demo",
        "",
        f"Seed {cfg.seed}, {_scenario(cfg)}.",
        "",
        table,
        "",
        "P(refusal) after alignment: mean probability that the first answer token to a held-out harmful prompt is "
        "a refusal token (greedy HS 0% only says it is above every other token).",
        "",
        "Adapter in fine-tuning: `continue` keeps training the alignment LoRA (the authors' single LoRA); `merge` "
        "merges it into the weights and trains a fresh LoRA (the authors' pipeline after Vaccine).",
        "",
        f"Base model (before alignment): HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, base-task "
        f"accuracy {base_eval['base_acc']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}.",
    ]
    return _write_report(cfg, report, md, table, plot, log)


__all__ = [
    "ABLATIONS",
    "ADAPTER_MODE_OF",
    "ALL_METHODS",
    "DEFAULT_METHODS",
    "DemoConfig",
    "evaluate",
    "format_summary_table",
    "format_table",
    "greedy",
    "harmful_and_user_scores",
    "make_data",
    "run",
]
