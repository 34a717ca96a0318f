"""One dataclass per stage; its field docs become --help, presets and config files override fields."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_args, get_origin, get_type_hints

from nrrdd import NrrddError


def help_field(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def add_config_args(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """Add --field-name for every field of dataclass `cls`; defaults stay None so presets are not masked."""
    group = parser.add_argument_group(title or cls.__name__, cls.__doc__)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if get_origin(typ) is not None:  # Optional[...] / X | None
            typ = next(a for a in get_args(typ) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        desc = f"{f.metadata.get('help', '')} (default: {f.default})"
        if typ is bool:
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=desc)
        elif typ in (tuple, list) or get_origin(hints[f.name]) in (tuple, list):
            group.add_argument(flag, dest=f.name, default=None, type=float, nargs="+", help=desc)
        else:
            group.add_argument(flag, dest=f.name, default=None, type=typ, help=desc)


def build_config(cls, *layers: dict | argparse.Namespace | None):
    """Instantiate `cls` from its defaults overlaid by each layer in turn (preset, config file, CLI flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        items = vars(layer).items() if isinstance(layer, argparse.Namespace) else layer.items()
        for k, v in items:
            if v is None:
                continue
            if k not in names:
                if isinstance(layer, argparse.Namespace):
                    continue  # other stages' flags share the namespace
                raise NrrddError(f"unknown {cls.__name__} field '{k}'; known: {', '.join(sorted(names))}")
            values[k] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def load_config_file(path) -> dict:
    from nrrdd.io import read_json
    return read_json(path)


def to_dict(cfg) -> dict:
    """The config as it reads back from JSON (tuples become lists), so saved and live settings compare equal."""
    import json
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
