"""Reading and writing the small config files of a checkpoint (YAML, JSON) with one-line errors.

Every failure (missing, unreadable, not UTF-8, not valid, not a mapping) is a QkvconvError that
names the file; symlinks must stay inside the checkpoint (sources.check_inside).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from qkvconv.errors import QkvconvError
from qkvconv.io.sources import check_inside


def _read_mapping(path: Path, parse: Callable[[str], Any], kind: str, errors: tuple[type[Exception], ...]) -> dict[str, Any]:
    """Read, decode and parse a small text file that must hold a mapping; one QkvconvError otherwise."""
    check_inside(path, path.parent)
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise QkvconvError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except errors as e:
        raise QkvconvError(f"{path} is not valid {kind}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QkvconvError(f"{path} does not hold a {kind} mapping")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    return _read_mapping(path, yaml.safe_load, "YAML", (yaml.YAMLError,))


def write_yaml(data: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def read_json(path: Path) -> dict[str, Any]:
    return _read_mapping(path, json.loads, "JSON", (ValueError,))
