"""TRL integration: Antibody's fine-tuning stage as a TRL ``SFTTrainer``, and our kernel in TRL's fused-head slot
(:func:`use_fused_head`, from :mod:`antibody_fast.integrations.trl_head`).

:class:`AntibodySFTTrainer` is a ``trl.SFTTrainer`` whose optimizer step is :func:`antibody_fast.weighted_step`
(softmax weights over the batch from the completion-vs-refusal log-likelihood ratio, temperature τ; see
``docs/design.md``). It takes TRL's usual ``SFTConfig`` plus a :class:`~antibody_fast.FinetuneConfig`, and TRL's
dataset formats:

* **prompt-completion** text: ``{"prompt": str, "completion": str}``;
* **conversational prompt-completion**: ``{"prompt": [messages], "completion": [messages]}``, rendered with the
  tokenizer's chat template (the prompt with ``add_generation_prompt=True``; the completion is what the template
  appends after it);
* **conversational** ``{"messages": [...]}``: the last assistant message is the completion, the messages before
  it the prompt.

Optional columns: ``is_harmful`` (bool; then the logs carry ``weight_harmful`` / ``weight_benign``) and
``index`` (the refusal pool entry; default: the position). Language-modelling rows (``{"text": ...}``) are refused:
the refusal view needs a prompt to continue. TRL's own dataset preparation (tokenisation, packing) is skipped:
our collator tokenises prompt + completion jointly, as the authors do, truncating on the right at
``args.max_length``. Everything else (gradient accumulation, clipping, LR schedule, bf16, DDP, logging) works as in
:class:`antibody_fast.integrations.AntibodyFinetuneTrainer`, whose update this trainer shares.

:class:`AntibodyAlignmentSFTTrainer` does the same for the alignment stage (:func:`antibody_fast.align_step`, the
update of :class:`antibody_fast.integrations.AntibodyAlignmentTrainer`) on A (harmful prompt -> refusal) and H
(harmful prompt -> harmful answer) rows in the same formats.

Import them as ``from antibody_fast.integrations.trl import AntibodySFTTrainer`` (needs ``pip install trl``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import trl

from .hf import AntibodyAlignmentTrainer, AntibodyFinetuneTrainer
from .trl_head import FusedHeadHandle, remove_fused_head, use_fused_head

__all__ = [
    "AntibodyAlignmentSFTTrainer",
    "AntibodySFTTrainer",
    "FusedHeadHandle",
    "remove_fused_head",
    "to_antibody_examples",
    "use_fused_head",
]


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "AntibodySFTTrainer: conversational data needs processing_class= a tokenizer with a chat template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _split_conversation(tokenizer, prompt_msgs: list, completion_msgs: list) -> tuple[str, str]:
    prompt = _render(tokenizer, prompt_msgs, generation_prompt=True)
    full = _render(tokenizer, list(prompt_msgs) + list(completion_msgs), generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(
            "AntibodySFTTrainer: the chat template does not render the conversation as prompt + completion "
            f"(the rendered prompt {prompt[-60:]!r} is not a prefix of the full conversation)"
        )
    return prompt, full[len(prompt) :]


def to_antibody_examples(rows: Sequence[dict], tokenizer=None) -> list[dict]:
    """TRL rows -> antibody_fast examples ``{"prompt": str, "response": str, "index"?, "is_harmful"?}``.

    Args:
        rows: TRL dataset rows (see the module docstring for the formats).
        tokenizer: needed for conversational rows (chat template).

    Raises:
        ValueError: a row in another format (``text`` language modelling, missing completion, a conversation
            that does not end with an assistant message).
    """
    out = []
    for i, row in enumerate(rows):
        if "messages" in row:
            msgs = list(row["messages"])
            if not msgs or msgs[-1].get("role") != "assistant" or len(msgs) < 2:
                raise ValueError(f"row {i}: 'messages' must end with an assistant message after a prompt")
            prompt, response = _split_conversation(tokenizer, msgs[:-1], msgs[-1:])
        elif "prompt" in row and "completion" in row:
            p, c = row["prompt"], row["completion"]
            if isinstance(p, str) and isinstance(c, str):
                prompt, response = p, c
            elif isinstance(p, list) and isinstance(c, list):
                prompt, response = _split_conversation(tokenizer, p, c)
            else:
                raise ValueError(f"row {i}: prompt and completion must both be text or both be message lists")
        else:
            raise ValueError(
                f"row {i}: AntibodySFTTrainer needs prompt-completion or conversational rows (keys "
                f"{sorted(row)}); language-modelling 'text' rows have no prompt for the refusal view"
            )
        ex = {"prompt": prompt, "response": response}
        for k in ("index", "is_harmful"):
            if k in row and row[k] is not None:
                ex[k] = row[k]
        out.append(ex)
    return out


def _trl_init_args(trainer: str, model, args, processing_class):
    """The checks both TRL trainers share; returns a copy of ``args`` with TRL's dataset preparation skipped
    (our collators tokenise prompt + completion jointly) and the collator's ``max_length``."""
    if processing_class is None:
        raise ValueError(f"{trainer}: processing_class (the tokenizer) is required")
    if isinstance(model, str):
        raise TypeError(f"{trainer}: pass a model object, not a model id")
    if args is None:
        raise ValueError(f"{trainer}: args (a trl.SFTConfig) is required")
    if getattr(args, "packing", False):
        raise ValueError(f"{trainer}: packing is not supported (each sample needs its own weight)")
    args = copy.copy(args)  # the caller's config is not changed
    args.dataset_kwargs = {**(getattr(args, "dataset_kwargs", None) or {}), "skip_prepare_dataset": True}
    return args, getattr(args, "max_length", None) or 1024


