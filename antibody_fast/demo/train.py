"""The toy demo's world and its three stages: data (:func:`make_data`), model (:func:`build_model`), greedy
evaluation (:func:`evaluate`) and the :class:`Runner` of stage 0 (base training), stage 1 (alignment) and
stage 2 (fine-tuning), whose steps come from the method table (:mod:`antibody_fast.demo.methods`)."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import language as L
from ._loop import Batches, masked_mean, progress_bar
from .config import LORA_TARGETS, DemoConfig
from .methods import ALIGNMENTS, METHOD_LABELS, METHODS


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
        it = Batches(len(self.data.base), cfg.base_batch_size, cfg.seed + 1)
        with progress_bar(cfg.base_steps, "stage 0: base training", cfg) as bar:
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
        model = add_lora(
            model, r=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, targets=LORA_TARGETS, seed=self.cfg.seed
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
        """Stage 1 (alignment ``method``, a key of :data:`~antibody_fast.demo.methods.ALIGNMENTS`) from
        ``base_state`` with a fresh LoRA: (state dict with the adapter merged, the adapter's parameters (name ->
        tensor), seconds per step, per-step trace: ``loss_align`` and, for ``align_step`` methods,
        ``lambda_t``, ``cos`` = cos(g_a, g_s) and ``sharpness``)."""
        from ..steps import AlignState

        cfg = self.cfg
        spec = ALIGNMENTS[method]
        model, opt = self._lora_model(base_state, cfg.align_lr)
        ia = Batches(len(self.data.align), cfg.batch_size, cfg.seed + 2)
        ih = Batches(len(self.data.harmful), cfg.batch_size, cfg.seed + 3)
        state = AlignState()
        acfg = spec.config() if spec.pairs else None
        total = 0.0
        trace: dict[str, list] = {"loss_align": []}
        if spec.pairs:
            trace.update(lambda_t=[], cos=[], sharpness=[])
        with progress_bar(cfg.align_steps, f"stage 1: {METHOD_LABELS[method]} alignment", cfg) as bar:
            for _ in range(cfg.align_steps):
                a_idx = ia.next_indices()
                if spec.pairs:
                    h_idx = ih.next_indices()
                    batch = self.align_collate(
                        self._examples(self.data.align, a_idx, refuse=True),
                        self._examples(self.data.harmful, h_idx),
                    )
                else:
                    batch = self.ft_collate(self._examples(self.data.align, a_idx, refuse=True)).answer_view()
                stats, dt = self._time(lambda b=batch: spec.step(model, b, opt, state, acfg))
                if spec.pairs:
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
        """Stage 2 of row ``method`` in its adapter mode: ``continue`` trains ``adapter`` (the alignment adapter)
        on ``base_state``; ``merge`` trains a fresh adapter on ``merged_state``."""
        from ..baselines import LisaConfig, LisaState

        cfg = self.cfg
        row = METHODS[method]
        ft = row.ft
        if row.adapter_mode == "continue":
            model, opt = self._lora_model(
                base_state, cfg.finetune_lr, cfg.finetune_optimizer, adapter=adapter
            )
        else:
            model, opt = self._lora_model(merged_state, cfg.finetune_lr, cfg.finetune_optimizer)
        iu = Batches(len(self.data.user), cfg.batch_size, cfg.seed + 4)
        ia = Batches(len(self.data.align), cfg.batch_size, cfg.seed + 5)
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
        with progress_bar(cfg.steps, f"stage 2: {row.label} fine-tuning", cfg) as bar:
            for step in range(1, cfg.steps + 1):
                if ft.alternates and lstate.phase(lcfg) == "align":
                    idx = ia.next_indices()
                    batch = self.ft_collate(self._examples(self.data.align, idx, refuse=True)).answer_view()
                else:
                    idx = iu.next_indices()
                    batch = self.ft_collate(self._examples(self.data.user, idx))
                # weighted_step and Lisa take the batch as collated, sft_step its answer view
                lm = batch if ft.weighted or ft.alternates else batch.answer_view()
                stats, dt = self._time(lambda b=lm: ft.step(model, b, opt, (lstate, lcfg)))
                if ft.weighted:
                    w = stats.weights.detach() * len(idx)  # uniform weights = 1
                    flags = batch.is_harmful
                    trace["harmful_weight"].append(masked_mean(w, flags))
                    trace["benign_weight"].append(masked_mean(w, ~flags))
                trace["loss"].append(stats.loss.detach())
                total += dt
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:  # (not timed)
                    hs, fa = harmful_and_user_scores(model, self.data)
                    curve["step"].append(step)
                    curve["hs"].append(hs)
                    curve["fa"].append(fa)
                bar.update()
        trace = {k: [float(x) for x in v] for k, v in trace.items()}
        extra = {"lisa": asdict(lcfg)} if ft.alternates else {}
        return model, total / cfg.steps, {"trace": trace, "curve": curve, **extra}
