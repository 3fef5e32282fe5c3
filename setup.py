"""Build script: the C++ CPU extension ``antibody_fast._C``.

Environment switches (flash-attention style):
  ANTIBODY_FAST_BUILD_EXT=0   skip the C++ build (the package then JIT-builds at import or falls back to torch)
  MAX_JOBS=N                  ninja parallelism

Install with ``pip install --no-build-isolation -e .`` so that the torch already installed is the one the
extension is compiled against (build isolation would download a second, CUDA build of torch).
"""

import glob
import os
import shutil
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


class build_py_with_csrc(build_py):
    """Ship the C++ sources inside the package (antibody_fast/_csrc) for the import-time JIT fallback."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        dst = os.path.join(self.build_lib, "antibody_fast", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for f in glob.glob(os.path.join(ROOT, "csrc", "*")):
            if f.endswith((".cpp", ".h")):
                shutil.copy(f, dst)


def extension_kwargs():
    if os.environ.get("ANTIBODY_FAST_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing at build time: pure-python install
        warnings.warn(
            f"antibody_fast: torch is not importable at build time ({e}); skipping the C++ extension",
            stacklevel=1,
        )
        return {}
    ext = CppExtension(
        name="antibody_fast._C",
        sources=CSRC,
        extra_compile_args=[
            "-O3",
            "-fopenmp",
            "-std=c++20",
            f"-DANTIBODY_FAST_TORCH_VERSION={torch.__version__}",
        ],
        extra_link_args=["-fopenmp"],
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {
            "build_ext": BuildExtension.with_options(use_ninja=True),
            "build_py": build_py_with_csrc,
        },
    }


kwargs = extension_kwargs()
kwargs.setdefault("cmdclass", {"build_py": build_py_with_csrc})
setup(**kwargs)
