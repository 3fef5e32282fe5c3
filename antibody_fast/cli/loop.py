"""The training loop ``align`` and ``finetune`` share: :class:`TrainLoop`.

A command subclasses it (:class:`~antibody_fast.cli.align.AlignRun`,
:class:`~antibody_fast.cli.finetune.FinetuneRun`): its constructor loads the data, the model and the
optimizer (and the checkpoint with ``--resume``), and it defines what one step reads, does, logs and saves.
:meth:`TrainLoop.run` does the rest: lock and record the run directory, the progress bar, the metrics (host
copies on logged steps only), checkpoints every ``--save-every`` steps, ``--stop-after``, and the final
checkpoint and adapter.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..checkpoint import cleanup_temporaries, load_checkpoint, save_checkpoint
from .console import progress_bar, say
from .options import TrainOptions
from .outputs import (
    Metrics,
    checked_extra,
    fingerprint,
    lock_output,
    prepare_output,
    resume_checked,
    save_adapter,
    write_run_config,
)
from .runtime import WORLD

__all__ = ["TrainLoop", "LoggedStats", "make_optimizer"]


def make_optimizer(model, opts: TrainOptions, total_steps: int):
    """AdamW over the trainable parameters and the ``--lr-scheduler`` schedule over ``total_steps``."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = get_scheduler(
        opts.lr_scheduler, opt, num_warmup_steps=opts.warmup_steps, num_training_steps=total_steps
    )
    return opt, sched


class LoggedStats:
    """A :class:`~antibody_fast.steps.StepStats` plus host values (Lisa's phase), with its :meth:`as_dict`."""

    def __init__(self, stats, **more):
        self.stats, self.more = stats, more

    def as_dict(self) -> dict:
        return {**self.stats.as_dict(), **self.more}


