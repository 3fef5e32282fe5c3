"""FSDP2 on CPU (2 gloo processes): every step on a ``fully_shard``-ed tiny Llama + LoRA equals one process on the
concatenated batch -- weights, per-sample weights, λ_t, losses and the clip norm.

Rank 0 gets 3 samples and rank 1 gets 2 (each rank collates its own samples, so the padding differs too). The
trainable LoRA tensors are DTensors sharded on dim 0; the flat ops work on the local shards with all-reduced
norms and dot products, and FSDP2's reduce-scatter (set to sum) fills the flat gradient. The model is wrapped by
:func:`antibody_fast.fsdp.shard_model` (each layer, then the root) and, in the second case, as accelerate's FSDP2
plugin does it, on a Gemma-2 (lm_head tied to the embeddings, logit soft-cap).
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import join_spawned, tiny_model
from test_ddp import _data

from antibody_fast.baselines import LisaConfig, LisaState, VaccineConfig, lisa_step, vaccine_step
from antibody_fast.steps import (
    AlignConfig,
    AlignState,
    FinetuneConfig,
    align_step,
    sft_step,
    weighted_step,
)
from antibody_fast.testing import assert_close

WORLD = 2
SPLITS = [(0, 3), (3, 5)]  # unequal per-rank batch sizes
STEPS = 2
REL = 1e-5
TIMEOUT_S = 300
CASES = {
    "llama-shard_model": ("llama", {}),
    "gemma2-tied-accelerate": ("gemma2", {}),
    # LoRA rank 1: lora_A is [1, hidden], so rank 1's shard of it is empty (and FSDP2 pads it)
    "llama-r1-empty-shards": ("llama", {"r": 1}),
}


def _scalar_stats(st, keys):
    return {k: getattr(st, k).detach().clone() for k in keys if getattr(st, k, None) is not None}


def _train(model, lo, hi, device="cpu"):
    """The same schedule on every rank (and in the single-process run): each step kind twice."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state, lisa = AlignState(), LisaState()
    ft_cfg = FinetuneConfig(max_grad_norm=0.05)  # small, so the clip is active and its norm matters
    out = []
    for step in range(STEPS):
        ft, ab = (b.to(device) for b in _data(step, lo, hi))
        rec = {}
        st = weighted_step(model, ft, opt, ft_cfg)
        rec["weighted"] = _scalar_stats(st, ("weights", "d", "loss", "grad_norm"))
        st = align_step(model, ab, opt, state, AlignConfig(momentum=0.5))
        rec["align"] = _scalar_stats(
            st, ("loss", "grad_norm", "lambda_t", "dots", "loss_harmful", "loss_perturbed")
        )
        st = sft_step(model, ft.answer_view(), opt)
        rec["sft"] = _scalar_stats(st, ("loss", "grad_norm"))
        st = lisa_step(model, ab.align, opt, lisa, LisaConfig(align_steps=1, finetune_steps=1, rho=0.5))
        rec["lisa"] = _scalar_stats(st, ("loss", "grad_norm", "proximal"))
        st = vaccine_step(model, ab.align, opt, VaccineConfig(rho=0.5))
        rec["vaccine"] = _scalar_stats(st, ("loss", "grad_norm", "perturbation_grad_norm"))
        out.append(rec)
    return out, state


def _make(case):
    arch, kw = CASES[case]
    return tiny_model(arch, **kw)


def _worker(rank, body, init_file, world, *args):
    """An ``mp.spawn`` worker: join the gloo group, run ``body(rank, *args)``, then collect the DTensors (their
    device mesh holds the group) while the interpreter is alive and destroy the group. A gloo thread released
    during the interpreter's teardown aborts the process (README "Scaling out")."""
    torch.set_num_threads(1)
    cuda = "cuda" in args
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        body(rank, *args)
    finally:
        gc.collect()
        dist.destroy_process_group()


