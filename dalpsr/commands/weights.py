"""`dalpsr weights`: the weights dalpsr can use, where they come from, and which are found locally."""

from __future__ import annotations

import json

from dalpsr.loaders.manifest import load_manifest


def add_commands(subparsers) -> None:
    """Register `dalpsr weights`."""
    parser = subparsers.add_parser(
        "weights",
        help="list the weights dalpsr can use, where they come from, and which are found locally",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run_weights)


def run_weights(args) -> int:
    entries = load_manifest()
    if args.json:
        rows = [{**entry.__dict__, "found": str(entry.local_path() or "")} for entry in entries]
        print(json.dumps(rows, indent=2))
        return 0
    for entry in entries:
        found = entry.local_path()
        where = f"found at {found}" if found else (f"set ${entry.env} to a local copy" if entry.env else "pass a path")
        print(f"{entry.name}: {entry.role}\n  source: {entry.source}\n  licence: {entry.licence}")
        print(f"  load: {entry.load}\n  local: {where}\n")
    return 0
