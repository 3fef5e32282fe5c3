"""The ``antibody-fast`` command line: ``antibody-fast COMMAND [options]`` (also ``python -m antibody_fast``).

Each command is implemented by its own module, imported only when the command runs; everything after the
command name is handed to that module's ``main`` unchanged (``main(command, argv)`` when its first parameter
is named ``command``, else ``main(argv)``), so ``antibody-fast COMMAND --help`` prints the module's own help:

=========  ===========================================  =========================================
command    what it does                                 module
=========  ===========================================  =========================================
align      alignment stage (Antibody, baselines)        ``antibody_fast.cli.commands.main("align", argv)``
finetune   fine-tuning stage on user data               ``antibody_fast.cli.commands.main("finetune", argv)``
evaluate   harmful score and fine-tune accuracy          ``antibody_fast.cli.commands.main("evaluate", argv)``
bench      benchmark suites and reports                 ``antibody_fast.bench.main(argv)``
demo       embedded end-to-end CPU demo                 ``antibody_fast.demo.main(argv)``
info       versions, devices, implementation per op     ``antibody_fast.info.main()``
=========  ===========================================  =========================================

The package's modules (docs/design.md §4):

* :mod:`~antibody_fast.cli.commands`: ``main(command, argv)`` of ``align`` / ``finetune`` / ``evaluate``;
* :mod:`~antibody_fast.cli.console`: status lines, the progress bar, the error contract (one line, exit 2);
* :mod:`~antibody_fast.cli.options`: one typed dataclass per command; :mod:`~antibody_fast.cli.resolve`:
  defaults < recipe < config file < flags;
* :mod:`~antibody_fast.cli.runtime`: torchrun world, device, seed, autocast;
* :mod:`~antibody_fast.cli.loading`: model, adapters, adapter mode;
* :mod:`~antibody_fast.cli.inputs`: data order, templates, collator checks;
* :mod:`~antibody_fast.cli.outputs`: run directory, lock, metrics, checkpoint fingerprint, adapter, AUROC and
  suppression report;
* :mod:`~antibody_fast.cli.loop`: :class:`~antibody_fast.cli.loop.TrainLoop`, which
  :mod:`~antibody_fast.cli.align` and :mod:`~antibody_fast.cli.finetune` subclass;
  :mod:`~antibody_fast.cli.evaluate`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "align": (
        "antibody_fast.cli.commands",
        "alignment stage on a model: Antibody (default), Booster, Vaccine or safety SFT",
    ),
    "finetune": (
        "antibody_fast.cli.commands",
        "fine-tuning stage on user data: Antibody's weighted steps, SFT or Lisa",
    ),
    "evaluate": ("antibody_fast.cli.commands", "harmful score (HS) and fine-tune accuracy (FA) of a model"),
    "bench": ("antibody_fast.bench", "run the benchmark suites; write JSON, Markdown and PNG reports"),
    "demo": ("antibody_fast.demo", "the whole defense end to end on CPU with a tiny model (no download)"),
    "info": ("antibody_fast.info", "versions, devices, and which implementation each op uses and why"),
}

_INFO_HELP = """usage: antibody-fast info

Print the versions of antibody_fast and its dependencies, the devices, the C++ extension status and, per
op and device, the implementation impl="auto" picks and why each other one is unavailable.
"""


class CommandUnavailable(RuntimeError):
    """The module implementing a command is not part of this build."""


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    width = max(len(c) for c in COMMANDS)
    epilog = "commands:\n" + "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())
    epilog += "\n\nRun `antibody-fast COMMAND --help` for the options of a command."
    p = argparse.ArgumentParser(
        prog="antibody-fast",
        usage="antibody-fast [-h] [--version] COMMAND [ARGS...]",
        description="Antibody defense against harmful fine-tuning, with fused kernels and a lean training loop.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"antibody_fast {__version__}")
    p.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS)
    )
    return p


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split at the command: (options before it + the command, everything after it)."""
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return argv[: i + 1], argv[i + 1 :]
    return argv, []


def _load(command: str) -> Callable[[list[str]], object]:
    """The callable running ``command`` with its own argument list."""
    module_name = COMMANDS[command][0]
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise CommandUnavailable(
                f"`antibody-fast {command}` is not available in this build ({module_name} is missing)"
            ) from e
        raise CommandUnavailable(
            f"`antibody-fast {command}` needs the package {e.name!r}, which is not installed ({e})"
        ) from e
    fn = getattr(mod, "main", None)
    if fn is None:
        raise CommandUnavailable(
            f"`antibody-fast {command}` is not available in this build ({module_name} has no main())"
        )
    if _parameters(fn)[:1] == ["command"]:  # main(command, argv): one module serving several commands
        return lambda args: fn(command, args)
    if command == "info":
        return lambda args: _run_info(fn, args)
    return fn


def _parameters(fn) -> list[str]:
    """The names of ``fn``'s parameters (none when it cannot be inspected)."""
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _run_info(fn, args: list[str]):
    if _parameters(fn):
        return fn(args)
    if any(a in ("-h", "--help") for a in args):
        print(_INFO_HELP, end="")
        return 0
    if args:
        print(f"antibody-fast info: error: unexpected arguments: {' '.join(args)}", file=sys.stderr)
        return 2
    return fn()


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message") convention
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``antibody-fast`` with ``argv`` (default ``sys.argv[1:]``); return the exit status (never raises
    SystemExit, so it can be called from Python: ``main(["bench", "--quick"])``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head, rest = _split(argv)
    parser = _parser()
    try:
        if not head:
            parser.print_help()
            return 2
        ns = parser.parse_args(head)
    except SystemExit as e:  # --help, --version, unknown command
        return _exit_code(e.code)
    try:
        run = _load(ns.command)
    except CommandUnavailable as e:
        print(f"antibody-fast: error: {e}", file=sys.stderr)
        return 2
    try:
        return _exit_code(run(rest))
    except SystemExit as e:  # the command's own argparse (--help, bad options) or sys.exit
        return _exit_code(e.code)
    except KeyboardInterrupt:
        print("antibody-fast: interrupted", file=sys.stderr)
        return 130


def exit_process(rc: int) -> None:
    """Leave the process with status ``rc``. In a ``torchrun`` worker (``WORLD_SIZE > 1``) the streams are flushed
    and the process ends with ``os._exit``, skipping the interpreter's teardown. With torch 2.13 on gloo, a
    ``pt_gloo_runloop`` thread still alive at teardown (the device mesh of the DTensors, or another reference,
    keeps the process group object alive past ``destroy_process_group``) takes the GIL while the interpreter
    finalises, is made to exit inside a C++ frame and aborts the process ("terminate called without an active
    exception", SIGABRT; seen under gdb, in about one worker exit in ten here). torchrun then reports a failed run
    whose work was all done. Everything the commands write is closed (and checkpoints fsynced) before this."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def console_main() -> None:
    """The ``antibody-fast`` console script: :func:`main`, then :func:`exit_process`."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
