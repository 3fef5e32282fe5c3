"""The real-model demo: SmolLM2-135M-Instruct, the natural-language scenario, all five methods, on CPU.

``antibody-fast demo --model smollm2 [options]`` runs the two stages of the paper on a pretrained instruct model
(:func:`antibody_fast.models.smollm2`) with the scenario of :mod:`antibody_fast.demo.natural`:

1. **Alignment** (provider; LoRA r = 32, alpha = 4 on q/k/v, AdamW lr 5e-4, weight decay 0.1, batch 8):
   ``sft`` (``sft_step`` on harmful -> refusal pairs A), ``vaccine`` (:func:`~antibody_fast.baselines.vaccine_step`,
   rho 5), ``booster`` (``align_step``, rule ``constant``, ``lambda_ref = 0``: eta 5, rho 0.1) and ``antibody``
   (``align_step``, rule ``cosine``: eta 5, rho 0.1, lambda_ref 0.05, momentum 0.99). A and the harmful set H
   (harmful prompt -> compliance answer) are drawn from independent training streams.
2. **Fine-tuning** (user) on the poisoned user set (the task's items plus a fraction ``harmful_ratio`` of harmful
   items), with the authors' pipeline: fine-tuning **continues the alignment adapter** (the same LoRA weights
   stay trainable, with a new optimizer), except after Vaccine, whose adapter is merged into the weights and a
   fresh LoRA is trained (as the Vaccine code does). ``sft_step`` for SFT, Vaccine and Booster,
   :func:`~antibody_fast.baselines.lisa_step` (alternating with A, on the SFT-aligned adapter, with the authors'
   warm-up, ``warmup_fraction`` 0.1 of the run) for Lisa, Antibody's
   ``weighted_step`` (tau 1) for Antibody. The SFT alignment is trained once and serves both SFT and Lisa.

The fine-tuning learning rate and step count are **not** the paper's: at the paper's 1e-5 this LoRA scale
(alpha / r = 0.125) does not learn the task in a CPU-sized run. They are read from the committed SFT-only
calibration (:data:`CALIBRATION_FILE`, written by ``scripts/calibrate_smollm2.py``): the smallest learning rate,
searched upward from 1e-5, at which *SFT's* FA reaches its plateau well above chance. Antibody's numbers play no
part in it (docs/design.md: only the SFT baseline may calibrate).

Evaluation (greedy, batched, left padding):

* **HS**: % of held-out harmful prompts (templates and fillers never seen in training) whose answer of at most
  ``hs_new_tokens`` (24) tokens contains no refusal keyword (:func:`antibody_fast.demo.natural.harmful_score`);
* **FA**: % of held-out task prompts whose first label word (:func:`~antibody_fast.demo.natural.parse_label`,
  answer of at most ``fa_new_tokens`` tokens) is the gold label;
* **over-refusal**: % of held-out benign requests refused, after alignment;
* **P(refusal)**: mean probability, over the held-out harmful prompts, that the first answer token is the first
  token of a pool refusal (``"I"`` of ``"I'm sorry"``, ``"As"`` of ``"As an AI"`` ...). It is a coarse reading:
  a compliant answer may also start with one of those tokens.

Diagnostics and plots are the toy demo's (:mod:`antibody_fast.demo.run`): ``alignment.png`` (alignment loss,
λ_t and cos(g_a, g_s)), ``weights.png`` (Antibody's mean weight of harmful vs benign samples per step),
``finetuning.png`` (HS/FA every ``eval_every`` steps), ``hs_fa.png``, plus ``p_refusal.png`` (P(refusal) after
each stage). Times per step are wall-clock of the step call only (evaluation excluded).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import natural as nat

DEFAULT_METHODS = ("sft", "vaccine", "lisa", "booster", "antibody")
ALIGNMENT_OF = {
    "sft": "sft",
    "vaccine": "vaccine",
    "lisa": "sft",
    "booster": "booster",
    "antibody": "antibody",
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "smollm2_calibration.json"
"""The committed SFT-only calibration of the fine-tuning learning rate and step count."""


@dataclass
class RealConfig:
    """Everything that defines a real-model run.

    ``finetune_lr`` / ``steps`` ``None``: the calibrated values of :data:`CALIBRATION_FILE`."""

    seed: int = 0
    seeds: tuple[int, ...] = ()
    harmful_ratio: float = 0.2
    task: str = "topic"
    methods: tuple[str, ...] = DEFAULT_METHODS
    samples: int = 160  # user fine-tuning set
    steps: int | None = None  # fine-tuning steps (None: calibrated)
    align_steps: int = 20
    align_samples: int = 160  # A and H sizes
    batch_size: int = 8
    align_lr: float = 5e-4  # the paper's
    finetune_lr: float | None = None  # None: calibrated
    weight_decay: float = 0.1
    lora_rank: int = 32
    lora_alpha: float = 4.0
    max_length: int = 128  # prompt + answer; harmful answers are cut on the right (the authors' rule)
    eval_harmful: int = 32
    eval_task: int = 32
    eval_benign: int = 16
    eval_every: int = 0  # held-out HS/FA every N fine-tuning steps (0: end only)
    hs_new_tokens: int = 24
    fa_new_tokens: int = 6
    lisa_cycles: int = 5  # Lisa's 100/900 alternation scaled to about this many cycles over the run
    threads: int = (
        1  # 1: a second OpenMP thread on a busy 2-core CPU made small matmuls ~10x slower (measured)
    )
    out: str = "antibody_demo_smollm2"
    quick: bool = False
    progress: bool = True
    calibration: str = field(default_factory=lambda: str(CALIBRATION_FILE))

    @classmethod
    def quick_config(cls, **overrides) -> RealConfig:
        """A run of a few minutes (numbers are not meaningful beyond showing the pipeline works)."""
        base = dict(
            samples=48,
            steps=6,
            align_steps=4,
            align_samples=32,
            eval_harmful=8,
            eval_task=8,
            eval_benign=8,
            eval_every=0,
            hs_new_tokens=16,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        if not 0.0 <= self.harmful_ratio <= 1.0:
            raise ValueError(f"--harmful-ratio must be in [0, 1], got {self.harmful_ratio}")
        if self.task not in nat.TASKS:
            raise ValueError(f"task must be one of {nat.TASKS}, got {self.task!r}")
        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: choose a non-empty subset of {','.join(DEFAULT_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("--methods lists a method twice")
        for name in ("align_steps", "batch_size", "align_samples", "samples", "threads", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_harmful", "eval_task", "eval_benign", "hs_new_tokens", "fa_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ValueError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if self.samples < self.batch_size:
            raise ValueError(f"--samples ({self.samples}) must be >= the batch size ({self.batch_size})")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if any(s < 0 for s in self.seed_list()) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct non-negative integers")

    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.seed,)

    def resolved(self) -> RealConfig:
        """This configuration with ``finetune_lr`` and ``steps`` filled in from the calibration file."""
        if self.finetune_lr is not None and self.steps is not None:
            return self
        cal = load_calibration(self.calibration)
        if cal.get("task") != self.task:
            raise ValueError(
                f"the calibration {self.calibration} is for task {cal.get('task')!r}, not {self.task!r}; "
                "pass --finetune-lr and --steps"
            )
        return replace(
            self,
            finetune_lr=self.finetune_lr
            if self.finetune_lr is not None
            else float(cal["chosen"]["finetune_lr"]),
            steps=self.steps if self.steps is not None else int(cal["chosen"]["steps"]),
        )


def load_calibration(path: str | os.PathLike = CALIBRATION_FILE) -> dict:
    """The calibration JSON (``task``, ``chosen: {finetune_lr, steps}``, the search and its rule)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no fine-tuning calibration at {p}: run `python scripts/calibrate_smollm2.py` or pass --finetune-lr "
            "and --steps"
        )
    cal = json.loads(p.read_text())
    if "chosen" not in cal or "finetune_lr" not in cal["chosen"] or "steps" not in cal["chosen"]:
        raise ValueError(f"{p}: not a calibration file (no chosen.finetune_lr / chosen.steps)")
    return cal


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class RealData:
    align: list[dict]  # A: harmful prompt -> pool refusal (stream "align")
    harmful: list[dict]  # H: harmful prompt -> compliance answer (stream "align_h")
    user: list[dict]  # the poisoned user set
    eval_harmful: list[nat.Item]
    eval_task: list[nat.Item]
    eval_benign: list[nat.Item]
    labels: tuple[str, ...]


