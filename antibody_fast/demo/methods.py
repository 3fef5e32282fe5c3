"""The demos' method table: each row's alignment (stage 1), fine-tuning step (stage 2) and adapter mode.

A row of the report is a :class:`Method`: the alignment it starts from (an entry of :data:`ALIGNMENTS`, trained
once per run and shared by the rows that name it), the fine-tuning step it runs (an entry of
:data:`FINETUNES`) and, from its alignment, how stage 2 uses the alignment adapter (docs/design.md §2.4):
``continue`` keeps training it, ``merge`` merges it into the weights and trains a fresh one (after Vaccine, as
the authors' scripts do).

The step functions import :mod:`antibody_fast.steps` and :mod:`antibody_fast.baselines` when first called, so
the command line can read this table without loading them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


# ----------------------------------------------------------------------------------------------- stage 1
def _sft_align(model, batch, opt, state, config):
    from ..steps import sft_step

    return sft_step(model, batch, opt)


def _vaccine_align(model, batch, opt, state, config):
    from ..baselines import vaccine_step

    return vaccine_step(model, batch, opt)


def _align_step(model, batch, opt, state, config):
    from ..steps import align_step

    return align_step(model, batch, opt, state, config)


def _booster_config():
    from ..steps import AlignConfig

    return AlignConfig(rule="constant", lambda_ref=0.0)


def _antibody_config():
    from ..steps import AlignConfig

    return AlignConfig(rule="cosine")


@dataclass(frozen=True)
class Alignment:
    """Stage 1 of a row. ``step(model, batch, opt, state, config) -> stats``.

    * ``config is None``: a language-model step on the alignment set alone (harmful prompt -> refusal, the
      batch's answer view); ``state`` and ``config`` are unused.
    * else ``align_step`` on (alignment, harmful) pairs, with ``config()`` (an ``AlignConfig``, built once per
      alignment run) and an ``AlignState``; its stats carry ``lambda_t``, ``cos`` and the sharpness terms.

    ``adapter_mode``: how stage 2 uses this alignment's adapter (``continue`` or ``merge``)."""

    step: Callable[..., object]
    config: Callable[[], object] | None = None
    adapter_mode: str = "continue"

    @property
    def pairs(self) -> bool:
        """True for ``align_step`` alignments (batches of alignment and harmful samples)."""
        return self.config is not None


ALIGNMENTS: dict[str, Alignment] = {
    "sft": Alignment(_sft_align),
    "vaccine": Alignment(_vaccine_align, adapter_mode="merge"),
    "booster": Alignment(_align_step, _booster_config),
    "antibody": Alignment(_align_step, _antibody_config),
}
"""Stage 1 by name: SFT (``sft_step``), Vaccine (``vaccine_step``), Booster (``align_step``, rule ``constant``,
``lambda_ref = 0``) and Antibody (``align_step``, rule ``cosine``)."""


# ----------------------------------------------------------------------------------------------- stage 2
def _sft_finetune(model, batch, opt, lisa):
    from ..steps import sft_step

    return sft_step(model, batch, opt)


def _weighted_finetune(model, batch, opt, lisa):
    from ..steps import weighted_step

    return weighted_step(model, batch, opt)


def _lisa_finetune(model, batch, opt, lisa):
    from ..baselines import lisa_step

    state, config = lisa
    return lisa_step(model, batch, opt, state, config)


@dataclass(frozen=True)
class Finetuning:
    """Stage 2 of a row. ``step(model, batch, opt, lisa) -> stats``, ``lisa`` = ``(LisaState, LisaConfig)``.

    ``weighted``: the step takes the whole fine-tuning batch (with its refusal fields) and returns per-sample
    weights, which the demos record; otherwise it takes the batch's answer view. ``alternates``: Lisa's
    alternation, a batch of the alignment set in the alignment phase and of the user's set otherwise."""

    step: Callable[..., object]
    weighted: bool = False
    alternates: bool = False


FINETUNES: dict[str, Finetuning] = {
    "sft": Finetuning(_sft_finetune),
    "lisa": Finetuning(_lisa_finetune, alternates=True),
    "weighted": Finetuning(_weighted_finetune, weighted=True),
}
"""Stage 2 by name: ``sft_step``, Lisa's ``lisa_step`` and Antibody's ``weighted_step``."""


# ------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Method:
    """A row of the report: its label, the alignment it starts from, the fine-tuning step it runs."""

    name: str
    label: str
    alignment: str  # key of ALIGNMENTS
    finetune: str  # key of FINETUNES

    @property
    def adapter_mode(self) -> str:
        return ALIGNMENTS[self.alignment].adapter_mode

    @property
    def align(self) -> Alignment:
        return ALIGNMENTS[self.alignment]

    @property
    def ft(self) -> Finetuning:
        return FINETUNES[self.finetune]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sft", "SFT", "sft", "sft"),
        Method("vaccine", "Vaccine", "vaccine", "sft"),
        Method("lisa", "Lisa", "sft", "lisa"),
        Method("booster", "Booster", "booster", "sft"),
        Method("antibody", "Antibody", "antibody", "weighted"),
        # opt-in stage ablations: each of Antibody's two stages alone
        Method("antibody_align", "Antibody alignment + SFT", "antibody", "sft"),
        Method("antibody_ft", "SFT alignment + Antibody FT", "sft", "weighted"),
    )
}

DEFAULT_METHODS = ("sft", "vaccine", "lisa", "booster", "antibody")
"""The paper's five rows, run by default."""
ABLATIONS = ("antibody_align", "antibody_ft")
"""Opt-in stage ablations: Antibody's alignment followed by plain SFT, and SFT alignment followed by Antibody's
``weighted_step``."""
ALL_METHODS = DEFAULT_METHODS + ABLATIONS
METHOD_LABELS = {name: m.label for name, m in METHODS.items()}
ALIGNMENT_OF = {name: m.alignment for name, m in METHODS.items()}
"""The alignment each row starts from."""
ADAPTER_MODE_OF = {name: m.adapter_mode for name, m in METHODS.items()}
"""How each row's fine-tuning uses its alignment adapter (``continue`` or ``merge``)."""
WEIGHTED_FINETUNE = tuple(name for name, m in METHODS.items() if m.ft.weighted)
"""The rows fine-tuned with ``weighted_step``."""