def _examples(rows, tokenizer, *, as_dataset: bool):
    """TRL rows -> antibody_fast examples with ``index`` (default: the position), as a ``datasets.Dataset``
    (what ``SFTTrainer`` accepts as its train set) or a list."""
    if rows is None:
        return None
    examples = to_antibody_examples(list(rows), tokenizer)
    for i, ex in enumerate(examples):
        ex.setdefault("index", i)
    if not as_dataset:
        return examples
    import datasets

    return datasets.Dataset.from_list(examples)


class AntibodySFTTrainer(AntibodyFinetuneTrainer, trl.SFTTrainer):
    """``trl.SFTTrainer`` for Antibody's fine-tuning stage: each optimizer step is
    :func:`antibody_fast.weighted_step` on the accumulated micro-batches.

    Args:
        model: HF causal LM (PEFT-wrapped or not; pass a model object, not a hub id).
        args: ``trl.SFTConfig`` (``max_length`` is the collator's right-truncation length; ``max_grad_norm``,
            ``gradient_accumulation_steps``, LR schedule and ``bf16`` are honoured).
        train_dataset: TRL rows (list or ``datasets.Dataset``) in one of the formats of the module docstring.
        processing_class: the tokenizer (required: the rows are text).
        antibody_config: :class:`~antibody_fast.FinetuneConfig` (τ, refusal scoring, impl); clipping and amp
            come from ``args``.
        refusals: the refusal pool (strings or token ids; default: the shipped pool).
        **kwargs: other ``SFTTrainer`` arguments. A custom ``data_collator`` is not supported.
    """

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        *,
        processing_class=None,
        antibody_config=None,
        refusals=None,
        **kwargs,
    ):
        args, max_length = _trl_init_args("AntibodySFTTrainer", model, args, processing_class)
        super().__init__(
            model=model,
            args=args,
            train_dataset=_examples(train_dataset, processing_class, as_dataset=True),
            processing_class=processing_class,
            finetune_config=antibody_config,
            refusals=refusals,
            max_length=max_length,
            **kwargs,
        )


class AntibodyAlignmentSFTTrainer(AntibodyAlignmentTrainer, trl.SFTTrainer):
    """``trl.SFTTrainer`` for Antibody's alignment stage: each optimizer step is :func:`antibody_fast.align_step`
    (the update of :class:`antibody_fast.integrations.AntibodyAlignmentTrainer`), on TRL's dataset formats.

    Args:
        model: HF causal LM (PEFT-wrapped or not; a model object).
        args: ``trl.SFTConfig`` (``max_length``: the collators' right-truncation length; ``max_grad_norm``,
            ``gradient_accumulation_steps``, LR schedule and ``bf16`` are honoured).
        train_dataset: the alignment set A (harmful prompt -> refusal) as TRL rows (module docstring formats).
        harmful_dataset: the harmful set H (harmful prompt -> harmful answer) as TRL rows. Each A row is paired
            with an H row as in the HF trainer (a shuffle seeded with ``harmful_seed``, default ``args.seed``).
        processing_class: the tokenizer (required; chat template for conversational rows).
        align_config: :class:`~antibody_fast.AlignConfig` (``rule``: ``"cosine"`` Antibody, ``"constant"`` with
            ``lambda_ref=0`` Booster); ``refusals``: the pool of the refusal view R (default: shipped pool).
        **kwargs: other ``SFTTrainer`` arguments. A custom ``data_collator`` is not supported.
    """

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        harmful_dataset=None,
        *,
        processing_class=None,
        align_config=None,
        refusals=None,
        harmful_seed: int | None = None,
        **kwargs,
    ):
        args, max_length = _trl_init_args("AntibodyAlignmentSFTTrainer", model, args, processing_class)
        if harmful_dataset is None:
            raise ValueError("AntibodyAlignmentSFTTrainer: harmful_dataset (the harmful set H) is required")
        super().__init__(
            model=model,
            args=args,
            train_dataset=_examples(train_dataset, processing_class, as_dataset=True),
            harmful_dataset=_examples(harmful_dataset, processing_class, as_dataset=False),
            processing_class=processing_class,
            align_config=align_config,
            refusals=refusals,
            max_length=max_length,
            harmful_seed=harmful_seed,
            **kwargs,
        )
