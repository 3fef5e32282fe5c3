"""The real-model demo's data, evaluation and stages: :func:`make_data` (the natural-language scenario),
:func:`generate` / :func:`evaluate` (greedy HS, FA, over-refusal, P(refusal)) and :class:`RealRunner` (stage 1,
alignment, and stage 2, fine-tuning, on one seed, with the steps of the method table
:mod:`antibody_fast.demo.methods`)."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import natural as nat
from ._loop import Batches, masked_mean, progress_bar
from .methods import ALIGNMENTS, METHODS
from .real_config import LORA_TARGETS, RealConfig


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class RealData:
    align: list[
        dict
    ]  # A: harmful prompt -> pool refusal (stream "align"; with benign_mix also benign -> helpful)
    harmful: list[dict]  # H: harmful prompt -> compliance answer (stream "align_h")
    user: list[dict]  # the poisoned user set
    eval_harmful: list[nat.Item]
    eval_task: list[nat.Item]
    eval_benign: list[nat.Item]
    labels: tuple[str, ...]
    harmful_ratio: float  # of ``user``


def make_data(cfg: RealConfig, seed: int) -> RealData:
    sc = nat.NaturalScenario(seed=seed, task=cfg.task)
    align = sc.alignment_records(cfg.align_samples, benign_mix=cfg.benign_mix)
    harmful = nat.records(sc.harmful(cfg.align_samples, "train", stream="align_h"))
    user = nat.records(sc.user_set(cfg.samples, cfg.harmful_ratio))
    return RealData(
        align=align,
        harmful=harmful,
        user=user,
        eval_harmful=sc.harmful(cfg.eval_harmful, "eval"),
        eval_task=sc.task(cfg.eval_task, "eval"),
        eval_benign=sc.helpful(cfg.eval_benign, "eval"),
        labels=tuple(sc.labels),
        harmful_ratio=cfg.harmful_ratio,
    )


# ------------------------------------------------------------------------------------------------ evaluation
def refusal_first_tokens(tok) -> list[int]:
    """Distinct first token ids of the pool refusals when they follow the assistant header."""
    from ..data.refusals import DEFAULT_REFUSALS

    head = len(tok(nat.chat_prompt("x"))["input_ids"])
    ids = set()
    for r in DEFAULT_REFUSALS:
        full = tok(nat.chat_prompt("x") + r)["input_ids"]
        ids.add(full[head])
    return sorted(ids)


@torch.no_grad()
def generate(
    model, tok, items: Sequence[nat.Item], max_new_tokens: int, batch_size: int = 8, first_ids=None, bar=None
) -> tuple[list[str], float | None]:
    """Greedy answers to ``items`` and, if ``first_ids`` is given, the mean first-token probability mass on
    those ids (P(refusal))."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was = model.training
    model.eval()
    texts: list[str] = []
    mass: list[torch.Tensor] = []
    try:
        for s in range(0, len(items), batch_size):
            rows = [tok(nat.chat_prompt(it.request))["input_ids"] for it in items[s : s + batch_size]]
            w = max(map(len, rows))
            ids = torch.full((len(rows), w), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), w), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, w - len(r) :] = torch.tensor(r)
                mask[i, w - len(r) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
                output_scores=first_ids is not None,
                return_dict_in_generate=True,
            )
            texts += tok.batch_decode(out.sequences[:, w:], skip_special_tokens=True)
            if first_ids is not None:
                mass.append(out.scores[0].float().softmax(-1)[:, first_ids].sum(-1))
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was)
    return texts, (float(torch.cat(mass).mean()) if mass else None)