def _equality(rank, out_dir, case):
    from torch.distributed.fsdp import fully_shard

    from antibody_fast.fsdp import shard_model

    model = _make(case)
    if case == "gemma2-tied-accelerate":  # accelerate's FSDP2 plugin: each layer, then the root
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        shard_model(model)
    sharded = [p for p in model.parameters() if p.requires_grad]
    assert all(type(p).__name__ == "DTensor" for p in sharded)
    lo, hi = SPLITS[rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats, state = _train(model, lo, hi)
    # the refusals were scored as a continuation of the prompt's key/value cache, not by the fallback
    fallbacks = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert not fallbacks, fallbacks
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(
            {"params": params, "stats": stats, "lambda": state.lambda_ema},
            os.path.join(out_dir, "fsdp.pt"),
        )
    per_rank = [s["weighted"]["weights"] for s in stats]
    torch.save(per_rank, os.path.join(out_dir, f"weights{rank}.pt"))


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_steps_equal_single_process_on_concatenated_batch(tmp_path, case):
    init_file = tmp_path / "init"
    ctx = mp.spawn(
        _worker, args=(_equality, str(init_file), WORLD, str(tmp_path), case), nprocs=WORLD, join=False
    )
    join_spawned(ctx, TIMEOUT_S, "the FSDP2 workers")
    got = torch.load(tmp_path / "fsdp.pt")

    single = _make(case)
    stats, state = _train(single, 0, 5)
    expected = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert got["params"].keys() == expected.keys()
    for k, v in expected.items():
        scale = float(v.abs().max())
        assert_close(got["params"][k], v, atol=REL * scale, rtol=REL, name=f"{case} {k}")
    assert_close(got["lambda"], state.lambda_ema, name=f"{case} lambda EMA")
    for step in range(STEPS):
        for kind, exp in stats[step].items():
            for key, v in exp.items():
                if key == "weights" or key == "d":  # per-sample: rank 0's share
                    v = v[: SPLITS[0][1]]
                assert_close(got["stats"][step][kind][key], v, name=f"{case} step {step} {kind}.{key}")
        # the per-sample weights are a softmax over the global batch: the ranks' pieces concatenate
        w = torch.cat([torch.load(tmp_path / f"weights{r}.pt")[step] for r in range(WORLD)])
        assert_close(w, stats[step]["weighted"]["weights"], name=f"{case} step {step} weights")


# ----------------------------------------------------------------------------------------------- reliability
def _reliability(rank, out_dir):
    """(1) a non-finite update on one rank's shards only: every rank skips the step (the guard's flag is AND-ed
    over the ranks), parameters and optimizer state unchanged bitwise; (2) a sharded checkpoint with one changed
    byte in a shard file is refused on every rank before anything changes; (3) an intact one restores exactly."""
    from antibody_fast.checkpoint import load_checkpoint, save_checkpoint
    from antibody_fast.fsdp import shard_model

    model = shard_model(tiny_model("llama"))
    # head_args on a still-sharded trainable lm_head: the full weight, whose gradient is summed over the ranks
    from antibody_fast._model import head_args

    lm = model.get_base_model().lm_head
    lm.weight.requires_grad_(True)
    w, _ = head_args(lm, torch.float32)
    assert type(w) is torch.Tensor and w.shape == lm.weight.shape
    (w * (rank + 1.0)).sum().backward()
    g = lm.weight.grad.to_local()
    assert torch.equal(g, torch.full_like(g, 3.0)), "the gathered lm_head's gradient is not summed over ranks"
    lm.weight.requires_grad_(False)
    lm.weight.grad = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    lo, hi = SPLITS[rank]
    ft, _ = _data(0, lo, hi)
    weighted_step(model, ft, opt)  # creates the optimizer state
    local = lambda: [p.to_local().clone() for p in params]  # noqa: E731
    state = lambda: [opt.state[p]["exp_avg"].to_local().clone() for p in params]  # noqa: E731
    before, st_before = local(), state()
    if rank == 1:  # poison one moment of rank 1's shard: only rank 1's new θ is non-finite
        opt.state[params[0]]["exp_avg"].to_local().fill_(float("inf"))
        st_before = state()
    st = weighted_step(model, ft, opt)
    assert bool(st.skipped), f"rank {rank}: the step was not skipped"
    for a, b in zip(local(), before):
        assert torch.equal(a, b), f"rank {rank}: a parameter changed in a skipped step"
    for a, b in zip(state(), st_before):
        assert torch.equal(a, b), f"rank {rank}: the optimizer state changed in a skipped step"
    # the poisoned moment is still there: a checkpoint is refused on every rank, before any file is written
    from antibody_fast.checkpoint import NonFiniteCheckpointError

    with pytest.raises(NonFiniteCheckpointError, match="exp_avg" if rank == 1 else "another rank"):
        save_checkpoint(os.path.join(out_dir, "bad.pt"), model, opt)
    assert not any(f.startswith("bad.pt") for f in os.listdir(out_dir))
    if rank == 1:
        opt.state[params[0]]["exp_avg"].to_local().zero_()
    weighted_step(model, ft, opt)

    path = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(path, model, opt, extra={"step": 3})
    saved, st_saved = local(), state()
    weighted_step(model, ft, opt)  # moves on
    moved = local()
    shard_dir = [d for d in os.listdir(out_dir) if d.startswith("ckpt.pt.shards-")]
    assert len(shard_dir) == 1, shard_dir
    dist.barrier()
    shard_files = sorted(f for f in os.listdir(os.path.join(out_dir, shard_dir[0])) if f.endswith(".distcp"))
    victim = os.path.join(out_dir, shard_dir[0], shard_files[0])
    if rank == 0:
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(victim + ".bak", "wb").write(open(victim, "rb").read())
        open(victim, "wb").write(bytes(data))
    dist.barrier()
    try:
        load_checkpoint(path, model, opt)
    except ValueError as e:
        assert "do not match" in str(e), e
    else:
        raise AssertionError("a corrupted shard was accepted")
    for a, b in zip(local(), moved):
        assert torch.equal(a, b), "a refused checkpoint changed the parameters"
    dist.barrier()
    if rank == 0:
        os.replace(victim + ".bak", victim)
    dist.barrier()
    extra = load_checkpoint(path, model, opt)
    assert extra == {"step": 3}
    for a, b in zip(local(), saved):
        assert torch.equal(a, b), "the restored parameters differ from the saved ones"
    # a fresh optimizer while the flat gradient views are attached (DCP would then skip creating its state, and
    # the optimizer state would silently not load)
    from antibody_fast._model import flat_parameters

    opt = torch.optim.AdamW(params, lr=1e-2)
    flat_parameters(model).zero_grad()
    load_checkpoint(path, model, opt)
    for a, b in zip(state(), st_saved):
        assert torch.equal(a, b), "the optimizer state was not restored into a fresh optimizer"
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_guard_skips_on_every_rank_and_checkpoints_refuse_corrupt_shards(tmp_path):
    ctx = mp.spawn(
        _worker, args=(_reliability, str(tmp_path / "init"), WORLD, str(tmp_path)), nprocs=WORLD, join=False
    )
    join_spawned(ctx, TIMEOUT_S, "the FSDP2 workers")
    assert all((tmp_path / f"ok{r}").exists() for r in range(WORLD))


# ------------------------------------------------------------------------------------------- one rank, any device
def _one_rank(rank, out_dir, device):
    """FSDP2 with one rank on ``device`` against the same model unsharded on the same device: the sharded code
    paths (local-shard flat ops, the root forward, sum reduction, the guard) with the device's kernels (Triton on
    CUDA)."""
    got = []
    for sharded in (False, True):
        from antibody_fast.fsdp import shard_model

        model = tiny_model("llama").to(device)
        if sharded:
            shard_model(model)
        stats, state = _train(model, 0, 5, device)
        got.append(
            (
                {
                    n: p.full_tensor() if sharded else p
                    for n, p in model.named_parameters()
                    if p.requires_grad
                },
                stats,
                state,
            )
        )
    # layouts the flat ops cannot reduce correctly are refused, naming the problem
    from torch.distributed.tensor import Replicate, distribute_tensor

    from antibody_fast.flat import FlatParameters

    with pytest.raises(ValueError, match="already FSDP2-wrapped"):
        shard_model(model)
    dt = next(p for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="DTensors"):
        FlatParameters([dt, torch.nn.Parameter(torch.zeros(3, device=device))])
    replicated = torch.nn.Parameter(
        distribute_tensor(torch.zeros(4, 4, device=device), dt.device_mesh, [Replicate()])
    )
    with pytest.raises(ValueError, match="Shard"):
        FlatParameters([replicated])
    (ref, ref_stats, ref_state), (out, out_stats, out_state) = got
    for k, v in ref.items():
        assert_close(out[k], v, atol=REL * float(v.abs().max()), rtol=REL, name=f"{device} {k}")
    assert_close(out_state.lambda_ema, ref_state.lambda_ema, name=f"{device} lambda EMA")
    for step in range(STEPS):
        for kind, exp in ref_stats[step].items():
            for key, v in exp.items():
                assert_close(out_stats[step][kind][key], v, name=f"{device} step {step} {kind}.{key}")
    open(os.path.join(out_dir, "ok"), "w").close()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fsdp2_one_rank_equals_unsharded_on_the_same_device(tmp_path, device):
    ctx = mp.spawn(
        _worker, args=(_one_rank, str(tmp_path / "init"), 1, str(tmp_path), device), nprocs=1, join=False
    )
    join_spawned(ctx, TIMEOUT_S, "the FSDP2 worker")
    assert (tmp_path / "ok").exists()


# ------------------------------------------------------------------------------------------- HF Trainer, one rank
def _hf_trainer(rank, out_dir):
    """``AntibodyFinetuneTrainer`` on an FSDP2 model (one rank: accelerate then leaves the model as it is) ends with
    the weights of the same trainer on the unsharded model. With several CPU ranks accelerate wraps the model in
    DDP, which cannot hold DTensors; its FSDP2 plugin only runs on GPUs (README "Scaling out")."""
    from helpers import make_examples, make_refusal_pool
    from transformers import TrainingArguments

    from antibody_fast.fsdp import shard_model
    from antibody_fast.integrations import AntibodyFinetuneTrainer

    res = []
    for sharded in (False, True):
        model = tiny_model("llama")
        if sharded:
            shard_model(model)
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=4, max_steps=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
        )  # fmt: skip
        trainer = AntibodyFinetuneTrainer(
            model=model, args=args, train_dataset=make_examples(8, seed=0), refusals=make_refusal_pool()
        )
        trainer.train()
        assert type(trainer.model_wrapped).__name__.startswith("FSDP") == sharded
        res.append(
            {
                n: p.full_tensor() if sharded else p.detach()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    for k, v in res[0].items():
        assert_close(res[1][k], v, atol=REL * float(v.abs().max()), rtol=REL, name=f"trainer {k}")
    open(os.path.join(out_dir, "ok"), "w").close()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_hf_finetune_trainer_on_an_fsdp2_model_one_rank(tmp_path):
    ctx = mp.spawn(
        _worker, args=(_hf_trainer, str(tmp_path / "init"), 1, str(tmp_path)), nprocs=1, join=False
    )
    join_spawned(ctx, TIMEOUT_S, "the FSDP2 trainer worker")
    assert (tmp_path / "ok").exists()
