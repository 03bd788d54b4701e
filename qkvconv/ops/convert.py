"""`qkvconv convert`: between the registry's formats (formats/), optionally transforming the weights
exactly on the way (rotary order, key/value heads, norm folding, QKV fusion).

Full models go through the streaming engine: a plan is built from the source's tensor names, then each
tensor is read once, transformed and written into a new directory beside `out`, which appears at `out`
in one rename after the result has been checked with a forward pass. Without a transformation a
format may offer a direct plan to the target (copies stay copies); otherwise the plan is source ->
litgpt names (the format's `source`), rewritten by plans/transforms.py, composed with litgpt names ->
target (the target format's `target_plan`): still one plan, each source tensor read once. LoRA adapters
(small) convert in memory (ops/adapters.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv import formats
from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.base import Format, Transformations
from qkvconv.formats.litgpt.checkpoint import CONFIG, HYPERPARAMETERS
from qkvconv.io.engine import execute, only_copies, output_layout
from qkvconv.io.transaction import copy_other_files, new_directory
from qkvconv.plans.plan import Plan, TensorMeta
from qkvconv.progress import progress_for

if TYPE_CHECKING:  # torch comes with the modules that compute; a conversion that only moves bytes needs none
    from qkvconv.io.readers import TensorReader

__all__ = ["ConvertReport", "Transformations", "convert", "convert_folding_norms"]

# Files that hold weights (rewritten by a conversion, never copied across formats)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".lora", ".safetensors.index.json", ".bin.index.json",
                   ".chk")  # Meta's checklist.chk: checksums of its .pth files


@dataclass
class ConvertReport:
    source: Path
    destination: Path | None
    source_format: str
    target_format: str
    actions: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)  # --dry-run: one entry per output tensor

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source), "destination": str(self.destination) if self.destination else None,
            "source_format": self.source_format, "target_format": self.target_format,
            "actions": self.actions, "checks": self.checks, "plan": self.plan,
        }


def _dry_run_lines(plan: Plan, layout: dict[str, TensorMeta], shards: dict[str, list[str]]) -> list[dict[str, Any]]:
    shard_of = {name: f for f, names in shards.items() for name in names}
    return [
        {
            "output": r.output, "inputs": list(r.inputs), "steps": r.describe().split("(", 1)[1].rstrip(")"),
            "shape": list(layout[r.output].shape), "dtype": str(layout[r.output].dtype).removeprefix("torch."),
            "bytes": layout[r.output].nbytes, "file": shard_of[r.output],
        }
        for r in plan.recipes
    ]


def _model_configs() -> set[str]:
    """Every full-model format's config files: a transformed conversion writes its own, copies none."""
    return {name for entry in formats.ENTRIES if not entry.adapter for name in entry.load().configs}


def transformed_plan(directory: Path, source_format: str, to: str, changes: Transformations
                     ) -> tuple[Plan, TensorReader, list[str]]:
    """Source -> litgpt names -> fold norms, expand K/V heads, set the rotary order -> `to` (with the
    QKV fusion asked for), as one plan. Returns the plan, the reader and what was done."""
    from qkvconv.ops.adapters import check_qkv_target
    from qkvconv.plans.transforms import expand_kv_heads, fold_norms, set_rope

    source, target = formats.get(source_format).load(), formats.get(to).load()
    check_qkv_target(changes.qkv, target.name)
    src = source.reference_source(directory) if target.holds_reference else source.source(directory)
    if changes.target_base is not None:  # hf: written as that base's architecture
        from qkvconv.formats.hf.format import target_config

        held = target.rope_for(src.config_json, target_config(changes.target_base)[0])
    else:
        held = target.rope_for(src.config_json)  # hf: pairs where the class written is Glm
    if changes.rope is not None and held is not None and changes.rope is not held:
        raise QkvconvError(f"--rope {changes.rope.value} with --to {target.name}: {target.rope_refusal}")
    model, source_rope = src.model, src.model.rope_order
    if changes.fold_norms:
        model = fold_norms(model, tied=src.tied, expressible=lambda cfg: _why_not(target, cfg, src.config_json))
    if changes.kv_heads is not None:
        model = expand_kv_heads(model, changes.kv_heads)
    order = changes.rope or held or source_rope
    model = set_rope(model, order)
    if changes.rope is None and order is not source_rope:
        model.notes.append(f"--to {target.name} holds rotary in {order.value} order only, so the rows were re-ordered")
    plan = target.target_plan(model, src.config_json, changes, source.name)
    return plan, src.reader, model.notes


