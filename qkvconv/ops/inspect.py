"""`qkvconv inspect`: what a checkpoint is (format, heads, QKV row order with the evidence for it, LoRA,
dtypes, sizes), by its format's own `inspect` (formats/), and `--expect` as a CI gate.

The report is a plain dict (stable keys, JSON-ready) so the CLI can render it as a table or as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvconv import formats
from qkvconv.errors import QkvconvError

# Report keys, in the order the table shows them; the JSON mode emits exactly these.
FIELDS = (
    "source", "format", "family", "model", "legacy", "naming", "qkv_order", "evidence", "n_layer", "n_head",
    "n_query_groups", "head_size", "n_embd", "attention", "rope", "lora", "dtype", "parameters", "files", "notes",
)


def inspect_path(source: Path, base: Path | None = None) -> dict[str, Any]:
    """Inspect any supported checkpoint directory (litgpt, litgpt LoRA, Hugging Face, Meta, PEFT).
    `base`: the base of a LoRA run, where its hyperparameters.yaml does not lead to it."""
    if not source.exists():
        raise QkvconvError(f"{source} does not exist")
    entry, path = formats.locate(source)
    report = entry.load().inspect(path, base)
    extra = [k for k in report if k not in FIELDS]  # a format's own keys (HF: architecture) come after
    return {k: report[k] for k in (*FIELDS, *extra) if k in report}


def expectation_failure(report: dict[str, Any], expect: str) -> str | None:
    """`--expect current|legacy` as a CI gate: why the checkpoint is not as expected, or None.

    `current` covers what litgpt will load with it: a LoRA run whose base is legacy computes wrong logits
    under current litgpt, and one whose base cannot be found cannot be said to be current.
    """
    source, lora = report["source"], report.get("lora") or {}
    if expect == "legacy":
        return None if report["legacy"] else f"{source} is current ({report['naming']}), not legacy"
    if report["legacy"]:
        return f"{source} is legacy ({report['naming']}); run `qkvconv upgrade {source}`"
    if "base_legacy" in lora and lora["base_legacy"] is None:
        return (f"the base of the LoRA run {source} (checkpoint_dir={lora['checkpoint_dir']!r}) was not found, so it "
                "is not known to be current; pass --base DIR")
    if lora.get("base_legacy"):
        return (f"the LoRA run {source} is current but its base {lora['base']} is legacy: current litgpt computes "
                f"wrong logits with it; run `qkvconv upgrade {lora['base']}`")
    return None
