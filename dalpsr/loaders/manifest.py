"""The weight manifest (`manifest.json`): which weights dalpsr can use, their sources, licences and loaders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dalpsr.package_data import package_data


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


def shipped_weights(name: str = "") -> Path:
    """The folder `weights/<name>` of this installation (package data)."""
    return package_data("weights", name)


def load_manifest() -> list[WeightEntry]:
    """The entries of the shipped `manifest.json`."""
    data = json.loads((shipped_weights() / "manifest.json").read_text(encoding="utf-8"))
    return [WeightEntry(**entry) for entry in data["weights"]]
