"""What a run writes into ``--output``, and the checks that protect it.

* the run directory: refused when it holds a checkpoint and ``--resume`` is not given; held with an exclusive
  lock (``OUTPUT/.lock``) for the whole run;
* ``metrics.jsonl`` (:class:`Metrics`), ``run_config.json``;
* the checkpoint's fingerprint (the options that define the run) and the resume checks;
* ``adapter/`` (PEFT ``save_pretrained`` plus its metadata), replaced atomically, never with non-finite values;
* ``finetune``'s per-sample suppression report, its AUROC (:func:`auroc`) and histogram.

Every file is written atomically (:mod:`antibody_fast._io`). Only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence

from .._io import atomic_directory, atomic_open, atomic_write_text
from .console import CLIError, say
from .options import TrainOptions
from .runtime import WORLD

__all__ = [
    "prepare_output",
    "lock_output",
    "release_locks",
    "write_run_config",
    "Metrics",
    "fingerprint",
    "resume_checked",
    "checked_extra",
    "save_adapter",
    "auroc",
    "suppression_outputs",
]


# ----------------------------------------------------------------------------------------------- run directory
def prepare_output(opts: TrainOptions) -> tuple[str, str | None]:
    """Check the output directory (nothing is written here). Returns (dir, checkpoint path if resuming)."""
    out = opts.output
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--output {out!r} exists and is not a directory")
    if opts.resume:
        if not os.path.isfile(ckpt):
            raise CLIError(f"--resume: no checkpoint at {ckpt!r}")
        return out, ckpt
    if os.path.isfile(ckpt):
        raise CLIError(
            f"--output {out!r} already holds a checkpoint: pass --resume, or choose another --output"
        )
    return out, None


_LOCKS: list = []  # open lock files of this process (released by release_locks())


def lock_output(out_dir: str) -> None:
    """Hold ``OUTPUT/.lock`` (an exclusive ``flock``, released when the process ends, even on SIGKILL): a second
    run into the same ``--output`` stops with exit 2 instead of overwriting the first one's files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return
    f = open(os.path.join(out_dir, ".lock"), "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CLIError(
            f"--output {out_dir!r} is in use by another antibody-fast run (lock {os.path.join(out_dir, '.lock')!r}); "
            "wait for it to finish or choose another --output"
        ) from None
    _LOCKS.append(f)


def release_locks() -> None:
    """Release every output lock this process holds."""
    while _LOCKS:
        _LOCKS.pop().close()


def write_run_config(out_dir: str, config: dict) -> None:
    atomic_write_text(os.path.join(out_dir, "run_config.json"), json.dumps(config, indent=2))


