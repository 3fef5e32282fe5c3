"""``python -m antibody_fast.info``: versions, devices, the C++ extension, and per op and device the
implementation ``auto`` picks and why each other implementation is unavailable (xformers.info style).

This module is also the one place that probes the machine (:func:`environment`): the CPU model, the core and
thread counts, the versions of Python and of the libraries, and the CUDA devices. ``antibody-fast bench`` puts
it in its result header and the demos in their reports (docs/design.md §6).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from collections.abc import Sequence

import torch

REPORTED_PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "datasets",
    "liger-kernel",
    "cut-cross-entropy",
)
"""The libraries whose versions :func:`report` prints."""


def package_version(pkg: str) -> str | None:
    """The installed version of distribution ``pkg`` (``torch``: ``torch.__version__``), ``None`` when it is
    not installed."""
    if pkg == "torch":
        return torch.__version__
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(packages: Sequence[str] = REPORTED_PACKAGES, *, cuda: bool = False) -> dict:
    """The machine and software a run happens on::

        {"python", "platform", "antibody_fast", "versions": {pkg: version or None},
         "cpu": {"model", "logical_cores", "torch_threads"},
         "gpus": [{"name", "memory_bytes", "capability", "multiprocessors"}, ...] or None, "cuda"}

    ``packages``: the distributions whose versions are read (:func:`package_version`). ``cuda``: also list
    the CUDA devices (``gpus`` is ``[]`` when CUDA is not available); without it CUDA is never queried and
    ``gpus`` is ``None``. ``cuda`` is the CUDA version torch was built with (``None``: a CPU build)."""
    from . import __version__

    gpus = None
    if cuda:
        gpus = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(
                    {
                        "name": p.name,
                        "memory_bytes": p.total_memory,
                        "capability": f"sm_{p.major}{p.minor}",
                        "multiprocessors": p.multi_processor_count,
                    }
                )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "antibody_fast": __version__,
        "versions": {pkg: package_version(pkg) for pkg in packages},
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpus": gpus,
        "cuda": torch.version.cuda,
    }


def report() -> str:
    from . import ops  # noqa: F401  (every op registers its implementations when imported)
    from ._ext import extension_status
    from .dispatch import explain, registered_ops

    env = environment(cuda=True)
    lines = [f"antibody_fast {env['antibody_fast']}"]
    lines.append(f"python {env['python']} on {env['platform']}")
    for pkg, v in env["versions"].items():
        lines.append(f"  {pkg:<18} {v or 'not installed'}")
    devices = ["cpu"]
    lines.append("devices:")
    cpu = env["cpu"]
    lines.append(f"  cpu: {cpu['logical_cores']} logical cores, torch threads={cpu['torch_threads']}")
    if env["gpus"]:
        for i, g in enumerate(env["gpus"]):
            lines.append(f"  cuda:{i}: {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, {g['capability']}")
        devices.append("cuda")
    else:
        lines.append("  cuda: not available")
    lines.append(
        f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  "
        f"ANTIBODY_FAST_IMPL={os.environ.get('ANTIBODY_FAST_IMPL', '(unset: auto)')}"
    )
    st = extension_status()
    if st["loaded"]:
        lines.append(
            f"C++ extension: loaded ({st['how']}, built for torch {st['torch_version']}, "
            f"OpenMP={'yes' if st['openmp'] else 'no'})"
        )
    else:
        lines.append(f"C++ extension: NOT loaded ({st['reason']})")
    lines.append("ops (auto pick per device; reasons an impl is unavailable):")
    for name, spec in sorted(registered_ops().items()):
        for dev in devices:
            ex = explain(name, dev)
            lines.append(f"  {name:<28} {dev:<5} auto -> {ex['auto']}")
            for impl in spec.impls:
                rs = ex["reasons"][impl]
                status = "available" if not rs else "unavailable: " + "; ".join(rs)
                lines.append(f"      {impl:<7} {status}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
