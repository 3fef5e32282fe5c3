"""Command-line helpers shared by the toy demo's parser (:mod:`antibody_fast.demo.cli`) and the real-model
demo's (:mod:`antibody_fast.demo.real_cli`)."""

from __future__ import annotations


def add_overrides(kw: dict, args, names) -> None:
    """Shared by the toy and real-model demo parsers: ``--seeds`` (comma-separated ints) and every option in
    ``names`` that was given on the command line, into the config keywords ``kw``."""
    if args.seeds is not None:
        try:
            kw["seeds"] = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not kw["seeds"]:
            raise ValueError("--seeds is empty")
    for name in names:
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
