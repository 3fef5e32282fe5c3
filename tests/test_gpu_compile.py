"""GPU compile check on a machine without a GPU (antibody_fast/gpu_compile.py).

Every Triton kernel is compiled for sm_80 and sm_90 with the launchers' configurations; the CI set is a
covering subset (every dtype / flag / block config / grad mode at both architectures, plus what the variants
mark for CI) and the full sweep is ``benchmarks/gpu_compile_report.py`` (its committed report:
``benchmarks/results/gpu-compile-<date>.md``). ``scripts/gpu_compile_check.sh`` runs this file under
triton 3.6 as well.
"""

import importlib
import shutil

import pytest

triton = pytest.importorskip("triton")
gc = importlib.import_module("antibody_fast.gpu_compile")


def _tools_present() -> bool:
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler as nv

        return bool(nv.get_ptxas(90).path and shutil.which(knobs.nvidia.cuobjdump.path))
    except Exception:
        return False


needs_tools = pytest.mark.skipif(not _tools_present(), reason="triton's NVIDIA backend tools are missing")


def test_every_kernel_is_enumerated():
    vs = gc.variants()
    for module in gc.kernel_modules():
        jit = set(gc.jit_kernel_names(module))
        assert jit, f"no @triton.jit *_kernel found in kernels/{module}.py"
        covered = {v.kernel for v in vs if v.module == module}
        assert covered == jit, (
            f"kernels/{module}.py: not enumerated {sorted(jit - covered)}, stale {sorted(covered - jit)}"
        )


def test_variants_are_distinct_and_match_the_kernel_parameters():
    vs = gc.variants()
    names = [v.name for v in vs]
    assert len(names) == len(set(names)), "two variants share a label"
    for v in vs:  # every argument given, none unknown (cheap: no compile)
        gc._signature(getattr(gc._load_module(v.module), v.kernel), v)


def test_every_dtype_and_grad_mode_is_enumerated():
    labels = " ".join(v.label for v in gc.variants() if v.group == "lm_head")
    for word in ("fp32", "fp16", "bf16", "bias=0", "bias=1", "cap=0", "cap=1", "oddV"):
        assert word in labels, word
    assert any(v.matmul_tc for v in gc.variants())


def test_covering_subset_covers_every_word():
    vs = gc.variants()
    cover = gc.covering_subset(vs)
    for kernel in {v.kernel for v in vs}:
        want = {w for v in vs if v.kernel == kernel for w in v.label.split()}
        got = {w for v in cover if v.kernel == kernel for w in v.label.split()}
        assert got == want, kernel


def _res(**kw):
    base = dict(ok=True, arch=90, registers=128, spill_stores=0, spill_loads=0, shared=1024, matmul_tc=True,
                mma={"HGMMA.64x64x16.F32.BF16": 4})  # fmt: skip
    base.update(kw)
    return base


def test_check_reports_each_violation():
    assert gc.check(_res()) == []
    assert gc.check(_res(arch=80, mma={"HMMA.16816.F32.BF16": 8})) == []
    assert any("spills" in x for x in gc.check(_res(spill_stores=8)))
    assert any("spills" in x for x in gc.check(_res(spill_loads=4)))
    assert any("shared memory" in x for x in gc.check(_res(shared=228 * 1024)))
    assert gc.check(_res(shared=227 * 1024)) == []
    assert any("shared memory" in x for x in gc.check(_res(arch=80, shared=164 * 1024, mma={"HMMA.1": 1})))
    assert any("tensor-core" in x for x in gc.check(_res(mma={})))
    assert any("tensor-core" in x for x in gc.check(_res(arch=80)))  # HGMMA does not exist on sm_80
    assert gc.check(_res(mma={}, matmul_tc=False)) == []
    assert any("failed" in x for x in gc.check({"ok": False, "error": "boom", "arch": 90}))
    assert any("statistics" in x for x in gc.check(_res(registers=None)))


def test_ptxas_and_sass_parsers():
    log = (
        "ptxas info    : Function properties for k\n"
        "    0 bytes stack frame, 60 bytes spill stores, 48 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert gc._parse_ptxas(log) == {"registers": 255, "stack": 0, "spill_stores": 60, "spill_loads": 48}
    assert gc._MMA_RE.search("        /*0a70*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;").group(1) == (
        "HMMA.16816.F32.BF16"
    )


@needs_tools
def test_ci_set_compiles_within_limits():
    """The CI set at sm_80 and sm_90: no failure, no spill, shared memory within the limit, and tensor-core
    instructions in every fp16/bf16 matmul kernel."""
    todo = gc.todo_for(gc.variants(), ci_only=True)
    archs = {a for _, a in todo}
    assert archs == set(gc.ARCHS)
    results = gc.run(todo)
    assert len(results) == len(todo)
    bad = [
        f"sm_{r['arch']} {r['kernel']}[{r['label']}]: {'; '.join(r['violations'])}"
        for r in results
        if r["violations"]
    ]
    assert not bad, "\n".join(bad)
    for r in results:
        if r["matmul_tc"]:
            assert r["mma"], r
    # every kernel compiled at both architectures
    for arch in gc.ARCHS:
        assert {r["kernel"] for r in results if r["arch"] == arch} == {v.kernel for v in gc.variants()}


@pytest.mark.parametrize("V", [32000, 128256])
def test_forward_grid_fills_the_gpu(V, monkeypatch):
    """At the benchmark shapes (N = 4096 scored rows) the 2-D forward grid has >= 4 programs per SM on a
    132-SM H100 for every autotune configuration, and the backward's dz buffer stays within its budget."""
    import torch

    slp = importlib.import_module("antibody_fast.ops.sequence_logprob")
    launchers = importlib.import_module("antibody_fast.ops.sequence_logprob._triton")
    monkeypatch.setattr(launchers, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")  # no CUDA call: only the arithmetic of the launcher
    N = 4096
    chunk = slp.fwd_chunk(N, V, cuda)
    assert chunk % 256 == 0
    n_chunks = -(-V // chunk)
    for kind in ("tc", "f32"):
        for bm, *_ in slp.LINEAR_CONFIGS["fwd"][kind]:
            assert -(-N // bm) * n_chunks >= 4 * 132, (kind, bm, chunk)
    for elt in (2, 4):
        bchunk = slp.bwd_chunk(N, V, elt, cuda)
        assert bchunk % 256 == 0 and N * bchunk * elt <= slp.DZ_BUDGET
    assert slp.FROZEN_STRATEGY["cuda"] == "recompute"
