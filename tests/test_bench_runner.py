"""The benchmark runner (antibody_fast/bench/) and the helpers benchmarks/conftest.py exposes."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from antibody_fast import bench

REPO = Path(__file__).resolve().parent.parent


def _case(name, provider, data, *, op="toy", mode="fwd", shape=(4, 8), dtype="float32", **extra):
    info = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": list(shape),
        "dtype": dtype,
        "device": "cpu",
    }
    info.update(extra)
    return {
        "group": None,
        "name": name,
        "fullname": f"benchmarks/bench_toy.py::{name}",
        "params": None,
        "param": None,
        "extra_info": info,
        "options": {},
        "stats": {"median": float(np.median(data)), "rounds": len(data), "data": list(data)},
    }


def _doc(cases):
    return {"benchmarks": cases, "machine_info": {}, "datetime": "2026-01-01T00:00:00"}


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17):
        vals = sorted(rng.random(n).tolist())
        for q in (0, 20, 50, 80, 100):
            assert math.isclose(
                bench.results._percentile(vals, q), float(np.percentile(vals, q)), rel_tol=1e-12
            )


def test_summarise_uses_raw_round_times():
    data = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    r = bench.summarise(_case("c", "ours", data, peak_mem_bytes=1234, launches=7, tokens_per_step=4096))
    assert (r.median, r.p20, r.p80) == (
        float(np.percentile(data, 50)),
        float(np.percentile(data, 20)),
        float(np.percentile(data, 80)),
    )
    assert r.rounds == 6 and r.peak_mem == 1234 and r.launches == 7 and r.tokens_per_step == 4096
    assert r.shape == "4x8" and r.ours and not r.floor


def test_analyse_ratios_memory_and_physical_limit():
    cases = [
        _case("a", "ours", [2.0, 2.0, 2.0], peak_mem_bytes=100),
        _case("b", "torch", [6.0, 6.0, 6.0], peak_mem_bytes=800),
        _case("c", "torch-compile", [3.0, 3.0, 3.0]),
        _case("d", "matmul-floor", [1.5, 1.5, 1.5]),
        # another group (other mode): ours' floor given as extra_info["floor_s"], no floor case
        _case("e", "cpp", [4.0, 4.0], mode="full", floor_s=1.0),
        _case("f", "torch", [2.0, 2.0], mode="full"),
        # a group without ours: no ratios
        _case("g", "torch", [1.0], mode="bwd"),
        # extra_info["ours"] decides over the provider name: ours-recompute is a variant compared to ours
        _case("h", "ours", [1.0], mode="var", ours=True),
        _case("i", "ours-recompute", [1.5], mode="var", ours=False),
    ]
    rows = [bench.summarise(c) for c in cases]
    groups = bench.analyse(rows)
    by = {r.name: r for r in rows}
    assert len(groups) == 4
    assert by["h"].ours and not by["i"].ours and by["i"].speedup == 1.5
    assert by["b"].speedup == 3.0 and by["b"].mem_ratio == 8.0
    assert by["c"].speedup == 1.5 and by["c"].mem_ratio is None
    assert by["a"].limit_frac == 0.75 and by["a"].speedup is None
    assert by["d"].speedup is None  # the floor is not a competitor
    assert by["e"].ours and by["e"].limit_frac == 0.25
    assert by["f"].speedup == 0.5
    assert by["g"].speedup is None


def test_markdown_and_compare_on_synthetic_results(tmp_path):
    new = _doc(
        [
            _case("a", "ours", [2e-3, 2e-3, 2e-3], peak_mem_bytes=3 * 2**20, tokens_per_step=1000),
            _case("b", "torch", [6e-3, 6e-3, 6e-3]),
            _case("n", "torch", [1e-3], mode="new"),
        ]
    )
    old = _doc(
        [
            _case("a", "ours", [4e-3, 4e-3]),
            _case("b", "torch", [6e-3]),
            _case("gone", "torch", [1e-3], mode="gone"),
        ]
    )
    md = bench.render_markdown(new)
    assert "| op | mode | shape | dtype | provider | median | p20 | p80 |" in md
    side, details = md.split("## All cases")
    assert "| ours | ours median | limit | vs torch |" in side
    assert "| toy | fwd | 4x8 | float32 | ours | 2 ms | - | 3.00x |" in side
    line_b = next(line for line in details.splitlines() if "| torch | 6 ms |" in line)
    assert "| 3.00x |" in line_b
    line_a = next(line for line in details.splitlines() if "| ours | 2 ms |" in line)
    assert "3 MiB" in line_a and "500,000 tokens/s" in line_a

    text = bench.compare_results(old, new)
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert lines["benchmarks/bench_toy.py::a"].endswith("-50.0%")
    assert lines["benchmarks/bench_toy.py::b"].endswith("+0.0%")
    assert lines["benchmarks/bench_toy.py::n"].endswith("new")
    assert lines["benchmarks/bench_toy.py::gone"].endswith("removed")
    assert text.splitlines()[-1].startswith("2 matched: 1 faster and 0 slower")

    path = bench.plot_results(new, tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slugs():
    assert bench.slugify("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert bench.slugify("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz") == "Intel-Xeon-Platinum-8480"
    assert bench.device_info("cpu")["slug"].startswith("cpu-")


def test_cpu_peak_memory_counts_the_working_set():
    keep = torch.ones(3_000_000)  # live before the call: not counted

    def fn():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB, freed below: peak is a + b
        del b
        c = torch.ones(500_000)  # 2 MB
        return a, c

    peak = bench.measure_peak_memory(fn, "cpu")
    assert 12_000_000 <= peak < 12_000_000 + 65536, peak
    assert keep.numel() == 3_000_000


def test_floors_are_measured_and_combined():
    tflops = bench.measure_matmul_tflops("cpu", torch.float32, quick=True)
    gbps = bench.measure_copy_gbps("cpu", quick=True)
    assert 1e-4 < tflops < 1e3 and 0.1 < gbps < 1e5
    assert bench.measure_matmul_tflops("cpu", torch.float32, quick=True) == tflops  # cached
    f, b = 1e9, 1e8
    t = bench.floor_seconds("cpu", torch.float32, flops=f, bytes_moved=b, quick=True)
    assert t == max(f / (tflops * 1e12), b / (gbps * 1e9))
    with pytest.raises(ValueError):
        bench.floor_seconds("cpu", flops=-1.0)


def test_pytest_command_flags(tmp_path):
    cmd = bench.pytest_command(tmp_path, tmp_path / "r.json", only="flat", quick=True, extra=["-x"])
    assert "--benchmark-only" in cmd and f"--benchmark-json={tmp_path / 'r.json'}" in cmd
    assert "python_files=bench_*.py" in cmd and ["-p", "no:cacheprovider"] == cmd[4:6]
    assert "--continue-on-collection-errors" in cmd
    assert cmd[cmd.index("-k") + 1] == "flat" and cmd[-1] == "-x"


def test_bad_options_fail_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--compare", str(tmp_path / "missing.json"), "--bench-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "no such result file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--bench-dir", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2
    assert "no bench_*.py files" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"benchmarks": 3}')
    with pytest.raises(SystemExit):
        bench.main(["--from-json", str(tmp_path / "bad.json")])
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        (tmp_path / "bench_x.py").write_text("def test_x(benchmark):\n    benchmark(int)\n")
        with pytest.raises(SystemExit):
            bench.main(["--bench-dir", str(tmp_path), "--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "soon"])
def test_time_limit_must_be_a_positive_number_of_seconds(tmp_path, capsys, value):
    (tmp_path / "bench_x.py").write_text("def test_x(benchmark):\n    benchmark(int)\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--bench-dir", str(tmp_path), "--device", "cpu", "--time-limit", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--time-limit" in err and "Traceback" not in err, err
    assert not (tmp_path / "results").exists()


TOY_BENCH = """
import pytest
import torch


