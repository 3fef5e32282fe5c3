"""The benchmark runner (antibody_fast/bench.py) and the helpers benchmarks/conftest.py exposes."""

import json
import math
import shutil
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
            assert math.isclose(bench._percentile(vals, q), float(np.percentile(vals, q)), rel_tol=1e-12)


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
    ]
    rows = [bench.summarise(c) for c in cases]
    groups = bench.analyse(rows)
    by = {r.name: r for r in rows}
    assert len(groups) == 3
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
"""


def test_runner_end_to_end_on_a_synthetic_suite(tmp_path, capsys):
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    shutil.copy(REPO / "benchmarks" / "conftest.py", suite / "conftest.py")
    (suite / "bench_toy.py").write_text(textwrap.dedent(TOY_BENCH))
    out = tmp_path / "out"
    rc = bench.main(
        ["--quick", "--device", "cpu", "--bench-dir", str(suite), "--out", str(out), "--only", "not excluded_by_only"]
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