def make_data(cfg: RealConfig, seed: int) -> RealData:
    sc = nat.NaturalScenario(seed=seed, task=cfg.task)
    align = sc.alignment_records(cfg.align_samples)
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
    )


class Batches:
    """Cycles through a list in shuffled epochs (own RNG)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.rng, self.order = n, batch_size, random.Random(seed), []

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.bs:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


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
    with _pbar(n, desc, cfg) as bar:
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


def _pbar(total: int, desc: str, cfg: RealConfig):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


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

    def _opt(self, model, lr: float):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)

    @staticmethod
    def adapter_state(model) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    def align(self, method: str) -> tuple[dict[str, torch.Tensor], float, dict[str, list[float]], object]:
        """Stage 1: (adapter weights, seconds per step, trace, the aligned model)."""
        from ..baselines import vaccine_step
        from ..steps import AlignConfig, AlignState, align_step, sft_step

        cfg, d = self.cfg, self.data
        model = self.lora_model()
        opt = self._opt(model, cfg.align_lr)
        ia = Batches(len(d.align), cfg.batch_size, self.seed + 2)
        ih = Batches(len(d.harmful), cfg.batch_size, self.seed + 3)
        state = AlignState()
        acfg = {
            "antibody": AlignConfig(rule="cosine"),
            "booster": AlignConfig(rule="constant", lambda_ref=0.0),
        }.get(method)
        trace: dict[str, list] = {"loss_align": [], "step_s": []}
        if acfg is not None:
            trace.update(lambda_t=[], cos=[], sharpness=[])
        with _pbar(cfg.align_steps, f"stage 1: {method} alignment", cfg) as bar:
            for _ in range(cfg.align_steps):
                a = [d.align[i] for i in ia.next_indices()]
                if acfg is None:
                    batch = self.ft_collate(a).answer_view()
                    t0 = time.perf_counter()
                    if method == "sft":
                        stats = sft_step(model, batch, opt)
                    else:
                        stats = vaccine_step(model, batch, opt)
                    loss = stats.loss.detach()
                else:
                    batch = self.align_collate(a, [d.harmful[i] for i in ih.next_indices()])
                    t0 = time.perf_counter()
                    stats = align_step(model, batch, opt, state, acfg)
                    loss = stats.loss.detach()
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
        """Stage 2 from the alignment ``adapter``: (model, seconds per step, {trace, curve[, lisa]})."""
        from ..baselines import LisaState, lisa_step
        from ..steps import sft_step, weighted_step

        cfg, d = self.cfg, self.data
        model = self.lora_model(adapter, merge_then_fresh=(method == "vaccine"))
        opt = self._opt(model, cfg.finetune_lr)
        iu = Batches(len(d.user), cfg.batch_size, self.seed + 4)
        ia = Batches(len(d.align), cfg.batch_size, self.seed + 5)
        lcfg = self.lisa_config() if method == "lisa" else None
        lstate = LisaState()
        trace: dict[str, list] = {"harmful_weight": [], "benign_weight": [], "loss": [], "step_s": []}
        curve: dict[str, list] = {"step": [], "hs": [], "fa": []}
        with _pbar(cfg.steps, f"stage 2: {method} fine-tuning", cfg) as bar:
            for step in range(1, cfg.steps + 1):
                if method == "lisa" and lstate.phase(lcfg) == "align":
                    batch = self.ft_collate([d.align[i] for i in ia.next_indices()])
                else:
                    batch = self.ft_collate([d.user[i] for i in iu.next_indices()])
                t0 = time.perf_counter()
                if method == "antibody":
                    stats = weighted_step(model, batch, opt)
                    trace["step_s"].append(time.perf_counter() - t0)
                    w = stats.weights.detach() * len(batch.index)  # uniform = 1
                    flags = batch.is_harmful
                    trace["harmful_weight"].append(_masked_mean(w, flags))
                    trace["benign_weight"].append(_masked_mean(w, ~flags))
                elif method == "lisa":
                    stats = lisa_step(model, batch.answer_view(), opt, lstate, lcfg)
                    trace["step_s"].append(time.perf_counter() - t0)
                else:
                    stats = sft_step(model, batch.answer_view(), opt)
                    trace["step_s"].append(time.perf_counter() - t0)
                trace["loss"].append(float(stats.loss))
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    ev = evaluate(model, self.tok, d, cfg, None, benign=False, desc=f"eval @ step {step}")
                    curve["step"].append(step)
                    curve["hs"].append(ev["hs"])
                    curve["fa"].append(ev["fa"])
                bar.update()
        extra = {"lisa": asdict(lcfg)} if lcfg is not None else {}
        return model, sum(trace["step_s"]) / cfg.steps, {"trace": trace, "curve": curve, **extra}


def _merged(model):
    """``model`` with its LoRA adapter merged into the weights (in place; the PEFT wrapper is dropped)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return model.merge_and_unload()