@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_toy(benchmark, provider, timed, peak_memory, tag, floors, quick, bench_device):
    assert quick and bench_device == "cpu"
    x = torch.randn(64, 32)
    w = torch.randn(32, 128)
    fn = (lambda: torch.logsumexp(x @ w, -1)) if provider == "ours" else (lambda: (x @ w).double().logsumexp(-1))
    tag(benchmark, op="toy", provider=provider, mode="fwd", shape=(64, 32, 128), dtype=torch.float32,
        peak_mem_bytes=peak_memory(fn), floor_s=floors.seconds(flops=2 * 64 * 32 * 128))
    timed(benchmark, fn)


def test_toy_floor(benchmark, timed, tag):
    x = torch.randn(64, 32)
    w = torch.randn(32, 128)
    tag(benchmark, op="toy", provider="matmul-floor", mode="fwd", shape=(64, 32, 128), dtype=torch.float32)
    timed(benchmark, lambda: x @ w)


def test_excluded_by_only(benchmark):
    benchmark(int)


def test_optional_provider(benchmark):
    pytest.skip("liger-kernel is not installed")


@pytest.mark.gpu
def test_gpu_only(benchmark):
    benchmark(int)
"""


def test_runner_end_to_end_on_a_synthetic_suite(tmp_path, capsys):
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    shutil.copy(REPO / "benchmarks" / "conftest.py", suite / "conftest.py")
    (suite / "bench_toy.py").write_text(textwrap.dedent(TOY_BENCH))
    out = tmp_path / "out"
    rc = bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--bench-dir",
            str(suite),
            "--out",
            str(out),
            "--only",
            "not excluded_by_only",
        ]
    )
    assert rc == 0, capsys.readouterr()
    (json_path,) = out.glob("*.json")
    assert json_path.name.startswith("cpu-") and json_path.name.endswith("-quick.json")
    assert not list(out.glob(".*"))  # the raw temporary file is gone
    doc = json.loads(json_path.read_text())
    h = doc["antibody_fast"]
    assert h["quick"] is True and h["device_info"]["device"] == "cpu" and h["pytest_exit_code"] == 0
    assert h["versions"]["torch"] == torch.__version__ and h["device_info"]["cpu"]["logical_cores"] >= 1
    assert h["floors"]["matmul_tflops_float32"] > 0 and h["floors"]["copy_gbps"] > 0
    assert any("liger-kernel is not installed" in s for s in h["skipped"])
    assert not any("gpu_only" in s for s in h["skipped"]) and h["failed"] == []
    names = sorted(b["name"] for b in doc["benchmarks"])
    assert names == ["test_toy[ours]", "test_toy[torch]", "test_toy_floor"]  # --only "not excluded_by_only"
    for b in doc["benchmarks"]:
        assert len(b["stats"]["data"]) == 3  # quick: 3 rounds, raw times kept
        assert b["extra_info"]["timer"] == "host"
    ours = next(b for b in doc["benchmarks"] if b["name"] == "test_toy[ours]")
    assert ours["extra_info"]["peak_mem_bytes"] >= 64 * 128 * 4  # the logits
    rows = {r.name: r for r in map(bench.summarise, doc["benchmarks"])}
    bench.analyse(list(rows.values()))

    md = json_path.with_suffix(".md").read_text()
    assert "| p20 | p80 |" in md and "vs torch" in md and "physical floor" in md and "liger-kernel" in md
    speedup = rows["test_toy[torch]"].speedup
    assert f"| {speedup:.2f}x |" in md
    limit = rows["test_toy[ours]"].limit_frac
    assert limit is not None and f"| {limit:.3g} |" in md
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # --compare against an "older" run where every round took twice as long: -50% everywhere
    old = json.loads(json_path.read_text())
    for b in old["benchmarks"]:
        b["stats"]["data"] = [2 * t for t in b["stats"]["data"]]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    capsys.readouterr()
    assert (
        bench.main(["--from-json", str(json_path), "--compare", str(old_path), "--out", str(tmp_path / "re")])
        == 0
    )
    text = capsys.readouterr().out
    changes = [line for line in text.splitlines() if "bench_toy.py::" in line]
    assert len(changes) == 3 and all(line.endswith("-50.0%") for line in changes)
    assert (tmp_path / "re" / json_path.with_suffix(".md").name).is_file()


def test_merge_of_separately_run_suites():
    a = _doc([_case("a", "ours", [1.0])])
    a["antibody_fast"] = {"skipped": ["x: not installed"], "floors": {"copy_gbps": 10.0}}
    b = _doc([_case("b", "torch", [3.0])])
    b["antibody_fast"] = {"skipped": [], "floors": {"matmul_tflops_bfloat16": 500.0}, "interrupted": "limit"}
    m = bench.merge_results([a, b], ["ops.json", "steps.json"])
    assert [x["name"] for x in m["benchmarks"]] == ["a", "b"]
    h = m["antibody_fast"]
    assert h["skipped"] == ["x: not installed"] and h["merged_from"] == ["ops.json", "steps.json"]
    assert h["floors"] == {"copy_gbps": 10.0, "matmul_tflops_bfloat16": 500.0}
    assert h["interrupted"] == "steps.json: limit"
    md = bench.render_markdown(m)
    assert "merged from: `ops.json`, `steps.json`" in md and "**incomplete**" in md
    assert "| 3.00x |" in md


SLOW_BENCH = """
import time


