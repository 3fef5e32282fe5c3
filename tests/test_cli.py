"""The ``antibody-fast`` command line: help, delegation to each command's module, clear errors."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from antibody_fast import cli


def _available(command: str) -> bool:
    module = cli.COMMANDS[command][0]
    if importlib.util.find_spec(module) is None:
        return False
    return hasattr(importlib.import_module(module), "main")


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: antibody-fast")
    for command in ("align", "finetune", "evaluate", "bench", "demo", "info"):
        assert f"\n  {command} " in out, command


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: antibody-fast" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["frobnicate", "--x"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert "bench" in err


def test_version(capsys):
    from antibody_fast import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"antibody_fast {__version__}"


def test_bench_help_is_the_bench_modules_help(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: antibody-fast bench")
    for opt in ("--quick", "--device", "--only", "--out", "--compare"):
        assert opt in out


@pytest.mark.parametrize("command", ["align", "finetune", "evaluate", "demo"])
def test_subcommand_help_or_clear_unavailable_message(command, capsys):
    rc = cli.main([command, "--help"])
    cap = capsys.readouterr()
    if _available(command):
        assert rc == 0, cap.err
        assert "usage:" in cap.out
    else:
        assert rc == 2
        assert f"`antibody-fast {command}` is not available in this build" in cap.err


def test_info_help_and_run(capsys):
    assert cli.main(["info", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: antibody-fast info")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("antibody_fast ")
    assert "devices:" in out and "  torch " in out


def test_info_rejects_arguments(capsys):
    assert cli.main(["info", "--bogus"]) == 2
    assert "unexpected arguments: --bogus" in capsys.readouterr().err


def test_missing_module_and_missing_dependency_messages(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.COMMANDS, "align", ("antibody_fast._no_such_module_", "x"))
    assert cli.main(["align", "--steps", "3"]) == 2
    assert (
        "not available in this build (antibody_fast._no_such_module_ is missing)" in capsys.readouterr().err
    )

    (tmp_path / "abf_needs_dep.py").write_text("import abf_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "demo", ("abf_needs_dep", "x"))
    assert cli.main(["demo"]) == 2
    assert "needs the package 'abf_dependency_that_is_not_installed'" in capsys.readouterr().err


def test_arguments_are_delegated_verbatim(monkeypatch, tmp_path):
    pkg = tmp_path / "abf_fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train_cli.py").write_text(
        textwrap.dedent(
            """
            CALLS = []

            def main(command, argv):
                CALLS.append((command, list(argv)))
                return 3
            """
        )
    )
    (pkg / "bench.py").write_text(
        textwrap.dedent(
            """
            CALLS = []

            def main(argv):
                CALLS.append(list(argv))
                if argv == ["--exit-message"]:
                    raise SystemExit("bad option")
                raise SystemExit(0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "finetune", ("abf_fake.train_cli", "x"))
    monkeypatch.setitem(cli.COMMANDS, "bench", ("abf_fake.bench", "x"))
    args = ["--out", "a b", "-k", "x", "--", "--help", "positional"]
    assert cli.main(["finetune", *args]) == 3
    assert cli.main(["bench", *args]) == 0
    assert cli.main(["bench", "--exit-message"]) == 1
    import abf_fake.bench
    import abf_fake.train_cli

    assert abf_fake.train_cli.CALLS == [("finetune", args)]
    assert abf_fake.bench.CALLS == [args, ["--exit-message"]]


def test_python_dash_m_and_console_script():
    r = subprocess.run(
        [sys.executable, "-m", "antibody_fast", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "usage: antibody-fast" in r.stdout
    script = Path(sys.executable).parent / "antibody-fast"
    if script.exists():
        r = subprocess.run([str(script), "nope"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert "invalid choice: 'nope'" in r.stderr