def _why_not(target: Format, cfg: dict[str, Any], source_json: dict[str, Any] | None) -> str | None:
    """For norm folding: None when `target` can hold a model with this litgpt config, else why not."""
    try:
        target.expressible(cfg, source_json)
    except UnsupportedFamily as e:
        return e.reason
    except QkvconvError as e:
        return str(e)
    return None


def convert(
    source: Path,
    to: str,
    out: Path | None,
    *,
    base: Path | None = None,
    max_shard_size: int | None = 5 * 10**9,
    dry_run: bool = False,
    forward_check: bool = True,
    device: str = "cpu",
    changes: Transformations | None = None,
    merge: bool = False,
    allow_nonfinite: bool = False,
    target_base: Path | None = None,
) -> ConvertReport:
    """Convert `source` into format `to` at `out` (a new directory), with `changes` made on the way.
    `merge`: a litgpt LoRA run becomes a full litgpt checkpoint with the update merged into its base.
    `target_base`: a PEFT adapter is written for that base (the same model in other modules)."""
    target = formats.get(to).load()
    changes = changes or Transformations()
    src_entry, source_path = formats.locate(source)
    directory = source_path
    src = src_entry.load()
    report = ConvertReport(directory, out, src.name, to)
    if merge:
        return _merge(directory, src, to, out, base, changes, forward_check, device, allow_nonfinite, report)
    if src.adapter or target.adapter:
        if changes.of_weights():
            raise QkvconvError(
                "--rope, --kv-heads and --fold-norms transform full models, not LoRA adapters: transform the base "
                "model, or merge the adapter first (`--to litgpt --merge`)"
            )
        if out is None:
            raise QkvconvError("convert writes a new directory: give it with --out DIR")
        if dry_run:
            raise QkvconvError("--dry-run plans full-model conversions; adapters are small and convert in memory")
        from qkvconv.ops.adapters import convert_adapter

        report.actions += convert_adapter(directory, src.name, to, out, base, changes.qkv,
                                          allow_nonfinite=allow_nonfinite, target_base=target_base)
        return report
    if target_base is not None:
        if to != "hf" or changes.qkv is not None:
            raise QkvconvError("--target-base writes a full checkpoint as that base's architecture with --to hf (and "
                               "without --qkv: the base decides), or a PEFT adapter for that base with --to peft")
        changes = replace(changes, target_base=target_base.resolve())
    if out is None and not dry_run:
        raise QkvconvError("convert writes a new directory: give it with --out DIR")
    # a conversion that only moves bytes reads the source through torch-free readers (io/bytepath.py)
    direct = None if changes.any() else src.direct_plan(directory, to, bytes_only=True)
    byte_path = direct is not None and only_copies(*direct)
    if not byte_path and not changes.any():
        direct = src.direct_plan(directory, to)
    notes: list[str] = []
    if direct is None:
        plan, reader, notes = transformed_plan(directory, src.name, to, changes)
    else:
        plan, reader = direct
    layout = output_layout(plan, reader)
    shards = target.files(layout, max_shard_size)
    if dry_run:
        report.plan = _dry_run_lines(plan, layout, shards)
        report.actions.append(
            f"would write {len(layout)} tensors ({sum(m.nbytes for m in layout.values()):,} bytes) in "
            f"{len(shards)} file(s), plus {', '.join(plan.texts) or 'no config'}"
        )
        report.actions += plan.notes + notes
        return report
    assert out is not None
    entry = formats.get(to)
    single = entry.single_file is not None and out.suffix == entry.single_file  # --out model.gguf: that file
    if single and out.exists():
        raise QkvconvError(f"{out} already exists; choose a new --out file")
    build = out.with_name(f".{out.name}.qkvconv-build") if single else out
    prints = None
    fingerprints: dict[str, Any] | None = {} if forward_check and byte_path else None  # the engine's, of the source
    if forward_check and not byte_path:
        from qkvconv.formats.weights import open_weights
        from qkvconv.ops.check import SourcePrints

        # the source's checksums, taken while the engine writes; a transformation changes most tensors
        prints = None if changes.of_weights() else SourcePrints(lambda: open_weights(directory))
    with new_directory(build) as tmp:
        if entry.single_file is None and src_entry.single_file is None:  # a single file has no other files
            # a direct plan keeps the source's own config.json (hf -> hf) or the one kept beside a litgpt checkpoint
            skip = set(plan.texts) | (_model_configs() if direct is None else {CONFIG, HYPERPARAMETERS})
            copy_other_files(directory, tmp, skip, WEIGHT_SUFFIXES)
            if changes.target_base is not None:
                report.actions += _copy_remote_code(changes.target_base, tmp)
        total = sum(m.nbytes for m in layout.values())
        extra = {"header": plan.header} if plan.header else {}
        for name, text in plan.texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        early = None
        with target.writer(tmp, layout, max_shard_size, **extra) as writer:
            execute(plan, reader, writer, progress_for(total, f"writing {out.name}"), allow_nonfinite=allow_nonfinite,
                    fingerprints=fingerprints)
            if fingerprints is not None and hasattr(writer, "finish"):  # read back while close() syncs the file
                writer.finish()
                early = _ByteCheck(directory, src.name, tmp, to, fingerprints)
        report.actions.append(f"wrote {len(layout)} tensors ({total:,} bytes) in {len(shards)} file(s)")
        report.actions += plan.notes + notes
        if forward_check:
            verdict = early.result() if early is not None else None
            report.checks.append(verdict or _check(directory, src.name, tmp, to, device, changes, prints,
                                                   None if early is not None else fingerprints))
    if single:  # the checked file leaves its build directory in one rename
        (written,) = shards
        os.rename(build / written, out)
        build.rmdir()
    return report