def test_a_fast(benchmark, timed, tag):
    tag(benchmark, op="fast", provider="ours")
    timed(benchmark, lambda: None, rounds=2, warmup_rounds=0)


def _hang():
    end = time.monotonic() + 600
    while time.monotonic() < end:  # short sleeps: SIGINT is handled at once
        time.sleep(0.05)


def test_b_hangs(benchmark, timed):
    timed(benchmark, _hang, rounds=1, warmup_rounds=0)
"""


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored"])
def test_time_limit_reports_the_cases_that_finished(tmp_path, capsys, sigint_ignored):
    """The runner's own SIGINT disposition must not matter: a background job of a non-interactive shell (or
    ``nohup``) starts with SIGINT ignored, and so would its pytest child, which then never ends on time."""
    import signal

    if sigint_ignored:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    shutil.copy(REPO / "benchmarks" / "conftest.py", suite / "conftest.py")
    (suite / "bench_slow.py").write_text(textwrap.dedent(SLOW_BENCH))
    (suite / "bench_broken.py").write_text("import abf_module_that_is_not_installed\n")
    out = tmp_path / "out"
    args = ["--quick", "--device", "cpu", "--bench-dir", str(suite), "--out", str(out), "--name", "r"]
    try:
        rc = bench.main([*args, "--time-limit", "15"])
    finally:
        if sigint_ignored:
            signal.signal(signal.SIGINT, old)
    assert rc != 0  # pytest was interrupted
    doc = json.loads((out / "r.json").read_text())
    assert [b["name"] for b in doc["benchmarks"]] == ["test_a_fast"]
    assert doc["antibody_fast"]["interrupted"] == "--time-limit 15 s reached"
    md = (out / "r.md").read_text()
    assert "**incomplete**" in md
    # a suite that cannot be imported is reported, and does not stop the others
    (failed,) = doc["antibody_fast"]["failed"]
    assert "bench_broken.py: collection error" in failed and "abf_module_that_is_not_installed" in failed
    assert "## Failed" in md


@pytest.mark.parametrize(
    "provider, role",
    [
        ("weighted_step", "weighted"),
        ("sft_step", "sft"),
        ("hf_sft", "hf_sft"),
        ("reference_sft_step", "hf_sft"),
        ("authors_finetune", "authors_ft"),
        ("reference_finetune_step", "authors_ft"),
        ("align_step", "align"),
        ("authors-align", "authors_align"),
        ("reference_align_step", "authors_align"),
        ("torch", None),
    ],
)
def test_step_roles(provider, role):
    assert bench.step_role(provider) == role


@pytest.mark.parametrize(
    "mode, provider, role",
    [
        ("finetune", "ours", "weighted"),
        ("finetune", "fused-sft", "sft"),
        ("finetune", "hf-sft", "hf_sft"),
        ("finetune", "authors", "authors_ft"),
        ("align", "ours", "align"),
        ("align", "authors", "authors_align"),
        ("align", "torch", "align"),
        ("", "authors", None),
    ],
)
def test_step_roles_from_mode(mode, provider, role):
    assert bench.step_role(provider, mode) == role


def test_training_step_targets_and_ratio_matrix():
    shape = (8, 256)
    cases = [
        _case("w", "weighted_step", [1.05], op="step", shape=shape, peak_mem_bytes=90),
        _case("s", "sft_step", [1.0], op="step", shape=shape),
        _case("h", "hf_sft", [2.0], op="step", shape=shape, peak_mem_bytes=100),
        _case("a", "authors_finetune", [2.1], op="step", shape=shape),
        _case("al", "align_step", [4.4], op="step", shape=shape),
        _case("aa", "authors_align", [8.0], op="step", shape=shape),
    ]
    rows = [bench.summarise(c) for c in cases]
    got = {t["target"]: (round(t["value"], 6), t["met"]) for t in bench.step_targets(rows)}
    assert got == {
        "weighted_step / sft_step": (1.05, True),  # CPU goal <= 1.10
        "authors-style FT step / weighted_step": (2.0, False),  # CPU goal >= 3
        "weighted_step / HF plain SFT step": (0.525, True),
        "authors-style align step / align_step": (round(8.0 / 4.4, 6), False),  # CPU goal >= 2
        "align_step / (4 x sft_step)": (1.1, False),
        "weighted_step / HF plain SFT step, peak memory": (0.9, True),
    }
    md = bench.render_markdown(_doc(cases))
    assert "## Training-step targets" in md and "| 2.000 | >= 3 | **no** |" in md
    assert "| weighted_step | 1.00 | 1.05 | 0.53 | 0.50 | 0.24 | 0.13 |" in md
    # the same figures from benchmarks/bench_steps.py's naming (providers ours/authors per mode; the
    # alignment batches have another sequence length than the fine-tuning ones)
    named = [
        _case("w", "ours", [1.05], op="step", mode="finetune", shape=(8, 256), peak_mem_bytes=90),
        _case("s", "fused-sft", [1.0], op="step", mode="finetune", shape=(8, 256)),
        _case("h", "hf-sft", [2.0], op="step", mode="finetune", shape=(8, 256), peak_mem_bytes=100),
        _case("a", "authors", [2.1], op="step", mode="finetune", shape=(8, 256)),
        _case("al", "ours", [4.4], op="step", mode="align", shape=(8, 200)),
        _case("aa", "authors", [8.0], op="step", mode="align", shape=(8, 200)),
    ]
    targets = bench.step_targets([bench.summarise(c) for c in named])
    assert {t["target"]: (round(t["value"], 6), t["met"]) for t in targets} == got
    assert targets[-2]["providers"] == ("align:ours", "finetune:fused-sft")
    # a role held by two providers is ambiguous: its targets are left out
    rows.append(bench.summarise(_case("w2", "weighted_step_v2", [1.0], op="step", shape=shape)))
    assert not any("weighted" in t["target"] for t in bench.step_targets(rows))


def test_cuda_timing_path_records_device_times_as_rounds(benchmark, monkeypatch):
    """The CUDA branch of time_benchmark with pytest-benchmark's real fixture; do_bench and the CUDA
    event timer are replaced by fakes so that it runs without a GPU."""
    if getattr(benchmark, "disabled", False):
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable)")
    triton_testing = pytest.importorskip("triton.testing")
    calls = []
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, return_mode: [2.0, 4.0])
    monkeypatch.setattr(bench.measure, "_cuda_event_times_ms", lambda fn, n: [6.0] * n)
    monkeypatch.setattr(bench.measure, "_sync", lambda device: calls.append(device))
    out = bench.time_benchmark(benchmark, lambda: 7, device="cuda", rounds=5, quick=False)
    assert out == 7 and calls == ["cuda"]
    assert benchmark.stats.stats.data == [0.002, 0.004, 0.006, 0.006, 0.006]
    assert benchmark.extra_info["timer"] == "cuda-events(triton.testing.do_bench)"
    with pytest.raises(RuntimeError, match="already used"):
        bench.time_benchmark(benchmark, lambda: 7, device="cuda", rounds=5)


def test_reports_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    md, png = bench.runner._write_reports(_doc([_case("a", "ours", [1.0])]), tmp_path / "r.json")
    assert md.is_file() and png is None and not (tmp_path / "r.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_gpu_suite_script_syntax_and_dry_run(tmp_path):
    script = REPO / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    r = subprocess.run(
        ["bash", str(script), "--dry-run", "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert "-m pip install --no-deps --no-build-isolation -e ." in cmds[0]
    assert "-m antibody_fast.info" in cmds[1]
    assert any("-m pytest tests -q -m gpu" in c for c in cmds)
    assert any("-k triton" in c for c in cmds)
    bench_cmds = [c for c in cmds if "antibody_fast bench --device cuda" in c]
    assert len(bench_cmds) == 2 and all("--time-limit" in c and str(tmp_path / "o") in c for c in bench_cmds)
    fsdp = [c for c in cmds if "bench_fsdp.py" in c]
    assert len(fsdp) == 1 and "torch.distributed.run" in fsdp[0] and "--device cuda" in fsdp[0]
    assert "--from-json" in cmds[-1]
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
