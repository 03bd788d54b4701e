"""Legacy litgpt (grouped `attn.attn`, LoRA included) -> current litgpt (sequential `attn.qkv`).

Every new file is written beside the original under a temporary name, read back and checked
against the original (each re-ordered row accounted for; each LoRA update matrix equal under old
and new semantics) and only then swapped in through a `Transaction`. With `out` the source is left
untouched and a complete new directory appears at `out` in one rename.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.model.layout import HeadLayout, QKVOrder, permutation, permutation_rows, reorder
from qkvconv.io.config_files import write_yaml
from qkvconv.formats.litgpt import (
    current_name,
    CONFIG,
    HYPERPARAMETERS,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    QKV_KEY,
    WEIGHTS,
    LitgptCheckpoint,
    LoraHyperparameters,
    StateDictFile,
    check_full_shapes,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    open_litgpt,
    qkv_naming,
)
from qkvconv.io.bytepath import open_bytes, same_bytes
from qkvconv.io.safetensors_header import dtype_name
from qkvconv.io.engine import execute, only_copies, output_layout
from qkvconv.formats.litgpt.plans import full_upgrade_plan
from qkvconv.plans.plan import Plan
from qkvconv.progress import progress_for
from qkvconv.io.torch_pickle import TorchZipHeaders
from qkvconv.io.writers import TorchWriter, save_torch
from qkvconv.io.transaction import (
    copy_other_files,
    JOURNAL_NAME,
    DirectoryLock,
    Replacement,
    new_directory,
    recover,
)


if TYPE_CHECKING:  # torch is imported where tensors are: a full model's upgrade only moves rows (bytepath.py)
    import torch

    from qkvconv.io.readers import TensorReader


def open_reader(path: Path) -> TensorReader:
    from qkvconv.io.readers import open_reader as torch_reader

    return torch_reader(path)


@dataclass
class UpgradeReport:
    """What an upgrade did, for the CLI to print (or emit as JSON)."""

    source: Path
    destination: Path
    changed: bool
    actions: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    lora_rank: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know or do next (not done here)

    def as_dict(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "changed": self.changed,
            "actions": self.actions,
            "checks": self.checks,
            "recovered": self.recovered,
            "lora_rank": list(self.lora_rank) if self.lora_rank else None,
            "notes": self.notes,
        }


# A forward-pass check (see verify.py): called with (original dir, staged dir or file map), raises CheckFailed.
ForwardCheck = Callable[[LitgptCheckpoint, dict[str, Path]], str]


def lora_plan_for(hyper: LoraHyperparameters | None, heads: HeadLayout):
    from qkvconv.model.lora import plan_reorder

    if hyper is None or not any(hyper.settings.enable):
        return None
    return plan_reorder(hyper.settings.enable, heads)


def upgrade_tensors(
    sd: StateDictFile, heads: HeadLayout, hyper: LoraHyperparameters | None
) -> tuple[dict[str, torch.Tensor], int]:
    """New tensors for current litgpt (same key order) and the factor the LoRA rank grew by."""
    from qkvconv.model.lora import apply_reorder, expand_rank

    plan = lora_plan_for(hyper, heads)
    factor = plan.rank_factor if plan is not None else 1
    to_sequential = permutation(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
    new: dict[str, torch.Tensor] = {}
    for name, t in sd.tensors.items():
        m = QKV_KEY.match(name)
        if m and m.group(2) == "attn":
            kind = m.group(3)
            if kind == "lora_A":
                continue  # handled with its lora_B, below
            if kind == "lora_B":
                a = sd.tensors[name[: -len("lora_B")] + "lora_A"]
                assert plan is not None
                new_a, new_b = apply_reorder(a, t, plan)
                new[current_name(name[: -len("lora_B")] + "lora_A")] = new_a
                new[current_name(name)] = new_b
            else:  # weight / bias rows of the fused matrix
                new[current_name(name)] = t.index_select(0, to_sequential)
        elif name.endswith("lora_A") and factor > 1:
            new[name], new[name[: -len("lora_A")] + "lora_B"] = expand_rank(
                t, sd.tensors[name[: -len("lora_A")] + "lora_B"], factor
            )
        elif name.endswith("lora_B") and factor > 1:
            continue  # written with its lora_A
        else:
            new[name] = t
    # keep the original key order (lora_A before lora_B, as litgpt writes them)
    ordered = {current_name(k): new[current_name(k)] for k in sd.tensors}
    return ordered, factor


def check_upgraded(
    old: TensorReader, new: TensorReader, label: str, heads: HeadLayout,
    hyper: LoraHyperparameters | None, factor: int,
) -> list[str]:
    """Check the upgraded file, tensor by tensor as read back from disk, against the original;
    raise CheckFailed on any difference (an allowed NaN/inf must be where it was, bit for bit). Holds
    about two tensors at a time. Readers without `peek` (io/bytepath.py's, of a full model) are compared
    byte for byte in numpy, without torch."""
    mapping = {k: current_name(k) for k in old.names()}
    new_names = set(new.names())
    if set(mapping.values()) != new_names:
        missing, extra = set(mapping.values()) - new_names, new_names - set(mapping.values())
        raise CheckFailed(f"upgraded {label} has missing {sorted(missing)[:3]} / extra {sorted(extra)[:3]} tensors")
    perm = permutation_rows(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
    if sorted(perm) != list(range(heads.rows)):
        raise CheckFailed("the row permutation is not a bijection")
    n_reordered = n_same = n_lora = 0
    compared: dict[str, bool | None] = {}
    if not hasattr(old, "peek"):  # torch-free readers: the bytes compared, two tensors at a time (both cores)
        from concurrent.futures import ThreadPoolExecutor

        def compare(old_name: str) -> bool | None:
            m = QKV_KEY.match(old_name)
            return same_bytes(old, old_name, new, mapping[old_name], perm if m and m.group(2) == "attn" else None)

        plain = [n for n in mapping if not n.endswith(("lora_A", "lora_B"))]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkvconv-check") as pool:
            compared = dict(zip(plain, pool.map(compare, plain)))
    for old_name, new_name in mapping.items():
        if dtype_name(old.meta(old_name).dtype) != dtype_name(new.meta(new_name).dtype):
            raise CheckFailed(f"{new_name}: dtype changed from {old.meta(old_name).dtype} to {new.meta(new_name).dtype}")
        m = QKV_KEY.match(old_name)
        reordered = bool(m and m.group(2) == "attn")
        if old_name.endswith(("lora_A", "lora_B")):
            ok = _lora_update_equal(old, new, old_name, new_name, heads, hyper, factor)
            n_lora += 1
        elif old_name in compared:  # compared above (a re-ordered tensor, by rows)
            ok = bool(compared[old_name])
            n_reordered, n_same = n_reordered + reordered, n_same + (not reordered)
        elif reordered:
            from qkvconv.model.nonfinite import same_bits

            a, b = old.peek(old_name), new.peek(new_name)
            ok = b.shape == a.shape and same_bits(b, a[permutation(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)])
            n_reordered += 1
        else:
            from qkvconv.model.nonfinite import same_bits

            ok = same_bits(old.peek(old_name), new.peek(new_name))
            n_same += 1
        old.release()
        new.release()
        if not ok:
            raise CheckFailed(f"{new_name} in the upgraded {label} does not match the original")
    checks = []
    if n_reordered:
        checks.append(f"{label}: {n_reordered} QKV tensors re-ordered, every row accounted for; {n_same} other tensors bit-identical")
    if n_lora:
        checks.append(f"{label}: the update matrix of all {n_lora // 2} LoRA layers is equal under old and new semantics")
    return checks


def _lora_update_equal(
    old: TensorReader, new: TensorReader, old_name: str, new_name: str,
    heads: HeadLayout, hyper: LoraHyperparameters | None, factor: int,
) -> bool:
    from qkvconv.model.lora import LoraSettings, qkv_delta
    from qkvconv.model.nonfinite import within

    if old_name.endswith("lora_B"):
        return True  # compared with its lora_A
    stem_old, stem_new = old_name[: -len("lora_A")], new_name[: -len("lora_A")]
    a0, b0 = old.read(stem_old + "lora_A"), old.read(stem_old + "lora_B")
    a1, b1 = new.read(stem_new + "lora_A"), new.read(stem_new + "lora_B")
    m = QKV_KEY.match(old_name)
    if m and m.group(2) == "attn":
        assert hyper is not None
        s = hyper.settings
        before = reorder(qkv_delta(a0, b0, s, heads, legacy=True), QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
        after = qkv_delta(a1, b1, LoraSettings(s.r * factor, s.alpha * factor, s.enable), heads, legacy=False)
    else:
        before = b0.double() @ a0.double()
        after = b1.double() @ a1.double()
    return within(before, after, 1e-12 + 1e-12 * after.abs())  # torch.allclose's test, NaN equal to NaN


@dataclass
class _StagedFile:
    """One legacy weight file and how its upgrade is made: in memory (LoRA adapters are small)
    or streamed through the engine (full models)."""

    target: str
    original: StateDictFile
    factor: int = 1
    tensors: dict[str, torch.Tensor] | None = None  # in-memory result
    plan: Plan | None = None  # streamed result
    allow_nonfinite: bool = False  # streamed: NaN/inf inputs are refused unless the user accepts them
    early: Any = None  # _Early: the check of a streamed file, started while it is synced


def _needs_upgrade(ckpt: LitgptCheckpoint) -> tuple[list[StateDictFile], bool]:
    """The legacy weight files of a checkpoint and whether its config needs migrating."""
    legacy: list[StateDictFile] = []
    for path in ckpt.weight_files():
        sd = _headers(path) if path.name == WEIGHTS else None
        sd = sd or load_state_dict_file(path)
        if path.name == LORA_WEIGHTS:
            assert ckpt.hyperparameters is not None
            check_lora_shapes(sd, ckpt.shape, ckpt.hyperparameters)
        else:
            check_full_shapes(sd, ckpt.shape)
        if qkv_naming(sd.tensors, path) == LEGACY_NAMING:
            legacy.append(sd)
    _, config_changes = migrate_config(ckpt.config)
    return legacy, bool(config_changes)


def _headers(path: Path) -> StateDictFile | None:
    """A full model's .pth as the torch-free reader sees it (names, shapes, wrapping; io/bytepath.py), where
    it can: its upgrade then only moves bytes and imports no torch. None: torch.load reads it."""
    headers = open_bytes(path)
    if not isinstance(headers, TorchZipHeaders) or headers.extra:
        return None
    return StateDictFile(path, {n: headers.meta(n) for n in headers.names()}, headers.wrapped)  # type: ignore[misc]


class _Early:
    """A torch-free check of a staged file, run in a thread once the file is complete, while its writer
    makes it durable (fsync waits on the disk, the check reads the page cache)."""

    def __init__(self, check: Callable[[], Any]) -> None:
        self._outcome: Any = None
        self._thread = threading.Thread(target=self._run, args=(check,), name="qkvconv-check", daemon=True)
        self._thread.start()

    def _run(self, check: Callable[[], Any]) -> None:
        try:
            self._outcome = check()
        except BaseException as e:  # handed to result()
            self._outcome = e

    def result(self) -> Any:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


def _early_check(item: _StagedFile, path: Path, ckpt: LitgptCheckpoint, forward_check: ForwardCheck | None,
                 files: dict[str, Path], alone: bool) -> Callable[[], Any] | None:
    """What `_check` will ask of a streamed file that can run without torch as soon as the file is complete:
    bitcheck's verdict (a str, or None: undecided), or, without a check, the file-against-file comparison
    (its lines, or None where the torch-free readers cannot serve)."""
    if forward_check is not None:
        bytes_only = getattr(forward_check, "bytes_only", None)
        return (lambda: bytes_only(ckpt, files)) if bytes_only is not None and alone else None

    def compare() -> list[str] | None:
        old, new = _byte_readers(item, path)
        if old is None:
            return None
        return check_upgraded(old, new, path.name, ckpt.shape.heads, ckpt.hyperparameters, item.factor)

    return compare


def _stream(item: _StagedFile, path: Path, fingerprints: dict[str, Any] | None,
            early: Callable[[], Any] | None = None) -> None:
    """Write a full model file through the engine: each tensor read once, re-ordered, written; where it only
    moves bytes, without torch, and the source's checksums taken as it reads (`fingerprints`). `early`: a
    check started once the file is complete, while it is synced."""
    assert item.plan is not None
    reader = open_bytes(item.original.path)
    if reader is None or not only_copies(item.plan, reader):
        reader, fingerprints = open_reader(item.original.path), None
    layout = output_layout(item.plan, reader)
    with TorchWriter(path, layout, wrapped=item.original.wrapped) as writer:
        progress = progress_for(sum(m.nbytes for m in layout.values()), f"writing {path.name}")
        execute(item.plan, reader, writer, progress, allow_nonfinite=item.allow_nonfinite, fingerprints=fingerprints)
        if early is not None:
            writer.finish()
            item.early = _Early(early)


def _write_and_check(
    staged: list[_StagedFile], paths: dict[str, Path], ckpt: LitgptCheckpoint, report: UpgradeReport,
    forward_check: ForwardCheck | None, files: dict[str, Path],
) -> None:
    for item in staged:
        path = paths[item.target]
        if item.plan is not None:
            _stream(item, path, getattr(forward_check, "fingerprints", None),
                    _early_check(item, path, ckpt, forward_check, files, len(staged) == 1))
        else:
            assert item.tensors is not None
            save_torch(item.original.payload(item.tensors), path)
        written = open_bytes(path) or open_reader(path)  # check what is on disk, not what is in memory
        if getattr(written, "wrapped", None) != item.original.wrapped:
            raise CheckFailed(f"{path.name}: wrapping changed")


def _check(staged: list[_StagedFile], paths: dict[str, Path], ckpt: LitgptCheckpoint, report: UpgradeReport,
           forward_check: ForwardCheck | None, files: dict[str, Path]) -> None:
    """The check before anything is replaced: `forward_check` (ops/check.py, which reads the staged files as
    the checkpoint they become and proves every tensor in litgpt's names), else, or where it cannot run
    (a LoRA run whose base is not found), file against file: each re-ordered row accounted for, the rest
    bit-identical, each LoRA update equal."""
    early = [item.early for item in staged if item.early is not None]
    said = None
    if forward_check is not None:  # bitcheck's verdict, taken while the file was synced, or the check itself
        said = early[0].result() if early else None
        fallback = getattr(forward_check, "fallback", forward_check) if early else forward_check
        said = said or fallback(ckpt, files)
    if said is None or said.startswith("check skipped"):
        for item in staged:
            lines = item.early.result() if forward_check is None and item.early is not None else None
            if lines is None:
                old, new = _byte_readers(item, paths[item.target])
                lines = check_upgraded(old or open_reader(item.original.path), new or open_reader(paths[item.target]),
                                       paths[item.target].name, ckpt.shape.heads, ckpt.hyperparameters, item.factor)
            report.checks += lines
    if said is not None:
        report.checks.append(said)


def _byte_readers(item: _StagedFile, staged: Path) -> tuple[Any, Any]:
    """Torch-free readers of a streamed full model's original and staged file, where both serve every tensor
    as bytes (io/bytepath.py); (None, None) otherwise."""
    if item.plan is None:
        return None, None
    old, new = open_bytes(item.original.path), open_bytes(staged)
    if old is None or new is None or any(old.raw(n) is None for n in old.names()) or \
            any(new.raw(n) is None for n in new.names()) or any(n.endswith(("lora_A", "lora_B")) for n in old.names()):
        return None, None
    return old, new


def upgrade(
    source: Path,
    out: Path | None = None,
    *,
    base: Path | None = None,
    forward_check: ForwardCheck | None = None,
    allow_nonfinite: bool = False,
) -> UpgradeReport:
    """Upgrade a legacy litgpt checkpoint (full or LoRA run) in place, or into `out`."""
    directory = source.parent if source.is_file() else source
    if not directory.is_dir():
        raise QkvconvError(f"{source} does not exist")
    with DirectoryLock(directory):
        if out is None:
            recovered = recover(directory)
        else:
            if (directory / JOURNAL_NAME).exists():
                raise QkvconvError(
                    f"an interrupted in-place upgrade of {directory} is pending; run `qkvconv upgrade {directory}` first"
                )
            recovered = []
        ckpt = open_litgpt(directory)
        legacy_files, config_legacy = _needs_upgrade(ckpt)
        report = UpgradeReport(directory, out or directory, changed=False, recovered=recovered)
        if not legacy_files and not config_legacy:
            if out is not None:
                _copy_tree(directory, out, skip=set())
                report.actions.append(f"already current; copied unchanged to {out}")
            else:
                report.actions.append("already current (attn.qkv, sequential order): nothing to do")
            return report
        if forward_check is None:  # --no-verify: still read back before replacing, from checksums where it can
            from qkvconv.ops.bitcheck import ReadBack

            forward_check = ReadBack()
        if hasattr(forward_check, "start"):  # the original's checksums, taken while the upgrade is written
            forward_check.start(ckpt)  # type: ignore[union-attr]
        staged: list[_StagedFile] = []
        for sd in legacy_files:
            if sd.path.name == LORA_WEIGHTS or sd.extra:  # small, or with non-tensor entries: in memory
                if not allow_nonfinite:  # a streamed file's inputs are checked by the engine as it reads them
                    from qkvconv.model.nonfinite import check_all_finite

                    check_all_finite(sd.tensors)
                tensors, factor = upgrade_tensors(sd, ckpt.shape.heads, ckpt.hyperparameters)
                staged.append(_StagedFile(sd.path.name, sd, factor, tensors=tensors))
            else:
                plan = full_upgrade_plan(list(sd.tensors), ckpt.shape.heads)
                staged.append(_StagedFile(sd.path.name, sd, plan=plan, allow_nonfinite=allow_nonfinite))
            report.actions.append(f"{sd.path.name}: attn.attn (grouped) -> attn.qkv (sequential)")
        factor = max((s.factor for s in staged), default=1)
        new_config, config_changes = migrate_config(ckpt.config)
        report.actions += [f"{CONFIG}: {c}" for c in config_changes]
        new_hyper = None
        if ckpt.hyperparameters is not None:
            new_hyper = dict(ckpt.hyperparameters.raw)
            if factor > 1:
                s = ckpt.hyperparameters.settings
                new_hyper["lora_r"], new_hyper["lora_alpha"] = s.r * factor, s.alpha * factor
                report.lora_rank = (s.r, s.r * factor)
                report.actions.append(
                    f"LoRA on all of q, k, v: exact adapter at rank {s.r * factor} (was {s.r}); "
                    f"lora_alpha {s.alpha} -> {s.alpha * factor}, so alpha/r is unchanged"
                )
        report.notes += _legacy_base_warning(ckpt)
        if out is None:
            _upgrade_in_place(ckpt, staged, new_config if config_changes else None,
                              new_hyper if factor > 1 else None, report, forward_check)
        else:
            _upgrade_into(ckpt, out, staged, new_config, new_hyper, factor, report, forward_check)
        report.changed = True
        return report


def _legacy_base_warning(ckpt: LitgptCheckpoint) -> list[str]:
    """Current litgpt cannot load a legacy base under a LoRA model (its `finetune lora` even leaves the
    QKV weights at random init, loading with strict=False): say so when a LoRA run's base is legacy."""
    base = ckpt.find_base() if ckpt.lora_weights is not None else None
    if base is None:
        return []
    tensors = load_state_dict_file(base / WEIGHTS).tensors
    if qkv_naming(tensors, base / WEIGHTS) != LEGACY_NAMING:
        return []
    return [f"the base checkpoint {base} is legacy too: current litgpt cannot load it under this adapter; "
            f"run `qkvconv upgrade {base}`"]


def _upgrade_in_place(
    ckpt: LitgptCheckpoint, staged: list[_StagedFile], new_config: dict | None, new_hyper: dict | None,
    report: UpgradeReport, forward_check: ForwardCheck | None,
) -> None:
    with Replacement(ckpt.directory) as tx:
        paths = {s.target: tx.stage(s.target) for s in staged}
        if new_config is not None:  # first: the staged files are then complete for a check that starts early
            write_yaml(new_config, tx.stage(CONFIG))
        if new_hyper is not None:
            write_yaml(new_hyper, tx.stage(HYPERPARAMETERS))
        files = {t.name: s for t, s in tx.staged.items()}
        _write_and_check(staged, paths, ckpt, report, forward_check, files)
        _check(staged, paths, ckpt, report, forward_check, files)
        tx.commit()


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy a checkpoint directory's other files (configs, tokenizer) into a fresh `dst`, atomically."""
    with new_directory(dst) as tmp:
        copy_other_files(src, tmp, skip)


def _upgrade_into(
    ckpt: LitgptCheckpoint, out: Path, staged: list[_StagedFile], new_config: dict, new_hyper: dict | None,
    factor: int, report: UpgradeReport, forward_check: ForwardCheck | None,
) -> None:
    with new_directory(out) as tmp:
        rewritten = {s.target for s in staged} | {CONFIG} | ({HYPERPARAMETERS} if new_hyper is not None else set())
        copy_other_files(ckpt.directory, tmp, skip=rewritten)
        paths = {s.target: tmp / s.target for s in staged}
        write_yaml(new_config, tmp / CONFIG)  # first: the files are then complete for a check that starts early
        if new_hyper is not None:
            base = ckpt.find_base()
            name = new_hyper.get("checkpoint_dir")
            if base is not None and name and not Path(name).is_absolute():
                new_hyper["checkpoint_dir"] = str(base)  # a relative path would not resolve from `out`
                report.actions.append(f"{HYPERPARAMETERS}: checkpoint_dir made absolute ({base})")
            write_yaml(new_hyper, tmp / HYPERPARAMETERS)
        files = {**{p.name: p for p in tmp.iterdir()}, **{s.target: paths[s.target] for s in staged}}
        _write_and_check(staged, paths, ckpt, report, forward_check, files)
        _check(staged, paths, ckpt, report, forward_check, files)


