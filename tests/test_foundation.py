"""Foundation: lean import, packaging layout, dispatch rules, the info report, extension fallbacks."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import antibody_fast.ops  # noqa: F401  (the ops register themselves with the dispatch registry on import)
from antibody_fast import dispatch
from antibody_fast.dispatch import ImplUnavailableError, resolve_impl

ROOT = Path(__file__).resolve().parents[1]


def _run_py(code: str, env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or "/",
        timeout=600,
    )


def test_import_is_lean_and_cuda_free():
    code = """
        import sys, torch
        def boom(*a, **k):
            raise RuntimeError("CUDA was initialised")
        torch.cuda.current_device = boom
        torch.cuda._lazy_init = boom
        torch.cuda.init = boom
        import antibody_fast
        import antibody_fast.ops            # registers the custom ops
        from antibody_fast import linear_sequence_logprob, FlatParameters  # noqa: F401
        heavy = [m for m in ("transformers", "peft", "datasets", "triton") if m in sys.modules]
        assert not heavy, heavy
        assert not torch.cuda.is_initialized()
        print("LEAN-OK")
    """
    r = _run_py(code)
    assert r.returncode == 0 and "LEAN-OK" in r.stdout, r.stdout + r.stderr


def test_installed_layout():
    import importlib.util

    import antibody_fast.kernels

    import antibody_fast

    pkg = Path(antibody_fast.__file__).parent
    assert Path(antibody_fast.kernels.__file__).parent.name == "kernels"
    assert list(pkg.glob("_C*.so")), "compiled antibody_fast._C is missing from the package"
    r = _run_py("import importlib.util; print(importlib.util.find_spec('kernels'))")
    assert r.stdout.strip() == "None", "a top-level 'kernels' module is importable: " + r.stdout + r.stderr
    assert importlib.util.find_spec("antibody_fast._C") is not None


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """A wheel (extension skipped to keep it fast) ships antibody_fast/kernels and no top-level kernels."""
    env = dict(os.environ, ANTIBODY_FAST_BUILD_EXT="0")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = tmp_path.glob("antibody_fast-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("antibody_fast/kernels/") and n.endswith(".py") for n in names), names
    assert not any(n.startswith("kernels/") for n in names), names
    assert any(n.startswith("antibody_fast/_csrc/") and n.endswith(".cpp") for n in names), names


def test_extension_loaded_and_cpp_is_cpu_default():
    from antibody_fast._ext import extension_status

    st = extension_status()
    assert st["loaded"], st
    assert st["torch_version"] == torch.__version__
    for op in dispatch.registered_ops():
        assert dispatch.explain(op, "cpu")["auto"] == "cpp", op


def test_dispatch_rules(monkeypatch):
    ops = dispatch.registered_ops()
    assert "linear_sequence_logprob" in ops
    op = "linear_sequence_logprob"
    monkeypatch.delenv("ANTIBODY_FAST_IMPL", raising=False)
    assert resolve_impl(op, "auto", "cpu") == "cpp"
    assert resolve_impl(op, "torch", "cpu") == "torch"
    monkeypatch.setenv("ANTIBODY_FAST_IMPL", "torch")
    assert resolve_impl(op, "auto", "cpu") == "torch"
    monkeypatch.setenv("ANTIBODY_FAST_IMPL", "bogus")
    with pytest.raises(ValueError, match="ANTIBODY_FAST_IMPL"):
        resolve_impl(op, "auto", "cpu")
    monkeypatch.delenv("ANTIBODY_FAST_IMPL")
    with pytest.raises(ValueError, match="unknown impl"):
        resolve_impl(op, "fast", "cpu")
    # explicit impls that cannot run list their reasons
    with pytest.raises(ImplUnavailableError, match="CPU-only"):
        resolve_impl(op, "cpp", "meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_impl(op, "triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl(op, "triton", "cpu") == "triton"
    # auto never picks the interpreter on CPU
    assert resolve_impl(op, "auto", "cpu") == "cpp"


def test_info_report():
    r = _run_py("import antibody_fast.info as i; i.main()")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in (
        "torch",
        "triton",
        "transformers",
        "peft",
        "C++ extension: loaded",
        "linear_sequence_logprob",
    ):
        assert word in out, (word, out)
    assert "auto -> cpp" in out
    # every unavailable impl comes with a reason
    assert "unavailable: " in out


def test_missing_extension_falls_back_with_one_warning():
    code = """
        import warnings, torch
        torch.__version__ = "0.0.0-not-this-torch"     # the prebuilt .so now looks built for another torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            from antibody_fast._ext import load_extension
            assert load_extension() is None
            assert load_extension() is None             # idempotent: still one warning
        msgs = [str(x.message) for x in w if "antibody_fast" in str(x.message)]
        assert len(msgs) == 1, msgs
        import antibody_fast.ops                        # registers the ops (no extension load)
        from antibody_fast.dispatch import resolve_impl, ImplUnavailableError
        assert resolve_impl("linear_sequence_logprob", "auto", "cpu") == "torch"
        try:
            resolve_impl("linear_sequence_logprob", "cpp", "cpu")
        except ImplUnavailableError as e:
            assert "not loaded" in str(e), e
        else:
            raise AssertionError("cpp should be unavailable")
        print("FALLBACK-OK")
    """
    r = _run_py(code, {"ANTIBODY_FAST_JIT": "0"})
    assert r.returncode == 0 and "FALLBACK-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_jit_fallback_builds_when_prebuilt_unusable(tmp_path):
    code = """
        import warnings
        import antibody_fast._ext as ext
        ext._load_prebuilt = lambda: (_ for _ in ()).throw(ImportError("simulated: built for another torch"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mod = ext.load_extension()
        assert mod is not None, ext._state
        assert ext._state["how"] == "jit"
        assert [str(x.message) for x in w if "JIT" in str(x.message)], [str(x.message) for x in w]
        import antibody_fast.ops
        from antibody_fast import dispatch
        assert dispatch.registered_ops()
        for op in dispatch.registered_ops():
            assert dispatch.not_supported_reasons(op, "cpp", "cpu") == [], op
        print("JIT-OK")
    """
    r = _run_py(code, {"ANTIBODY_FAST_CACHE": str(tmp_path)})
    assert r.returncode == 0 and "JIT-OK" in r.stdout, r.stdout + r.stderr
