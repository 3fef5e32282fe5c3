"""``python -m antibody_fast.info``: versions, devices, the C++ extension, and per op and device the
implementation ``auto`` picks and why each other implementation is unavailable (xformers.info style)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys

import torch


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def report() -> str:
    from . import __version__
    from ._ext import extension_status
    from .dispatch import explain, registered_ops

    lines = [f"antibody_fast {__version__}"]
    lines.append(f"python {sys.version.split()[0]} on {platform.platform()}")
    for pkg in ("torch", "triton", "transformers", "peft", "datasets", "liger-kernel", "cut-cross-entropy"):
        v = torch.__version__ if pkg == "torch" else _version(pkg)
        lines.append(f"  {pkg:<18} {v}")
    devices = ["cpu"]
    lines.append("devices:")
    lines.append(f"  cpu: {os.cpu_count()} logical cores, torch threads={torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
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
