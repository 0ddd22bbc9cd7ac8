"""`mnemo models`: list the model zoo, or show one model's config fields and defaults."""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the available model architectures",
        description="List the registered model architectures with a one-line description each, or show the "
        "configuration fields (and defaults) of one model. Any field can be overridden in a training config.",
    )
    p.add_argument("name", nargs="?", help="show this model's configuration fields instead of the list")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mnemo import models
    from mnemo.cli import print_json

    if args.name is None:
        rows = {name: models.get_entry(name).description for name in models.list_models()}
        if args.json:
            print_json(rows)
        else:
            width = max(map(len, rows))
            for name, description in rows.items():
                print(f"{name:<{width}}  {description}")
        return 0
    entry = models.get_entry(args.name)
    defaults = dataclasses.asdict(entry.config_cls())
    if args.json:
        print_json({"name": entry.name, "description": entry.description, "config": defaults})
    else:
        print(f"{entry.name}: {entry.description}\n")
        for key, value in defaults.items():
            print(f"  {key} = {value!r}")
    return 0
