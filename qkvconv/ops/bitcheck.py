"""The default check of a conversion that only moved bytes, without torch (io/bytepath.py).

check.py proves, for every tensor meant to come out unchanged in litgpt's names, that it holds the
source's bits (the row and column checksums of its bits), and computes the layers a transformation
changed. A conversion that only moves rows changes none: where both sides describe the same model
(the same function fields of their litgpt configs, the same tensor names) and every tensor's checksums
agree, that is the whole of check.py's proof, and this module gives it without torch: the source's
checksums come from the engine's one read of the source, the result's from reading it back here.

Anything else (a checksum that differs, a config that spells the model differently, a tensor these
cannot compose) is not decided here: the caller runs check.py, which computes what differs and fails
or passes as it always has.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.io.bytepath import Print, litgpt_prints, open_bytes
from qkvconv.model.architecture import Architecture
from qkvconv.progress import status


def litgpt_view(directory: Path, format_name: str, overrides: dict[str, Path] | None = None
                ) -> tuple[dict[str, Any], Any, dict[str, Any]] | None:
    """(litgpt config, torch-free reader, recipes by litgpt name) of a checkpoint directory, as check.py's
    weights see it (formats/weights.py), or None where these cannot read it. `overrides`: files by name
    that replace the directory's (an upgrade's staged files)."""
    if format_name == "hf":
        from qkvconv.formats.hf.config import HF_CONFIG, litgpt_config_from_hf
        from qkvconv.formats.hf.plans import plan_hf_to_litgpt
        from qkvconv.formats.hf.variants import read_config_json

        reader = open_bytes(directory)
        if reader is None:
            return None
        config_json = read_config_json(directory / HF_CONFIG)
        plan = plan_hf_to_litgpt(config_json, reader.names())
        return litgpt_config_from_hf(config_json), reader, {r.output: r for r in plan.recipes}
    if format_name == "litgpt":
        from qkvconv.formats.litgpt.checkpoint import CONFIG, WEIGHTS, ModelShape, migrate_config, open_litgpt
        from qkvconv.io.config_files import read_yaml

        ckpt = open_litgpt(directory)
        files = {WEIGHTS: ckpt.weights, CONFIG: directory / CONFIG, **(overrides or {})}
        if ckpt.weights is None or ckpt.lora_weights is not None:
            return None
        reader = open_bytes(files[WEIGHTS])  # type: ignore[arg-type]
        if reader is None:
            return None
        config = migrate_config(read_yaml(files[CONFIG]))[0]  # type: ignore[arg-type]
        from qkvconv.formats.litgpt.plans import full_upgrade_plan

        plan = full_upgrade_plan(reader.names(), ModelShape.from_config(config, files[CONFIG]).heads)  # type: ignore[arg-type]
        return config, reader, {r.output: r for r in plan.recipes}
    return None


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    out = asdict(Architecture.from_litgpt_config(config))
    out.pop("name")
    return out


def _same(a: Print, b: Print) -> bool:
    import numpy as np

    return a[:2] == b[:2] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])


def byte_check(source: tuple[Path, str], result: tuple[Path, str], source_prints: dict[str, Print],
               overrides: dict[str, Path] | None = None) -> str | None:
    """check.py's verdict where every tensor holds the source's bits in litgpt's names, as check.py words
    it; None where this cannot show that (the caller then runs check.py). `overrides`: the result's files
    that replace the directory's (an in-place upgrade's staged files)."""
    from qkvconv.formats.hf.plans import litgpt_state_names

    start = time.perf_counter()
    with status("checking: reading the result back"):
        try:
            views = litgpt_view(*source), litgpt_view(*result, overrides)
            if views[0] is None or views[1] is None:
                return None
            (config_a, reader_a, recipes_a), (config_b, reader_b, recipes_b) = views  # type: ignore[misc]
            names = litgpt_state_names(config_a)
            if _fields(config_a) != _fields(config_b) or names != litgpt_state_names(config_b):
                return None
            before = litgpt_prints(reader_a, recipes_a, names, dict(source_prints))
            after = litgpt_prints(reader_b, recipes_b, names, {}) if before is not None else None
        except (UnsupportedFamily, QkvconvError, KeyError, ValueError):
            return None
    if before is None or after is None or not all(_same(before[n], after[n]) for n in names):
        return None
    return (f"checked in {time.perf_counter() - start:.1f} s: all {len(names)} tensors hold the source's bits in "
            "litgpt's names (row and column checksums)")


class UpgradeCheck:
    """`upgrade`'s default check (check.UpgradeCheck's interface): the engine fills `fingerprints` with the
    original's checksums as it reads it; the staged files are then read back and compared here, without
    torch. Where that cannot decide (a LoRA run, a file torch.load must read, any difference), check.py's
    UpgradeCheck runs, from the files."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.fingerprints: dict[str, Print] = {}

    def bytes_only(self, original: Any, staged: dict[str, Path]) -> str | None:
        """The verdict without torch, or None (undecided: `fallback` decides)."""
        if not self.fingerprints:
            return None
        return byte_check((original.directory, "litgpt"), (original.directory, "litgpt"), self.fingerprints,
                          overrides=staged)

    def fallback(self, original: Any, staged: dict[str, Path]) -> str:
        """check.py's UpgradeCheck, from the files."""
        from qkvconv.ops.check import upgrade_check

        return upgrade_check(self.device)(original, staged)

    def __call__(self, original: Any, staged: dict[str, Path]) -> str:
        return self.bytes_only(original, staged) or self.fallback(original, staged)


class ReadBack(UpgradeCheck):
    """`upgrade --no-verify`'s read-back before anything is replaced: the staged files' checksums against the
    original's (taken by the engine as it read it), without torch and without computing anything. Where that
    cannot decide (a LoRA run, a file torch must read, any difference) it says nothing, and upgrade compares
    the files themselves (upgrade.check_upgraded), which names the tensor that differs."""

    def bytes_only(self, original: Any, staged: dict[str, Path]) -> str | None:
        said = super().bytes_only(original, staged)  # "checked in ... s: ...": said as what --no-verify does
        return None if said is None else "read back" + said.removeprefix("checked")

    def fallback(self, original: Any, staged: dict[str, Path]) -> None:  # type: ignore[override]
        return None


def upgrade_check(device: str = "cpu") -> UpgradeCheck:
    return UpgradeCheck(device)