class _ByteCheck:
    """ops/bitcheck.py's check in a thread, started once the result is complete: it reads the result back
    from the page cache while the writer makes it durable (fsync waits on the disk, not the CPU)."""

    def __init__(self, directory: Path, source_format: str, tmp: Path, to: str, fingerprints: dict[str, Any]) -> None:
        from qkvconv.formats.hf.variants import thread
        from qkvconv.ops.bitcheck import byte_check

        self._verdict: str | None | BaseException = None
        self._thread = thread(self._run, byte_check, (directory, source_format), (tmp, to), fingerprints)

    def _run(self, byte_check: Any, *args: Any) -> None:
        try:
            self._verdict = byte_check(*args)
        except BaseException as e:  # handed to result()
            self._verdict = e

    def result(self) -> str | None:
        """The verdict; None: not decided here (check.py decides)."""
        self._thread.join()
        if isinstance(self._verdict, BaseException):
            raise self._verdict
        return self._verdict


def _check(directory: Path, source_format: str, tmp: Path, to: str, device: str, changes: Transformations,
           prints: Any, fingerprints: dict[str, Any] | None) -> str:
    """The default check (ops/check.py); without torch where the conversion only moved bytes and every
    tensor holds the source's bits (ops/bitcheck.py), check.py's own verdict otherwise."""
    if fingerprints is not None:
        from qkvconv.ops.bitcheck import byte_check

        verdict = byte_check((directory, source_format), (tmp, to), fingerprints)
        if verdict is not None:
            return verdict
    from qkvconv.formats.weights import open_weights
    from qkvconv.ops.check import conversion_check

    return conversion_check(lambda: (open_weights(directory), open_weights(tmp)), device, "the converted checkpoint",
                            "nothing was written", rounds=changes.fold_norms, source_prints=prints)


def _copy_remote_code(base: Path, out: Path) -> list[str]:
    """The Python files config.json's auto_map names (the remote code that loads it: copied, never imported),
    from --target-base beside the weights written for it."""
    from qkvconv.io.config_files import read_json
    from qkvconv.io.transaction import copy_new

    auto_map = read_json(base / "config.json").get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    files = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})
    copied = [f for f in files if (base / f).is_file() and not (out / f).exists()]
    for f in copied:
        copy_new(base / f, out / f)
    return [f"copied {', '.join(copied)} from {base} (the code its auto_map names; not run)"] if copied else []


def _merge(directory: Path, src: Format, to: str, out: Path | None, base: Path | None, changes: Transformations,
           forward_check: bool, device: str, allow_nonfinite: bool, report: ConvertReport) -> ConvertReport:
    """`--merge`: a litgpt LoRA run merged into its base (ops/merge.py), as `upgrade --lora-merge` does."""
    if src.name != "litgpt-lora" or to != "litgpt" or changes.any() or out is None:
        raise QkvconvError("--merge turns a litgpt LoRA run into a full litgpt checkpoint: --to litgpt --out DIR "
                           "(convert the merged result onwards in a second step)")
    from qkvconv.ops.merge import merge_lora
    from qkvconv.ops.check import upgrade_check

    merged = merge_lora(directory, out, base=base, forward_check=upgrade_check(device) if forward_check else None,
                        allow_nonfinite=allow_nonfinite)
    report.actions += merged.actions
    report.checks += merged.checks
    return report


def convert_folding_norms(source: Path, to: str | None, out: Path | None, **options: Any) -> ConvertReport:
    """`qkvconv fold-norms`: a conversion with every norm folded into the linears it feeds, into the
    source's own format unless `to` names another (full models only: an adapter is refused)."""
    directory = source.parent if source.is_file() else source
    target = to or (formats.detect_name(directory) if directory.is_dir() else "litgpt")
    return convert(source, target, out, changes=Transformations(fold_norms=True), **options)
