"""The train.py command line, generated from TrainConfig: one flag per field (`--n-layer 4` or `--n_layer=4`),
`--config PRESET` underneath, `--help` with every default."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import DEFAULT_TRAIN_PRESET, TRAIN_PRESETS, TrainConfig, _flag
from ..errors import JaxlmError


def _parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _optional(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def train_arg_parser(preset: str = DEFAULT_TRAIN_PRESET, prog: str = "train.py") -> argparse.ArgumentParser:
    """`--config NAME` plus one flag per TrainConfig field, spelled `--n-layer 4` or `--n_layer=4`."""
    if preset not in TRAIN_PRESETS:
        raise JaxlmError(f"unknown --config {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | TRAIN_PRESETS[preset]
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a GPT (from scratch, from a pretrained GPT-2, or resuming a run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=preset, choices=sorted(TRAIN_PRESETS), help="preset the flags below override")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        names = [f"--{_flag(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw = dict(dest=f.name, default=defaults[f.name], help=f.metadata["help"], choices=f.metadata.get("choices"))
        if kind is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            base = next(a for a in typing.get_args(kind) if a is not type(None)) if typing.get_args(kind) else kind
            kw.update(type=_optional(base) if base is not kind else base)
            if not kw["choices"]:
                kw["metavar"] = base.__name__.upper()
        p.add_argument(*names, **kw)
    return p


def parse_train_flags(argv=None, prog: str = "train.py") -> tuple[dict, frozenset[str]]:
    """(every TrainConfig field's value, names of the fields set by flags or the chosen preset).

    Values are not yet validated: a resumed run first merges them into the stored run's config.
    Unknown flags and values of the wrong type exit with argparse's usage error (status 2).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_TRAIN_PRESET)
    known, _ = pre.parse_known_args(argv)
    parser = train_arg_parser(known.config, prog)
    values = vars(parser.parse_args(argv))
    preset = values.pop("config")
    explicit = set(_explicit_dests(parser, argv)) - {"config"}
    return values, frozenset(explicit | set(TRAIN_PRESETS[preset]))


def parse_train_args(argv=None, prog: str = "train.py") -> tuple[TrainConfig, frozenset[str]]:
    """(validated config, names of the fields set by flags or the preset)."""
    values, explicit = parse_train_flags(argv, prog)
    return TrainConfig(**values), explicit


def _explicit_dests(parser: argparse.ArgumentParser, argv) -> list[str]:
    """The dests given on the command line: parse again with every default suppressed."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return list(vars(parser.parse_args(argv)))