class Metrics:
    """Append-only JSONL of logged steps; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            keep = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        break
            atomic_write_text(path, "".join(keep))
        elif resume_step is None and os.path.exists(path):
            os.unlink(path)
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the whole run

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------------------------- resume
# options that do not change what a run computes (everything else is part of the resume fingerprint)
_NOT_FINGERPRINTED = frozenset(
    (
        "output",
        "resume",
        "force",
        "save_every",
        "fsdp",
        "stop_after",
        "no_progress",
        "log_every",
        "device",
        "impl",
        "config",
        "recipe",  # the resolved values are fingerprinted, not where they came from
        "dry_run",
        # per-process batch: the global batch (batch size x processes) is what defines the data order; it is
        # checked on resume by checked_extra, so a run may resume with another number of processes
        "batch_size",
        "steps",  # checked on its own: steps >= completed
    )
)


def fingerprint(opts: TrainOptions) -> dict:
    """The options that define a run (data, method, seed, model, LoRA shape, hyper-parameters), as plain values."""
    fp = {"command": opts.command}
    for k, v in sorted(opts.as_dict().items()):
        if k not in _NOT_FINGERPRINTED:
            fp[k] = list(v) if isinstance(v, (list, tuple)) else v
    return fp


def resume_checked(ckpt: str, opts: TrainOptions, out_dir: str) -> dict:
    """Load-time fingerprint arguments for ``load_checkpoint``; with ``--force`` a mismatch is recorded."""
    fp = fingerprint(opts)
    if opts.force:
        from ..checkpoint import fingerprint_diff, read_checkpoint

        diff = fingerprint_diff(read_checkpoint(ckpt).get("fingerprint"), fp)
        if diff and WORLD.main:
            say(f"{opts.command}: --force: resuming despite changed options: {'; '.join(diff)}")
            with open(os.path.join(out_dir, "resume_overrides.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "differing": diff}) + "\n")
    return {"fingerprint": fp, "force": bool(opts.force)}


def checked_extra(extra, opts: TrainOptions, path: str, global_batch: int) -> dict:
    """The checkpoint's ``extra`` after checking that it continues this run: same command and method, same
    global batch (the data order), no more steps done than ``--steps``."""
    command, method, steps = opts.command, opts.method, opts.steps
    if (
        not isinstance(extra, dict)
        or extra.get("command") != command
        or not isinstance(extra.get("step"), int)
    ):
        raise CLIError(f"--resume: {path!r} is not a checkpoint of `antibody-fast {command}`")
    saved_method = extra.get("method", "antibody" if command == "align" else method)
    if saved_method != method:
        raise CLIError(
            f"--resume: {path!r} was written by --method {saved_method}, this run is --method {method}"
        )
    saved = extra.get("global_batch", global_batch)
    if saved != global_batch:
        raise CLIError(
            f"--resume: {path!r} was written with {saved} samples per step (--batch-size x processes), this run "
            f"has {global_batch}: the data order would not continue; keep --batch-size x processes the same"
        )
    if extra["step"] > steps:
        raise CLIError(
            f"--resume: {path!r} has already completed {extra['step']} steps, more than --steps {steps}"
        )
    return extra


# ----------------------------------------------------------------------------------------------- adapter
def save_adapter(model, out_dir: str, metadata: dict | None = None, state_dict: dict | None = None) -> str:
    """PEFT ``save_pretrained`` into a temporary directory, plus ``metadata`` (which command and method made
    the adapter: :func:`antibody_fast.models.write_adapter_metadata`), then renamed to ``out_dir/adapter``.
    An adapter with non-finite values is never written (the last good one is kept). ``state_dict``: the
    gathered trainable weights of a sharded model (:func:`antibody_fast.fsdp.full_trainable_state`)."""
    import torch

    from ..checkpoint import NonFiniteCheckpointError
    from ..models import write_adapter_metadata

    if state_dict is None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        tensors = state_dict
    bad = [n for n, p in tensors.items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteCheckpointError(
            f"refusing to write the adapter: non-finite values (NaN/inf) in {', '.join(bad[:3])}"
            f"{'...' if len(bad) > 3 else ''}; the last good checkpoint is kept"
        )
    final = os.path.join(out_dir, "adapter")
    with atomic_directory(final) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        if metadata:
            write_adapter_metadata(tmp, **metadata)
    return final


# ----------------------------------------------------------------------------------------------- suppression
def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` separating positives from negatives: P(pos > neg) + P(tie)/2
    (Mann-Whitney U / (n_pos n_neg), average ranks for ties). NaN if a class is empty."""
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    allv = sorted([(s, 1) for s in scores_pos] + [(s, 0) for s in scores_neg], key=lambda t: t[0])
    rank_sum = 0.0
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        rank_sum += avg * sum(1 for k in range(i, j + 1) if allv[k][1] == 1)
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def suppression_outputs(out_dir: str, examples: list[dict], sum_w, count, batch_size: int) -> dict | None:
    """CSV of each sample's mean weight (and ``relative_weight`` = mean weight x batch size, 1.0 = the uniform
    weight of plain SFT); AUROC + PNG histogram when harmful flags exist."""
    sums = sum_w.detach().cpu().tolist()
    counts = count.detach().cpu().tolist()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "is_harmful", "task", "times_seen", "mean_weight", "relative_weight"])
    benign, harmful = [], []
    for ex, s, c in zip(examples, sums, counts):
        mean = s / c if c > 0 else float("nan")
        flag = ex.get("is_harmful")
        w.writerow(
            [
                ex["index"],
                "" if flag is None else int(bool(flag)),
                ex.get("task", ""),
                int(c),
                "" if c == 0 else f"{mean:.8g}",
                "" if c == 0 else f"{mean * batch_size:.6g}",
            ]
        )
        if c > 0 and flag is not None:
            (harmful if flag else benign).append(mean)
    atomic_write_text(os.path.join(out_dir, "suppression_report.csv"), buf.getvalue())
    if not harmful and not benign:
        return None
    summary = {
        "num_seen": int(sum(1 for c in counts if c > 0)),
        "num_harmful_seen": len(harmful),
        "num_benign_seen": len(benign),
        "mean_weight_harmful": sum(harmful) / len(harmful) if harmful else None,
        "mean_weight_benign": sum(benign) / len(benign) if benign else None,
        "auroc_benign_vs_harmful": None,
        "auroc_definition": "P(mean weight of a benign sample > that of a harmful sample); 1.0 = perfect suppression",
    }
    if harmful and benign:
        summary["auroc_benign_vs_harmful"] = auroc(benign, harmful)
        summary["histogram"] = _histogram(os.path.join(out_dir, "suppression_hist.png"), benign, harmful)
    atomic_write_text(os.path.join(out_dir, "suppression_summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _histogram(path: str, benign: list[float], harmful: list[float]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = min(benign + harmful), max(benign + harmful)
    bins = 30 if hi > lo else 1
    ax.hist(
        benign, bins=bins, range=(lo, hi) if hi > lo else None, alpha=0.6, label=f"benign (n={len(benign)})"
    )
    ax.hist(
        harmful,
        bins=bins,
        range=(lo, hi) if hi > lo else None,
        alpha=0.6,
        label=f"harmful (n={len(harmful)})",
    )
    ax.set_xlabel("mean sample weight over training")
    ax.set_ylabel("samples")
    ax.set_title("Antibody per-sample suppression")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return os.path.basename(path)
