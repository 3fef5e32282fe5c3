"""``antibody-fast bench``: runs the suites in a pytest subprocess (with the ``--time-limit`` handling), adds
the header (machine, versions, floors, command) to pytest-benchmark's JSON and writes the reports."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .measure import DEVICE_ENV, QUICK_ENV
from .report import compare_results, plot_results, render_markdown
from .results import HEADER_KEY, load_results, merge_results

VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "liger-kernel",
    "cut-cross-entropy",
    "pytest-benchmark",
    "numpy",
)
"""The libraries whose versions go into the result header."""


# --------------------------------------------------------------------------------------------------------
# Header of a run
# --------------------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    """``"Intel(R) Xeon(R) Gold 6430"`` -> ``"Intel-Xeon-Gold-6430"``; ``"NVIDIA H100 80GB HBM3"`` ->
    ``"NVIDIA-H100-80GB-HBM3"``."""
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    text = re.sub(r"\bCPU\b|@.*$", "", text)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.") or "unknown"


def device_info(device: str) -> dict:
    """Header describing the machine: ``{"device", "device_name", "slug", "cpu": {...}, "gpu": {...}|None}``,
    from :func:`antibody_fast.info.environment`. Only ``device="cuda"`` queries CUDA."""
    from ..info import environment  # imports torch: not at module level (``antibody-fast bench --help``)

    env = environment((), cuda=device == "cuda")
    cpu = dict(env["cpu"])
    gpu = None
    if device == "cuda":
        if not env["gpus"]:
            raise RuntimeError("--device cuda: CUDA is not available on this machine")
        p = env["gpus"][0]
        gpu = {
            "name": p["name"],
            "count": len(env["gpus"]),
            "memory_gib": round(p["memory_bytes"] / 2**30, 1),
            "capability": p["capability"],
            "multiprocessors": p["multiprocessors"],
            "cuda": env["cuda"],
        }
        name = p["name"]
    else:
        name = cpu["model"]
    return {
        "device": device,
        "device_name": name,
        "slug": f"{device}-{slugify(name)}",
        "cpu": cpu,
        "gpu": gpu,
    }


def versions() -> dict:
    """Versions of python, antibody_fast and the libraries the figures depend on (``None``: not installed),
    from :func:`antibody_fast.info.environment`."""
    from ..info import environment

    env = environment(VERSIONED)
    return {"python": env["python"], "antibody_fast": env["antibody_fast"], **env["versions"]}


def _git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


# --------------------------------------------------------------------------------------------------------
# Running the suites
# --------------------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_bench_dir() -> Path:
    """``./benchmarks`` when the current directory has one with bench files, else the repository's."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir() and any(here.glob("bench_*.py")):
        return here
    return _repo_root() / "benchmarks"


def pytest_command(
    bench_dir: Path, json_path: Path, *, only: str | None, quick: bool, extra: Sequence[str] = ()
) -> list[str]:
    """The pytest command line the runner executes (in a subprocess)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-sort=fullname",
        "--override-ini",
        "python_files=bench_*.py",
        "--override-ini",
        "python_functions=test_* bench_*",
        "--override-ini",
        f"testpaths={bench_dir}",
        "-q",
    ]
    if quick:
        cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2", "--benchmark-warmup=off"]
    else:
        cmd += ["--benchmark-min-rounds=5", "--benchmark-max-time=1.0"]
    if only:
        cmd += ["-k", only]
    return cmd + list(extra)


def _positive_seconds(text: str) -> float:
    """``--time-limit``'s type: a finite number of seconds > 0 (argparse turns the error into exit 2)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="antibody-fast bench",
        description="Run the pytest-benchmark suites under benchmarks/ and write <device>-<date>.json "
        "(raw timings + header), .md (tables: median, p20, p80, speed-ups, peak memory, physical-limit "
        "fraction) and .png (plot).",
        epilog="Arguments after `--` go to pytest unchanged.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small shapes and few rounds (sets ANTIBODY_FAST_BENCH_QUICK=1)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device the suites run on (sets ANTIBODY_FAST_BENCH_DEVICE; auto: cuda when available)",
    )
    p.add_argument(
        "--only",
        metavar="PATTERN",
        help="run only matching cases (a pytest -k expression over file, test and parameter names, "
        "e.g. 'flat' or 'sequence_logprob and not compile')",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: benchmarks/results)")
    p.add_argument(
        "--bench-dir", metavar="DIR", help="folder holding the bench_*.py files (default: benchmarks/)"
    )
    p.add_argument("--compare", metavar="OLD.json", help="print the change of every median against OLD.json")
    p.add_argument(
        "--from-json",
        metavar="RESULTS.json",
        nargs="+",
        help="run nothing: write the .md and .png of existing result files (several are merged into one "
        "report) and --compare them",
    )
    p.add_argument("--name", metavar="STEM", help="file stem instead of <device-slug>-<date>[-quick]")
    p.add_argument(
        "--time-limit",
        type=_positive_seconds,
        metavar="SECONDS",
        help="interrupt the suites after SECONDS and report the cases that finished",
    )
    return p


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _write_reports(doc: dict, json_path: Path) -> tuple[Path, Path | None]:
    """Write the .md and .png next to ``json_path``; the PNG is skipped (with a note) without matplotlib
    (GPU machines may not have it: regenerate it elsewhere with ``--from-json``)."""
    md_path = json_path.with_suffix(".md")
    png_path = json_path.with_suffix(".png")
    md_path.write_text(render_markdown(doc))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"[bench] matplotlib is not installed: no plot (run `antibody-fast bench --from-json {json_path}` "
            "where it is)",
            file=sys.stderr,
        )
        return md_path, None
    plot_results(doc, png_path)
    return md_path, png_path


