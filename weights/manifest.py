"""The weight manifest (`manifest.json`): which weights dalpsr can use, their sources, licences and loaders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path


@dataclass(frozen=True)
class WeightEntry:
    """One manifest entry; `env` names the environment variable that points at a local copy, if any."""

    name: str
    role: str
    source: str
    licence: str
    layout: str
    load: str
    env: str | None

    def local_path(self) -> Path | None:
        """The local copy named by `env`, when that variable is set and the path exists."""
        value = os.environ.get(self.env) if self.env else None
        return Path(value) if value and Path(value).exists() else None


def load_manifest() -> list[WeightEntry]:
    """The entries of the shipped `manifest.json`."""
    data = json.loads((files("dalpsr.weights") / "manifest.json").read_text(encoding="utf-8"))
    return [WeightEntry(**entry) for entry in data["weights"]]


def add_commands(subparsers) -> None:
    """Register `dalpsr weights`."""
    parser = subparsers.add_parser(
        "weights",
        help="list the weights dalpsr can use, where they come from, and which are found locally",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_list_weights)


def _list_weights(args) -> int:
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
