"""FSDP2 against replicated data parallelism for the three steps: time per step and memory per rank.

Run under torchrun (one process per GPU; on CPU, gloo processes):

    torchrun --standalone --nproc-per-node N benchmarks/bench_fsdp.py --device cuda|cpu [--quick] --out DIR

Both layouts run in the same launch on the same model configuration and batches as ``bench_steps.py`` (CPU: the
256-hidden, 4-layer, 32000-vocab Llama in fp32; CUDA: the ~1B Llama in bf16 with fp32 LoRA r=16 on q/k/v and bf16
autocast; ``--quick``: the tiny one). Each rank gets the full per-rank batch of that configuration.

* ``replicated``: every rank holds the whole model; the steps all-reduce the flat gradient (the ``torchrun``
  path without ``--fsdp``).
* ``fsdp2``: :func:`antibody_fast.fsdp.shard_model` (each decoder layer, then the root); FSDP2's reduce-scatter
  fills the flat gradient.

Per step (``weighted_step``, ``sft_step``, ``align_step``): the median wall time of ``--steps`` timed steps (the
slowest rank's, after a barrier) and, on CUDA, the peak allocated memory per rank during those steps. For both
layouts: the bytes of parameters, gradients and optimizer state this rank holds (model state per rank). Rank 0
writes ``fsdp-<device slug>-<date>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_steps import _config, _data, _model  # noqa: E402

from antibody_fast.distributed import local_tensor  # noqa: E402
from antibody_fast.fsdp import shard_model  # noqa: E402
from antibody_fast.steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step, weighted_step  # noqa: E402


def _state_bytes(model, opt) -> dict[str, int]:
    """Bytes this rank holds: every parameter (local shards under FSDP2), the trainable ones' gradients, and the
    optimizer state."""
    params = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    grads = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(
        local_tensor(v).numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, warmup: int, steps: int) -> tuple[float, int | None]:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)  # NCCL: on the GPU
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's time
        times.append(float(dt))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return statistics.median(times), peak


def _run_layout(layout, cfg, ft, ab, dev, device, dtype, amp, args) -> list[dict]:
    model, opt = _model(cfg, dev, dtype)
    if layout == "fsdp2":  # the parameters become DTensors: the optimizer is built on them
        shard_model(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opt.defaults["lr"])
    fcfg = FinetuneConfig(amp_dtype=amp)
    acfg = AlignConfig(amp_dtype=amp)
    state = AlignState()
    steps = {
        "weighted_step": lambda: weighted_step(model, ft, opt, fcfg),
        "sft_step": lambda: sft_step(model, ft.answer_view(), opt, fcfg),
        "align_step": lambda: align_step(model, ab, opt, state, acfg),
    }
    rows = []
    for name, fn in steps.items():
        median, peak = _time(fn, device, args.warmup, args.steps)
        rows.append({"layout": layout, "step": name, "median_s": median, "peak_mem_bytes": peak})
    held = _state_bytes(model, opt)
    for r in rows:
        r["state_bytes"] = held
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    else:
        dev = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, ft, ab = _data(_config(device, args.quick), dev)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    amp = torch.bfloat16 if device == "cuda" else None
    rows = []
    for layout in ("replicated", "fsdp2"):
        rows += _run_layout(layout, cfg, ft, ab, dev, device, dtype, amp, args)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        from antibody_fast.bench import device_info

        info = device_info(device)
        date = _dt.date.today().isoformat()
        stem = f"fsdp-{info['slug']}-{date}{'-quick' if args.quick else ''}"
        os.makedirs(args.out, exist_ok=True)
        doc = {
            "device": info,
            "world_size": world,
            "config": cfg.name,
            "torch": torch.__version__,
            "rows": rows,
        }
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(doc, f, indent=2)
        lines = [
            f"# FSDP2 vs replicated, {info['device_name']}, {world} rank(s), {cfg.name}, {date}",
            "",
            "| layout | step | median s/step | peak allocated / rank | params+grads+optimizer / rank |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f} MiB"
            lines.append(
                f"| {r['layout']} | {r['step']} | {r['median_s']:.3f} | {peak} | "
                f"{r['state_bytes']['total'] / 2**20:.1f} MiB |"
            )
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see antibody_fast.cli.exit_process: the gloo teardown can abort at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