def _default_sigint() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_pytest(cmd: list[str], env: dict, cwd: Path, time_limit: float | None) -> tuple[int, str | None]:
    """Run pytest; return ``(exit status, why it was interrupted or None)``. Past ``time_limit`` seconds
    pytest gets SIGINT (it then ends the session and pytest-benchmark writes the JSON of the finished cases)
    and is killed 60 s later if it still runs. On Ctrl-C / SIGINT to the process group (e.g. from an outer
    ``timeout -s INT``) pytest got the signal too and is given 15 s to do the same.

    pytest starts with SIGINT at its default disposition even when this process ignores it (a background job
    of a non-interactive shell, ``nohup``): Python only turns SIGINT into KeyboardInterrupt, which pytest needs
    to end the session and write the finished cases, when SIGINT is not ignored at startup."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), preexec_fn=_default_sigint)
    try:
        return proc.wait(timeout=time_limit), None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        grace, why = 60, f"--time-limit {time_limit:g} s reached"
    except KeyboardInterrupt:
        grace, why = 15, "interrupted (SIGINT)"
    try:
        return proc.wait(timeout=grace), why
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        return proc.wait(), why


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``antibody-fast bench``. Returns the exit status: 0 when every benchmark ran, pytest's
    status otherwise (reports are still written for the cases that ran), 2 for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = _split_passthrough(argv)
    parser = _parser()
    args = parser.parse_args(own)

    old_doc = None
    if args.compare:
        try:
            old_doc = load_results(args.compare)
        except (OSError, ValueError) as e:
            parser.error(f"--compare: {e}")

    if args.from_json:
        docs = []
        for path in args.from_json:
            try:
                docs.append(load_results(path))
            except (OSError, ValueError) as e:
                parser.error(f"--from-json: {e}")
        doc = merge_results(docs, [str(p) for p in args.from_json])
        first = Path(args.from_json[0])
        stem = args.name or (first.stem if len(docs) == 1 else first.stem + "-merged")
        out_dir = Path(args.out) if args.out else first.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"{stem}.json"
        if len(docs) > 1 or json_path.resolve() != first.resolve():
            json_path.write_text(json.dumps(doc, indent=1))
        md_path, png_path = _write_reports(doc, json_path)
        print(f"[bench] wrote {md_path}" + (f" and {png_path}" if png_path else ""))
        if old_doc is not None:
            print(compare_results(old_doc, doc))
        return 0

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_dir = Path(args.bench_dir) if args.bench_dir else default_bench_dir()
    if not bench_dir.is_dir():
        parser.error(f"benchmark folder not found: {bench_dir} (use --bench-dir)")
    if not any(bench_dir.glob("bench_*.py")):
        parser.error(f"no bench_*.py files in {bench_dir}")
    try:
        info = device_info(device)
    except RuntimeError as e:
        parser.error(str(e))
    out_dir = Path(args.out) if args.out else bench_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = args.name or f"{info['slug']}-{now:%Y-%m-%d}" + ("-quick" if args.quick else "")
    json_path = out_dir / f"{stem}.json"
    raw_path = out_dir / f".{stem}.raw.json"
    if raw_path.exists():
        raw_path.unlink()

    env = dict(os.environ)
    env[QUICK_ENV] = "1" if args.quick else "0"
    env[DEVICE_ENV] = device
    if device == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = pytest_command(bench_dir, raw_path, only=args.only, quick=args.quick, extra=passthrough)
    print(f"[bench] device {device}: {info['device_name']}; quick={args.quick}")
    print("[bench] " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc, interrupted = _run_pytest(cmd, env, bench_dir.parent, args.time_limit)
    wall = time.perf_counter() - t0
    if interrupted:
        print(f"[bench] {interrupted}: reporting the cases that finished", file=sys.stderr)
    if rc == 5:
        print(
            f"[bench] no benchmark matched (pytest exit 5){' for --only ' + repr(args.only) if args.only else ''}",
            file=sys.stderr,
        )
        return 5
    if not raw_path.is_file():
        print(f"[bench] pytest exited with {rc} and wrote no results", file=sys.stderr)
        return rc or 1
    with open(raw_path) as f:
        doc = json.load(f)
    raw_path.unlink()
    doc[HEADER_KEY] = {
        "device_info": info,
        "date": now.isoformat(timespec="seconds"),
        "versions": versions(),
        "quick": bool(args.quick),
        "only": args.only,
        "floors": doc.pop("antibody_fast_floors", None) or {},
        "skipped": doc.pop("antibody_fast_skipped", None) or [],
        "failed": doc.pop("antibody_fast_failed", None) or [],
        "command": "antibody-fast bench " + shlex.join(argv),
        "pytest_exit_code": rc,
        "interrupted": interrupted,
        "wall_s": round(wall, 1),
        "git_commit": _git_commit(_repo_root()),
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    md_path, png_path = _write_reports(doc, json_path)
    print(
        f"[bench] {len(doc['benchmarks'])} benchmarks in {wall:.0f} s; wrote {json_path}, {md_path.name}"
        + (f", {png_path.name}" if png_path else "")
    )
    if rc != 0:
        print(
            f"[bench] pytest exited with {rc}: some benchmarks failed (see above); the reports hold those "
            "that ran",
            file=sys.stderr,
        )
    if old_doc is not None:
        print(compare_results(old_doc, doc))
    return rc