def evaluate(model, tok, data: RealData, cfg: RealConfig, first_ids, *, benign: bool, desc: str = "eval"):
    """HS, P(refusal), FA (and the task answers' refusal rate), and with ``benign`` the benign over-refusal."""
    n = len(data.eval_harmful) + len(data.eval_task) + (len(data.eval_benign) if benign else 0)
    with progress_bar(n, desc, cfg) as bar:
        h, p_ref = generate(model, tok, data.eval_harmful, cfg.hs_new_tokens, first_ids=first_ids, bar=bar)
        t, _ = generate(model, tok, data.eval_task, cfg.fa_new_tokens, bar=bar)
        out = {
            "hs": nat.harmful_score([it.request for it in data.eval_harmful], h),
            "p_refuse": p_ref,
            "fa": nat.fine_tune_accuracy(t, [it.label for it in data.eval_task], data.labels),
            "task_refusal": nat.refusal_rate(t),
            "task_predicted": {
                lab: sum(nat.parse_label(a, data.labels) == lab for a in t) for lab in data.labels
            },
            "examples_harmful": [[it.request, a] for it, a in list(zip(data.eval_harmful, h))[:3]],
            "examples_task": [[it.request, a] for it, a in list(zip(data.eval_task, t))[:3]],
        }
        if benign:
            b, _ = generate(model, tok, data.eval_benign, cfg.hs_new_tokens, bar=bar)
            out["benign_refusal"] = nat.refusal_rate(b)
            out["examples_benign"] = [[it.request, a] for it, a in list(zip(data.eval_benign, b))[:2]]
    return out


