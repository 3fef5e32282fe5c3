"""``torchrun --nproc-per-node 2 -m antibody_fast finetune|align --fsdp`` end to end on CPU (gloo): the sharded run
equals one process with the same global batch; a sharded checkpoint (torch.distributed.checkpoint) resumes --
on the same world size and on another one -- to the same adapter as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from test_train_cli import COMMON, _adapter_state, _finetune_args, _torchrun, make_cli_env

from antibody_fast.cli import commands
from antibody_fast.testing import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_cli_env(tmp_path_factory.mktemp("fsdp-cli"))


def _args(env, out, bs, *extra):
    a = _finetune_args(env, out, "--lr", "1e-2", *extra)
    a[a.index("--batch-size") + 1] = str(bs)
    return a


def _same_adapter(a_dir, b_dir, exact=False):
    a, b = _adapter_state(a_dir), _adapter_state(b_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        if exact:
            assert_close(b[k], a[k], atol=0, rtol=0, name=f"{k} (bitwise)")
        else:
            assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, name=k)


def test_finetune_fsdp_equals_one_process_and_resumes_on_another_world_size(env, tmp_path, capsys):
    single = tmp_path / "single"
    assert commands.main("finetune", _args(env, single, 4)) == 0
    full = tmp_path / "fsdp"
    proc = _torchrun("finetune", [*_args(env, full, 2), "--fsdp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((full / "run_config.json").read_text())["fsdp"] is True
    _same_adapter(single, full)
    loss_1 = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    loss_2 = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(loss_1) == len(loss_2) == 4
    for x, y in zip(loss_1, loss_2):
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)

    # stop after 2 steps on 2 ranks: the checkpoint file plus one DCP shard directory
    part = tmp_path / "part"
    proc = _torchrun("finetune", [*_args(env, part, 2), "--fsdp", "--save-every", "1", "--stop-after", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    shards = sorted(p.name for p in part.glob("checkpoint.pt.shards-*"))
    assert len(shards) == 1 and (part / "checkpoint.pt").is_file() and not (part / "adapter").exists()
    # a sharded checkpoint needs a sharded model: refused without --fsdp, nothing written
    assert commands.main("finetune", [*_args(env, part, 4), "--resume"]) == 2
    assert "--fsdp" in capsys.readouterr().err
    assert not (part / "adapter").exists()
    # resumed on 1 rank (same global batch of 4): DCP reshards the weights and the optimizer state
    assert commands.main("finetune", [*_args(env, part, 4), "--resume", "--fsdp"]) == 0
    _same_adapter(full, part)
    assert [p.name for p in part.glob("checkpoint.pt.shards-*")] != shards  # the final save replaced it

    # resumed on the same 2 ranks: bitwise the uninterrupted sharded run
    again = tmp_path / "again"
    proc = _torchrun("finetune", [*_args(env, again, 2), "--fsdp", "--save-every", "1", "--stop-after", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _torchrun("finetune", [*_args(env, again, 2), "--fsdp", "--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_adapter(full, again, exact=True)


def test_align_fsdp_equals_one_process(env, tmp_path):
    def args(out, bs):
        return ["--model", env["model"], "--align-data", env["align"], "--harmful-data", env["harmful"],
                "--steps", "2", "--batch-size", str(bs), "--lr", "1e-2", "--momentum", "0.5", "--output", str(out),
                *COMMON]  # fmt: skip

    assert commands.main("align", args(tmp_path / "single", 4)) == 0
    proc = _torchrun("align", [*args(tmp_path / "fsdp", 2), "--fsdp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_adapter(tmp_path / "single", tmp_path / "fsdp")
    lam = [
        json.loads(x)["lambda_t"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    lam2 = [json.loads(x)["lambda_t"] for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lam) == len(lam2) == 2
    for x, y in zip(lam, lam2):
        assert abs(x - y) <= 1e-5 * abs(x) + 1e-7, (x, y)
    # stopped after step 1 on 2 ranks, resumed on 1: the λ EMA and the optimizer come back from the checkpoint
    part = tmp_path / "part"
    proc = _torchrun("align", [*args(part, 2), "--fsdp", "--stop-after", "1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert commands.main("align", [*args(part, 4), "--fsdp", "--resume"]) == 0
    _same_adapter(tmp_path / "single", part)
    lam3 = [json.loads(x)["lambda_t"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert abs(lam3[-1] - lam[-1]) <= 1e-5 * abs(lam[-1]) + 1e-7, (lam3, lam)


def test_lisa_fsdp_anchor_travels_with_the_shards(env, tmp_path):
    """Lisa's anchor is per-rank shards: the sharded checkpoint carries it (as DTensors), so a 2-rank run stopped
    mid-way and resumed on 1 rank ends where one process does."""
    lisa = [
        "--method",
        "lisa",
        "--align-data",
        env["align"],
        "--lisa-align-steps",
        "1",
        "--lisa-finetune-steps",
        "1",
    ]
    single = tmp_path / "single"
    assert commands.main("finetune", [*_args(env, single, 4), *lisa]) == 0
    part = tmp_path / "part"
    proc = _torchrun(
        "finetune", [*_args(env, part, 2), *lisa, "--fsdp", "--save-every", "1", "--stop-after", "3"]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert commands.main("finetune", [*_args(env, part, 4), *lisa, "--fsdp", "--resume"]) == 0
    _same_adapter(single, part)
