"""Reading and writing the small config files of a checkpoint (YAML, JSON) with one-line errors.

Every failure (missing, unreadable, not UTF-8, not valid, not a mapping) is a QkvconvError that
names the file; symlinks must stay inside the checkpoint (sources.check_inside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from qkvconv.errors import QkvconvError
from qkvconv.sources import check_inside


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise QkvconvError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise QkvconvError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QkvconvError(f"{path} does not hold a mapping of settings")
    return data


def write_yaml(data: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def read_json(path: Path) -> dict[str, Any]:
    check_inside(path, path.parent)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise QkvconvError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise QkvconvError(f"{path} does not hold a JSON object")
    return data