class TrainLoop:
    """One training run of ``align`` or ``finetune`` into ``--output``.

    The constructor checks the output directory (nothing is written yet). A subclass's constructor then sets
    :attr:`model`, :attr:`optimizer`, :attr:`scheduler` and :attr:`global_batch` (samples per step over every
    rank), :attr:`dropped` (samples ``--drop-overlong`` left out, by data set) and, resuming,
    :attr:`start` through :meth:`resume`; and it defines:

    * :meth:`make_batch` ``(step) -> (batch on the device, real tokens)``: this rank's slice of the step's
      global batch;
    * :meth:`do_step` ``(batch) -> StepStats`` (or anything with ``as_dict()``);
    * :meth:`log_fields` ``(stats dict) -> (metrics fields, progress-bar fields)``;
    * :meth:`save` ``(step)``: write the checkpoint (every rank calls it);
    * :meth:`run_info`: what ``run_config.json`` records after the options (``option_sources``, the data
      used, ...).
    """

    def __init__(self, opts: TrainOptions, sources: dict):
        self.opts = opts
        self.sources = sources
        self.command = opts.command
        self.out_dir, self.ckpt = prepare_output(opts)
        self.model: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.global_batch = 0
        self.start = 0
        self.dropped: dict[str, int] = {}

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint.pt")

    def resume(self, state) -> dict:
        """Load ``--resume``'s checkpoint into the model, optimizer, scheduler and ``state`` after checking that
        it continues this run; sets :attr:`start` and returns the checkpoint's ``extra``."""
        extra = load_checkpoint(
            self.ckpt,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            **resume_checked(self.ckpt, self.opts, self.out_dir),
        )
        self.start = checked_extra(extra, self.opts, self.ckpt, self.global_batch)["step"]
        return extra

    def write_checkpoint(self, step: int, state, **more) -> None:
        """Write ``OUTPUT/checkpoint.pt``: the trainable weights, optimizer, scheduler, ``state`` and the position
        (command, method, ``step``, global batch, ``more``), with the run's fingerprint. Every rank calls it:
        rank 0 writes (``--fsdp``: every rank writes its shards, rank 0 the file naming them), then a barrier."""
        if not (WORLD.main or self.opts.fsdp):
            WORLD.barrier()
            return
        extra = {
            "command": self.command,
            "method": self.opts.method,
            "step": step,
            "global_batch": self.global_batch,
            **more,
        }
        save_checkpoint(
            self.checkpoint_path,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            extra=extra,
            fingerprint=fingerprint(self.opts),
        )
        if not self.opts.fsdp:  # the sharded save ends with its own barrier
            WORLD.barrier()

    # ------------------------------------------------------------------------------------ defined per command
    def make_batch(self, step: int) -> tuple[Any, int]:
        raise NotImplementedError

    def do_step(self, batch):
        raise NotImplementedError

    def log_fields(self, s: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    def save(self, step: int) -> None:
        raise NotImplementedError

    def run_info(self) -> dict:
        return {"option_sources": self.sources}

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> bool:
        """Train from :attr:`start` to ``--steps`` (or ``--stop-after`` steps). Returns False when stopped early
        by ``--stop-after`` (a checkpoint to resume from is left), else True (the adapter is written)."""
        info = self.run_info()
        if self.opts.drop_overlong:
            info["dropped_overlong"] = self.dropped
            if WORLD.main:
                say(
                    f"{self.command}: --drop-overlong left out "
                    + ", ".join(f"{v} {k}" for k, v in self.dropped.items())
                    + " samples"
                )
        return self._loop(info)

    def _start_outputs(self, info: dict) -> Metrics | None:
        """Rank 0: lock the run directory, clear a killed save's temporaries, record the run; the metrics."""
        if not WORLD.main:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        lock_output(self.out_dir)
        cleanup_temporaries(self.checkpoint_path)
        write_run_config(
            self.out_dir, {"command": self.command, **self.opts.as_dict(), "world_size": WORLD.size, **info}
        )
        resume_step = self.start if self.ckpt is not None else None
        return Metrics(os.path.join(self.out_dir, "metrics.jsonl"), resume_step)

    def _log(self, metrics: Metrics, bar, step: int, stats, t0: float, ntok: int) -> None:
        s = stats.as_dict()  # host copy (synchronises) only on logged steps
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": dt,
            "tokens_per_s": ntok / dt if dt > 0 else None,
        }
        post = {"step_s": f"{dt:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        more_row, more_post = self.log_fields(s)
        row.update(more_row)
        post.update(more_post)
        metrics.write(row)
        bar.set_postfix(post)

    def _loop(self, info: dict) -> bool:
        opts, main = self.opts, WORLD.main
        metrics = self._start_outputs(info)
        total = opts.steps
        end = total if opts.stop_after is None else min(total, self.start + opts.stop_after)
        bar = progress_bar(
            total, self.start, f"{self.command} ({opts.method})", disable=opts.no_progress or not main
        )
        try:
            for step in range(self.start, end):
                batch, ntok = self.make_batch(step)
                t0 = time.perf_counter()
                stats = self.do_step(batch)
                if main and ((step + 1) % opts.log_every == 0 or step + 1 == end):
                    self._log(metrics, bar, step, stats, t0, ntok)
                bar.update(1)
                done = step + 1
                if opts.save_every and done % opts.save_every == 0 and done < total:
                    self.save(done)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        self.save(end)
        if end < total:  # interrupted on purpose (--stop-after): the checkpoint above resumes it
            if main:
                say(f"{self.command}: stopped after step {end}/{total}; resume with --resume")
            return False
        full = None
        if opts.fsdp:  # every rank joins the gather of the trainable weights; rank 0 writes them
            from ..fsdp import full_trainable_state

            full = full_trainable_state(self.model)
        if main:
            meta = {
                "command": self.command,
                "method": opts.method,
                "recipe": opts.recipe,
                "base_model": opts.model,
            }
            if "adapter_mode" in info:
                meta["adapter_mode"] = info["adapter_mode"]
            save_adapter(self.model, self.out_dir, meta, state_dict=full)
        WORLD.barrier()
        return True
