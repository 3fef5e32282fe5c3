"""Reading the options of ``align`` / ``finetune`` / ``evaluate``: built-in defaults < ``--recipe`` <
``--config FILE`` < flags on the command line (see :mod:`antibody_fast.recipes`).

The parser's defaults are ``SUPPRESS``, so an option counts as given only when it is on the command line or
in the file; every value is type-checked as it is read, and the resolved set is validated by its options
class (:mod:`antibody_fast.cli.options`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from ..recipes import RECIPES, recipe_values
from .console import CLIError
from .options import CLI_SOURCE, DEFAULT_SOURCE, OPTIONS, SPECS, CommonOptions, Opt, TrainOptions, flag_name

__all__ = ["parser", "parse_options", "resolve_options", "resolve", "show"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits 2; keep that but as our error
        raise CLIError(message)


def parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of ``command`` (its ``--help`` names each recipe's default)."""
    p = _Parser(
        prog=f"antibody-fast {command}",
        description=OPTIONS[command].description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    for o in SPECS[command]:
        flag = flag_name(o.name)
        default_txt = _default_help(command, o)
        if o.flag:
            p.add_argument(flag, dest=o.name, action="store_true", help=o.help)
        elif o.list_:
            p.add_argument(flag, dest=o.name, action="append", type=str, help=o.help + default_txt)
        else:
            p.add_argument(flag, dest=o.name, type=o.type, choices=o.choices, help=o.help + default_txt)
    return p


def show(v) -> str:
    """An option value as on the command line (lists comma separated)."""
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _default_help(command: str, o: Opt) -> str:
    """`` (default: X; --recipe paper: Y)``: where each default comes from, recipe by recipe."""
    shown = (
        o.default is not None and o.default is not False and o.default != []
    )  # (0 == False: test identity)
    parts = [f"default: {show(o.default)}"] if shown else []
    for name in RECIPES:
        values = recipe_values(name, command)
        if name != "default" and o.name in values and values[o.name] != o.default:
            parts.append(f"--recipe {name}: {show(values[o.name])}")
    return f" ({'; '.join(parts)})" if parts else ""


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise CLIError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a JSON config"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise CLIError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: the config must be a mapping of option names to values")
    return data


def _coerce(o: Opt, value: Any, where: str) -> Any:
    if o.list_:
        items = value if isinstance(value, list) else [value]
        out = []
        for v in items:
            if not isinstance(v, str):
                raise CLIError(f"{where}: option {o.name!r} must be a string or a list of strings, got {v!r}")
            if o.name == "lora_targets":
                out.extend(t.strip() for t in v.split(",") if t.strip())
            else:
                out.append(v)
        return out
    if o.flag:
        if not isinstance(value, bool):
            raise CLIError(f"{where}: option {o.name!r} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    try:
        if o.type is int and (
            isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
        ):
            raise ValueError
        v = o.type(value)
    except (TypeError, ValueError):
        raise CLIError(
            f"{where}: option {o.name!r} must be {getattr(o.type, '__name__', 'a number')}, got {value!r}"
        ) from None
    if o.choices is not None and v not in o.choices:
        raise CLIError(f"{where}: option {o.name!r} must be one of {list(o.choices)}, got {v!r}")
    return v


def resolve(
    command: str, argv: Sequence[str], *, allow_missing: bool = False
) -> tuple[CommonOptions, dict[str, str], list[str]]:
    """:func:`resolve_options` with the options as their command's dataclass
    (:class:`~antibody_fast.cli.options.AlignOptions`, ...)."""
    ns = vars(parser(command).parse_args(list(argv)))
    spec = {o.name: o for o in SPECS[command]}
    opts = {name: (list(o.default) if o.list_ else o.default) for name, o in spec.items()}
    sources = dict.fromkeys(spec, DEFAULT_SOURCE)
    cfg_path = ns.pop("config", None)
    from_file: dict[str, Any] = {}
    if cfg_path is not None:
        for key, value in _read_config(cfg_path).items():
            name = str(key).replace("-", "_")
            if name not in spec:
                raise CLIError(
                    f"{cfg_path}: unknown option {key!r} for {command} (known: {', '.join(sorted(spec))})"
                )
            from_file[name] = _coerce(spec[name], value, cfg_path)
    from_cli = {name: _coerce(spec[name], value, CLI_SOURCE) for name, value in ns.items()}
    layers = []
    if "recipe" in spec:
        recipe = from_cli.get("recipe", from_file.get("recipe", opts["recipe"]))
        layers.append((f"recipe {recipe}", recipe_values(recipe, command)))
    layers += [(f"config {cfg_path}", from_file), (CLI_SOURCE, from_cli)]
    for label, layer in layers:
        if "epochs" in spec and layer.get("epochs") is not None and "steps" in layer:
            raise CLIError(f"{label}: give --steps or --epochs, not both")
        for name, value in layer.items():
            opts[name], sources[name] = value, label
        if "epochs" in spec:  # the later layer decides the run's length
            if "steps" in layer:
                opts["epochs"], sources["epochs"] = None, label
            elif layer.get("epochs") is not None:
                opts["steps"], sources["steps"] = None, label + " (from --epochs)"
    options = OPTIONS[command](**opts)
    options.validate()
    if isinstance(options, TrainOptions):
        options.apply_method(sources)
    missing = options.missing()
    if missing and not allow_missing:
        raise CLIError(missing[0])
    return options, sources, missing


def resolve_options(
    command: str, argv: Sequence[str], *, allow_missing: bool = False
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Resolve the options of ``command``: built-in defaults < ``--recipe`` (align / finetune) < ``--config``
    file < command-line flags. The parser's defaults are ``SUPPRESS``, so an option counts as given only when
    it is on the command line or in the file. Validates types, choices, ranges, required options and the
    options each ``--method`` reads.

    Returns ``(options, sources, missing)``: ``sources[name]`` says where each value came from (``"default"``,
    ``"recipe paper"``, ``"config FILE"``, ``"command line"``); ``missing`` lists the unmet requirements, which
    raise :class:`CLIError` unless ``allow_missing`` (``--dry-run``)."""
    options, sources, missing = resolve(command, argv, allow_missing=allow_missing)
    return options.as_dict(), sources, missing


def parse_options(command: str, argv: Sequence[str]) -> dict[str, Any]:
    """Resolve the options of ``command`` (see :func:`resolve_options`); raises :class:`CLIError`."""
    return resolve_options(command, argv)[0]