# ----------------------------------------------------------------------------------------------- the stages
class RealRunner:
    """The two stages on one seed; ``base`` is the pretrained model (never modified)."""

    def __init__(self, cfg: RealConfig, seed: int, base, tok):
        from ..data import AlignCollator, FinetuneCollator

        self.cfg, self.seed, self.base, self.tok = cfg, seed, base, tok
        self.data = make_data(cfg, seed)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.ft_collate = FinetuneCollator(tok, max_length=cfg.max_length, pad_token_id=pad)
        self.align_collate = AlignCollator(tok, max_length=cfg.max_length, pad_token_id=pad)
        self.first_ids = refusal_first_tokens(tok)

    def lora_model(self, adapter: dict[str, torch.Tensor] | None = None, *, merge_then_fresh: bool = False):
        """A copy of the base model with LoRA (r, alpha on q/k/v); ``adapter`` loads trained LoRA weights.
        ``merge_then_fresh``: merge ``adapter`` into the weights and add a fresh LoRA (Vaccine's pipeline)."""
        from ..models import add_lora

        cfg = self.cfg
        m = copy.deepcopy(self.base)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            peft = add_lora(m, r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=LORA_TARGETS, seed=self.seed)
            if adapter is not None:
                named = dict(peft.named_parameters())
                with torch.no_grad():
                    for k, v in adapter.items():
                        named[k].copy_(v)
            if merge_then_fresh:
                merged = peft.merge_and_unload()
                peft = add_lora(
                    merged, r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=LORA_TARGETS, seed=self.seed + 1
                )
        peft.train()
        return peft

    def optimizer(self, model, lr: float):
        """AdamW over the trainable (LoRA) parameters of ``model``, with the run's weight decay."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)

    @staticmethod
    def adapter_state(model) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    def align(self, method: str) -> tuple[dict[str, torch.Tensor], float, dict[str, list[float]], object]:
        """Stage 1 (alignment ``method``, a key of :data:`~antibody_fast.demo.methods.ALIGNMENTS`): (adapter
        weights, seconds per step, trace, the aligned model)."""
        from ..steps import AlignState

        cfg, d = self.cfg, self.data
        spec = ALIGNMENTS[method]
        model = self.lora_model()
        opt = self.optimizer(model, cfg.align_lr)
        ia = Batches(len(d.align), cfg.batch_size, self.seed + 2)
        ih = Batches(len(d.harmful), cfg.batch_size, self.seed + 3)
        state = AlignState()
        acfg = spec.config() if spec.pairs else None
        trace: dict[str, list] = {"loss_align": [], "step_s": []}
        if spec.pairs:
            trace.update(lambda_t=[], cos=[], sharpness=[])
        with progress_bar(cfg.align_steps, f"stage 1: {method} alignment", cfg) as bar:
            for _ in range(cfg.align_steps):
                a = [d.align[i] for i in ia.next_indices()]
                if spec.pairs:
                    batch = self.align_collate(a, [d.harmful[i] for i in ih.next_indices()])
                else:
                    batch = self.ft_collate(a).answer_view()
                t0 = time.perf_counter()
                stats = spec.step(model, batch, opt, state, acfg)
                loss = stats.loss.detach()
                if spec.pairs:
                    trace["lambda_t"].append(float(stats.lambda_t))
                    trace["cos"].append(float(stats.cos))
                    trace["sharpness"].append(float(stats.loss_harmful - stats.loss_perturbed))
                trace["step_s"].append(time.perf_counter() - t0)
                trace["loss_align"].append(float(loss))
                bar.update()
        return self.adapter_state(model), sum(trace["step_s"]) / cfg.align_steps, trace, model

    def lisa_config(self):
        from ..baselines import LisaConfig

        steps = self.cfg.steps
        cycle = max(2, steps // self.cfg.lisa_cycles)
        ka = max(1, cycle // 10)
        # the authors' warm-up (warmup_fraction 0.1 of the run) needs the run's total step count
        return LisaConfig(align_steps=ka, finetune_steps=cycle - ka, total_steps=steps)

    def finetune(self, method: str, adapter: dict[str, torch.Tensor]):
        """Stage 2 of row ``method`` from the alignment ``adapter`` (continued, or merged before a fresh LoRA in
        the ``merge`` adapter mode): (model, seconds per step, {trace, curve[, lisa]})."""
        from ..baselines import LisaState

        cfg, d = self.cfg, self.data
        row = METHODS[method]
        ft = row.ft
        model = self.lora_model(adapter, merge_then_fresh=(row.adapter_mode == "merge"))
        opt = self.optimizer(model, cfg.finetune_lr)
        iu = Batches(len(d.user), cfg.batch_size, self.seed + 4)
        ia = Batches(len(d.align), cfg.batch_size, self.seed + 5)
        lcfg = self.lisa_config() if ft.alternates else None
        lstate = LisaState()
        trace: dict[str, list] = {"harmful_weight": [], "benign_weight": [], "loss": [], "step_s": []}
        curve: dict[str, list] = {"step": [], "hs": [], "fa": []}
        with progress_bar(cfg.steps, f"stage 2: {method} fine-tuning", cfg) as bar:
            for step in range(1, cfg.steps + 1):
                if ft.alternates and lstate.phase(lcfg) == "align":
                    batch = self.ft_collate([d.align[i] for i in ia.next_indices()])
                else:
                    batch = self.ft_collate([d.user[i] for i in iu.next_indices()])
                t0 = time.perf_counter()
                # weighted_step takes the batch as collated, the other steps its answer view
                stats = ft.step(model, batch if ft.weighted else batch.answer_view(), opt, (lstate, lcfg))
                trace["step_s"].append(time.perf_counter() - t0)
                if ft.weighted:
                    w = stats.weights.detach() * len(batch.index)  # uniform = 1
                    flags = batch.is_harmful
                    trace["harmful_weight"].append(float(masked_mean(w, flags)))
                    trace["benign_weight"].append(float(masked_mean(w, ~flags)))
                trace["loss"].append(float(stats.loss))
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    ev = evaluate(model, self.tok, d, cfg, None, benign=False, desc=f"eval @ step {step}")
                    curve["step"].append(step)
                    curve["hs"].append(ev["hs"])
                    curve["fa"].append(ev["fa"])
                bar.update()
        extra = {"lisa": asdict(lcfg)} if lcfg is not None else {}
        return model, sum(trace["step_s"]) / cfg.steps, {"trace": trace, "curve": curve, **extra}


def merge_adapter(model):
    """``model`` with its LoRA adapter merged into the weights (in place; the PEFT wrapper is dropped)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return model.merge_and_unload()
