"""Two-process gloo test on CPU: the distributed update equals one process on the concatenated batch.

Rank 0 gets 3 samples and rank 1 gets 2 (each rank collates its own samples, so even the prompt padding
differs). ``weighted_step`` needs the softmax over the global batch and the global loss denominator;
``align_step`` and ``sft_step`` need global token counts. The models are wrapped in
``DistributedDataParallel``: the steps run the wrapped module and reduce the flat gradients themselves.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import join_spawned, make_examples, make_refusal_pool, tiny_model, trainable_params

from antibody_fast.data import AlignCollator, FinetuneCollator
from antibody_fast.distributed import all_gather_variable, all_reduce_sum, is_distributed
from antibody_fast.steps import AlignConfig, AlignState, align_step, sft_step, weighted_step
from antibody_fast.testing import assert_close

WORLD = 2
SPLITS = [(0, 3), (3, 5)]  # unequal per-rank batch sizes
STEPS = 2
REL = 1e-5
TIMEOUT_S = 300


def _data(step, lo, hi):
    pool = make_refusal_pool(seed=100)
    ft = FinetuneCollator(refusals=pool)(make_examples(5, seed=step)[lo:hi])
    al = make_examples(5, seed=50 + step, harmful_every=None)[lo:hi]
    hm = make_examples(5, seed=60 + step, harmful_every=1)[lo:hi]
    return ft, AlignCollator(refusals=pool)(al, hm)


def _train(model, lo, hi):
    """The same schedule on every rank (and in the single-process run): weighted, align, sft steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = AlignState()
    stats = []
    for step in range(STEPS):
        ft, ab = _data(step, lo, hi)
        st = weighted_step(model, ft, opt)
        stats.append({"weights": st.weights.clone(), "loss": st.loss.clone()})
        align_step(model, ab, opt, state, AlignConfig(momentum=0.5))
        sft_step(model, ft.answer_view(), opt)
    return stats, state


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert is_distributed()
        # helpers: unequal all-gather and in-place sum
        g = all_gather_variable(torch.arange(rank + 2, dtype=torch.float32) + 10 * rank)
        assert g.tolist() == [0.0, 1.0, 10.0, 11.0, 12.0], g
        assert all_reduce_sum(torch.tensor([rank + 1.0])).item() == 3.0
        model = tiny_model("llama")
        model = torch.nn.parallel.DistributedDataParallel(model)
        lo, hi = SPLITS[rank]
        stats, state = _train(model, lo, hi)
        inner = model.module
        torch.save(
            {"params": trainable_params(inner), "stats": stats, "lambda": state.lambda_ema},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_update_equals_single_process_on_concatenated_batch(tmp_path):
    init_file = tmp_path / "init"
    ctx = mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=False)
    join_spawned(ctx, TIMEOUT_S, "the DDP workers")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = tiny_model("llama")
    stats, state = _train(single, 0, 5)
    expected = trainable_params(single)

    for r, res in enumerate(ranks):
        for k, v in expected.items():
            scale = float(v.abs().max())
            assert_close(res["params"][k], v, atol=REL * scale, rtol=REL, name=f"rank {r} {k}")
        assert_close(res["lambda"], state.lambda_ema, name=f"rank {r} lambda EMA")
    # the weights are a softmax over the global batch: the ranks' pieces concatenate to the single run's
    for step in range(STEPS):
        got = torch.cat([ranks[r]["stats"][step]["weights"] for r in range(WORLD)])
        assert_close(got, stats[step]["weights"], name=f"step {step} weights")
        for r in range(WORLD):
            assert_close(ranks[r]["stats"][step]["loss"], stats[step]["loss"], name=f"step {step} loss")