def _masked_mean(w: torch.Tensor, m: torch.Tensor) -> float:
    n = int(m.sum())
    return float((w * m).sum() / n) if n else float("nan")


# ---------------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    from .run import _markdown

    header = ["Method", "HS (%) ↓", "FA (%) ↑", "HS after alignment (%)", "FA after alignment (%)",
              "benign refusals after alignment (%)", "P(refusal) after alignment / after FT",
              "alignment s/step", "fine-tuning s/step"]  # fmt: skip
    cells = [
        [
            r["label"],
            f"{r['hs']:.1f}",
            f"{r['fa']:.1f}",
            f"{r['hs_aligned']:.1f}",
            f"{r['fa_aligned']:.1f}",
            f"{r['benign_refusal_aligned']:.1f}",
            f"{r['p_refuse_aligned']:.3f} / {r['p_refuse']:.3f}",
            f"{r['align_ms'] / 1000:.2f}",
            f"{r['finetune_ms'] / 1000:.2f}",
        ]
        for r in rows
    ]
    return _markdown(header, "lrrrrrrrr", cells)


def plot(report: dict, out: str) -> list[str]:
    """The toy demo's plots (:func:`antibody_fast.demo.run.plot`) plus ``p_refusal.png``."""
    from . import run as toy

    files = toy.plot(report, out)
    plt = toy._plt()
    rows = report["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = range(len(rows))
    base = report["base"]["p_refuse"]
    ax.axhline(base, color="grey", lw=0.8, ls="--", label=f"base model ({base:.3f})")
    ax.bar([i - 0.2 for i in x], [r["p_refuse_aligned"] for r in rows], width=0.4, color="tab:blue",
           label="after alignment")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [r["p_refuse"] for r in rows], width=0.4, color="tab:red",
           label="after fine-tuning")  # fmt: skip
    ax.set_xticks(list(x), [r["label"] for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("P(first answer token starts a refusal)")
    ax.set_title("held-out harmful prompts")
    ax.legend(fontsize=8)
    files.append(toy._save(fig, out, "p_refusal.png"))
    return files


def _scenario(cfg: RealConfig) -> str:
    return (
        f"SmolLM2-135M-Instruct, task {cfg.task}, harmful ratio {cfg.harmful_ratio:g}, {cfg.samples} user samples, "
        f"{cfg.align_steps}/{cfg.steps or 'calibrated'} alignment/fine-tuning steps at batch {cfg.batch_size}, "
        f"fine-tuning lr {cfg.finetune_lr or 'calibrated'} (calibrated on SFT alone)"
        + (" (quick mode)" if cfg.quick else "")
    )


def _run_one(cfg: RealConfig, seed: int, base, tok, log: Callable[[str], None]) -> dict:
    from . import run as toy

    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    runner = RealRunner(cfg, seed, base, tok)
    log(f"antibody_fast real-model demo: seed {seed}, {_scenario(cfg)}")
    base_eval = evaluate(base, tok, runner.data, cfg, runner.first_ids, benign=True, desc="eval: base model")
    log(
        f"base model: HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, benign refusals "
        f"{base_eval['benign_refusal']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}"
    )
    aligned: dict[str, tuple] = {}
    for a in dict.fromkeys(ALIGNMENT_OF[m] for m in cfg.methods):  # stage 1 of every method first
        adapter, s_step, a_trace, model = runner.align(a)
        model = _merged(model)  # the adapter is saved: evaluate the merged weights (faster generation)
        a_eval = evaluate(
            model, tok, runner.data, cfg, runner.first_ids, benign=True, desc=f"eval: {a} aligned"
        )
        del model
        aligned[a] = (adapter, s_step, a_trace, a_eval)
        log(
            f"{a} alignment: {s_step:.2f} s/step; HS {a_eval['hs']:.1f}%, FA {a_eval['fa']:.1f}%, benign "
            f"refusals {a_eval['benign_refusal']:.1f}%, P(refusal) {a_eval['p_refuse']:.3f}"
        )
    # stage 2: the calibrated fine-tuning lr / steps are read here (stage 1 does not use them)
    runner.cfg = cfg = cfg.resolved()
    log(f"fine-tuning: lr {cfg.finetune_lr:g}, {cfg.steps} steps")
    rows = []
    for method in cfg.methods:
        a = ALIGNMENT_OF[method]
        adapter, s_align, a_trace, a_eval = aligned[a]
        model, s_ft, extra = runner.finetune(method, adapter)
        model = _merged(model)
        ev = evaluate(model, tok, runner.data, cfg, runner.first_ids, benign=False, desc=f"eval: {method}")
        del model
        for k in ("step", "hs", "fa"):
            extra["curve"][k].append(cfg.steps if k == "step" else ev[k])
        row = {
            "method": method,
            "label": toy.METHOD_LABELS[method],
            "alignment": a,
            "hs": ev["hs"],
            "fa": ev["fa"],
            "p_refuse": ev["p_refuse"],
            "task_refusal": ev["task_refusal"],
            "task_predicted": ev["task_predicted"],
            "hs_aligned": a_eval["hs"],
            "fa_aligned": a_eval["fa"],
            "benign_refusal_aligned": a_eval["benign_refusal"],
            "p_refuse_aligned": a_eval["p_refuse"],
            "align_ms": 1000 * s_align,
            "finetune_ms": 1000 * s_ft,
            "align_trace": a_trace,
            "eval_aligned": a_eval,
            "eval": ev,
            **extra,
        }
        rows.append(row)
        log(
            f"{row['label']:>8}: HS {row['hs']:5.1f}%  FA {row['fa']:5.1f}%  (after alignment: HS "
            f"{row['hs_aligned']:.1f}%, P(refusal) {row['p_refuse_aligned']:.3f})  align {s_align:.2f} s/step  "
            f"FT {s_ft:.2f} s/step"
        )
    report = {
        "config": {**toy._config_dict(cfg), "seed": seed, "seeds": []},
        "machine": toy.machine_info(cfg),
        "base": base_eval,
        "methods": rows,
        "results": {r["method"]: {"hs": r["hs"], "fa": r["fa"], "hs_aligned": r["hs_aligned"]} for r in rows},
        "wall_s": time.perf_counter() - t_start,
    }
    table = format_table(rows)
    md = [
        "# antibody_fast demo: SmolLM2-135M-Instruct (real model)",
        "",
        f"Seed {seed}, {_scenario(cfg)}.",
        "",
        table,
        "",
        f"Base model (before alignment): HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, benign refusals "
        f"{base_eval['benign_refusal']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}.",
        "",
        "HS: % of held-out harmful prompts answered without a refusal keyword (greedy, "
        f"{cfg.hs_new_tokens} new tokens); FA: % of held-out {cfg.task} prompts whose first label word is right; "
        "P(refusal): mean probability that the first answer token to a held-out harmful prompt is the first "
        "token of a pool refusal. Times: wall-clock per step call (evaluation excluded).",
    ]
    return toy._write_report(cfg, report, md, table, plot, log)


def run(cfg: RealConfig, log: Callable[[str], None] = print, *, model_and_tokenizer=None) -> dict:
    """Run the real-model demo (one seed: report in ``cfg.out``; several: ``cfg.out/seed_<k>/`` + summary).

    ``model_and_tokenizer``: ``(model, tokenizer)`` to use instead of SmolLM2 (tests: a tiny Llama with a
    byte-level tokenizer); the model is not modified."""
    from ..models import smollm2
    from . import run as toy

    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        if model_and_tokenizer is None:
            base, tok = smollm2()
            log(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s")
        else:
            base, tok = model_and_tokenizer
            base = copy.deepcopy(base)
        base.requires_grad_(False)
        seeds = cfg.seed_list()
        if len(seeds) == 1:
            return _run_one(replace(cfg, seed=seeds[0], seeds=()), seeds[0], base, tok, log)
        os.makedirs(cfg.out, exist_ok=True)
        reports = []
        for k in seeds:
            log(f"\n=== seed {k} ===")
            sub = replace(cfg, seed=k, seeds=(), out=os.path.join(cfg.out, f"seed_{k}"))
            reports.append(_run_one(sub, k, base, tok, log))
    finally:
        torch.set_num_threads(threads)
    c0 = reports[0]["config"]
    cfg = replace(cfg, finetune_lr=c0["finetune_lr"], steps=c0["steps"])
    rows = []
    for m in cfg.methods:
        per = [next(r for r in rep["methods"] if r["method"] == m) for rep in reports]
        rows.append(
            {
                "method": m,
                "label": toy.METHOD_LABELS[m],
                **{key: [r[key] for r in per] for key in ("hs", "fa", "hs_aligned", "p_refuse_aligned")},
                "align_ms": sum(r["align_ms"] for r in per) / len(per),
                "finetune_ms": sum(r["finetune_ms"] for r in per) / len(per),
            }
        )
    summary = {
        "config": toy._config_dict(cfg),
        "seeds": list(seeds),
        "machine": reports[0]["machine"],
        "methods": rows,
        "base": [rep["base"] for rep in reports],
        "per_seed": [os.path.join(f"seed_{k}", "report.json") for k in seeds],
        "wall_s": time.perf_counter() - t_start,
    }
    table = toy.format_summary_table(rows)
    md = [
        "# antibody_fast demo: SmolLM2-135M-Instruct, several seeds",
        "",
        f"Seeds {', '.join(map(str, seeds))}; {_scenario(cfg)}. Per-seed reports and plots: `seed_<k>/`.",
        "",
        table,
    ]
    return toy._write_report(cfg, summary, md, table, toy.plot_summary, log, " and seed_<k>/")


__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_METHODS",
    "RealConfig",
    "RealRunner",
    "load_calibration",
    "merge_reports",
    "run",
]


def merge_reports(paths: Sequence[str], out: str, log: Callable[[str], None] = print) -> dict:
    """One report (table, plots) from single-seed reports of the same configuration that ran disjoint subsets
    of the methods (e.g. in parallel processes: every stage is seeded, so a method's numbers do not depend on
    which other methods ran in the same process). ``wall_s`` is the longest part's; ``parts`` lists them."""
    from . import run as toy

    reps = [json.loads(Path(p).read_text()) for p in paths]
    c0 = {k: v for k, v in reps[0]["config"].items() if k not in ("methods", "out")}
    for r in reps[1:]:
        c = {k: v for k, v in r["config"].items() if k not in ("methods", "out")}
        if c != c0:
            diff = sorted(k for k in set(c) | set(c0) if c.get(k) != c0.get(k))
            raise ValueError(f"merge_reports: the reports differ in configuration ({', '.join(diff)})")
    rows = {row["method"]: row for r in reps for row in r["methods"]}
    order = [m for m in DEFAULT_METHODS if m in rows]
    kw = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in c0.items()
        if k in RealConfig.__dataclass_fields__
    }
    cfg = replace(RealConfig(**kw), methods=tuple(order), out=out)
    os.makedirs(out, exist_ok=True)
    report = {
        **reps[0],
        "config": toy._config_dict(cfg),
        "methods": [rows[m] for m in order],
        "results": {m: {k: rows[m][k] for k in ("hs", "fa", "hs_aligned")} for m in order},
        "wall_s": max(r["wall_s"] for r in reps),
        "parts": [
            {"file": str(p), "methods": [x["method"] for x in r["methods"]], "wall_s": r["wall_s"]}
            for p, r in zip(paths, reps)
        ],  # fmt: skip
    }
    table = format_table(report["methods"])
    base_eval = report["base"]
    md = [
        "# antibody_fast demo: SmolLM2-135M-Instruct (real model)",
        "",
        f"Seed {cfg.seed}, {_scenario(cfg)}.",
        "",
        table,
        "",
        f"Base model (before alignment): HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, benign refusals "
        f"{base_eval['benign_refusal']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}.",
        "",
        f"Ran as {len(reps)} processes in parallel ({'; '.join(','.join(p['methods']) for p in report['parts'])}); "
        "wall time below = the longest part. Times per step are contended (other jobs shared the 2 cores).",
    ]
    return toy._write_report(cfg, report, md, table, plot, log)
