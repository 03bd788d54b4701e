"""The `qkvconv` command line: parse options, call the library, print. Nothing else.

Examples:
    qkvconv inspect fixtures/legacy/gqa_llama
    qkvconv inspect checkpoints/my-run --json --expect current
    qkvconv upgrade checkpoints/my-run                  # in place, atomically, checked first
    qkvconv upgrade out/lora-run --out out/lora-run-v2  # leave the source alone
    qkvconv convert llama-2-7b/ --to hf --out llama-2-7b-hf       # Meta's consolidated.00.pth -> HF
    qkvconv convert hf-model/ --to litgpt --kv-heads 32 --rope pairs --out mha-pairs
    qkvconv fold-norms hf-model/ --out folded                     # norm gains into the linears
    qkvconv convert llama-hf/ --to hf --qkv fused --out phi3-style    # one qkv_proj (Phi3ForCausalLM)

Exit codes: 0 done or nothing to do, 1 a check failed (inspect --expect, verify), 2 bad input or
environment, 3 an internal error (a bug in qkvconv: please report it).
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qkvconv import __version__
from qkvconv.errors import QkvconvError
from qkvconv.rotary import RopeOrder
from qkvconv import convert as converting
from qkvconv import inspection, render, sources
from qkvconv import upgrade as upgrading
from qkvconv import verify as verifying
from qkvconv.weights import open_weights

def reports_errors(command: Callable[..., None]) -> Callable[..., None]:
    """One line and an exit code for every failure a user can cause; no tracebacks.

    Usage errors (bad options) are Typer's own and exit 2, like bad input.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except QkvconvError as e:
            render.error(str(e))
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # the environment said no: permissions, a full disk, a vanished file
            where = f" ({e.filename})" if e.filename else ""
            render.error(f"{e.strerror or e}{where}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            render.error("interrupted; nothing was replaced")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("QKVCONV_DEBUG"):
                raise
            render.error(
                f"internal error ({type(e).__name__}: {e}); this is a bug in qkvconv, please report it "
                "(set QKVCONV_DEBUG=1 for the traceback)"
            )
            raise typer.Exit(3) from None

    return wrapper


app = typer.Typer(
    name="qkvconv",
    help="Inspect, upgrade, convert and verify the attention-weight layouts of LLM checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SourceArg = Annotated[
    str, typer.Argument(help="Checkpoint directory (or its weights file), or a Hub repo id (org/name).", show_default=False)
]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) for repo ids.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="Where the forward pass runs: cpu, cuda or auto.")]
VerifyOpt = Annotated[
    bool, typer.Option("--verify/--no-verify", help="Run a forward pass of source and result before writing or replacing anything.")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (tensors, shapes, bytes, files); write nothing.")]
MaxShardOpt = Annotated[str, typer.Option(help="Largest safetensors shard of hf output (0: one file).")]
NEW_DIR_HELP = "New directory to write (must not exist or be empty)."
NewDirOpt = Annotated[Path, typer.Option(help=NEW_DIR_HELP)]
MaybeNewDirOpt = Annotated[Optional[Path], typer.Option(help=NEW_DIR_HELP)]
AllowNonfiniteOpt = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Convert even when weights hold NaN/inf (refused by default).")
]
BaseOpt = Annotated[Optional[Path], typer.Option(help="Base checkpoint of a LoRA run (default: hyperparameters.yaml).")]


class Rope(str, enum.Enum):
    half = "half"
    pairs = "pairs"


class Fusion(str, enum.Enum):
    fused = "fused"
    split = "split"


class Expect(str, enum.Enum):
    current = "current"
    legacy = "legacy"


@app.command("inspect")
@reports_errors
def inspect_cmd(
    source: SourceArg,
    revision: RevisionOpt = None,
    json: JsonOpt = False,
    expect: Annotated[
        Optional[Expect], typer.Option(help="Exit 1 unless the checkpoint is current (or legacy): a CI gate.")
    ] = None,
) -> None:
    """Show format, heads, QKV row order (with the evidence), LoRA settings, dtypes and sizes."""
    report = inspection.inspect_path(sources.resolve(source, revision))
    if json:
        render.emit_json(report)
    else:
        render.report_table(report, title=f"qkvconv inspect {source}")
    if expect is not None:
        inspection.check_expectation(report, expect.value)


@app.command("upgrade")
@reports_errors
def upgrade_cmd(
    source: SourceArg,
    out: Annotated[Optional[Path], typer.Option(help="Write the upgraded checkpoint here; the source stays untouched.")] = None,
    lora_merge: Annotated[
        bool, typer.Option("--lora-merge", help="Merge a LoRA run into its base weights instead (needs --out).")
    ] = False,
    base: BaseOpt = None,
    verify: VerifyOpt = True,
    device: DeviceOpt = "cpu",
    allow_nonfinite: AllowNonfiniteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Legacy litgpt (grouped attn.attn, LoRA included) -> current litgpt (sequential attn.qkv)."""
    if out is None and not Path(source).exists() and sources.is_repo_id(source):
        raise QkvconvError(f"{source} is a Hub repo id: upgrade it into a directory of your own with --out DIR")
    check = verifying.upgrade_check(device) if verify else None
    report = upgrading.upgrade(sources.resolve(source), out, lora_merge=lora_merge, base=base, forward_check=check,
                               allow_nonfinite=allow_nonfinite)
    if json:
        render.emit_json(report.as_dict())
        return
    for line in report.recovered:
        render.out.print(f"[yellow]{line}[/]")
    render.lines(f"[bold]{'upgraded' if report.changed else 'unchanged'}:[/] {report.destination}", report.actions)
    if report.checks:
        render.lines("[bold green]checked before replacing anything:[/]", report.checks)


def parse_size(text: str) -> int | None:
    """'5GB', '500MB', '2GiB', '0' (no limit) -> bytes, like save_pretrained's max_shard_size."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise QkvconvError(f"--max-shard-size must look like 5GB, 500MB or 2GiB, got {text!r}") from None
    return int(value) or None


@app.command("convert")
@reports_errors
def convert_cmd(
    source: SourceArg,
    to: Annotated[str, typer.Option(help="Target format: litgpt, litgpt-legacy, hf, meta, peft or litgpt-lora.")],
    out: MaybeNewDirOpt = None,
    revision: RevisionOpt = None,
    base: BaseOpt = None,
    max_shard_size: MaxShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = True,
    device: DeviceOpt = "cpu",
    json: JsonOpt = False,
    rope: Annotated[
        Optional[Rope],
        typer.Option(help="Rotary order of the output's Q/K rows: half (HF, litgpt) or pairs (Meta; litgpt "
                          "rope_interleave). Default: the source's, or the only one the target holds."),
    ] = None,
    kv_heads: Annotated[
        Optional[int],
        typer.Option(help="Key/value heads of the output: repeat each of the source's (GQA/MQA -> MHA with "
                          "n_head); a multiple of the source's count that divides n_head. Exact."),
    ] = None,
    fold_norms: Annotated[
        bool, typer.Option("--fold-norms", help="Fold norm gains (and LayerNorm biases) into the linears they feed.")
    ] = False,
    qkv: Annotated[
        Optional[Fusion],
        typer.Option(help="QKV projection of the output: fused (one sequential matrix: litgpt; Phi-3 for hf/peft) or "
                          "split (q/k/v: Meta; Llama-family for hf/peft); adapters follow. Default: the source's."),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge a litgpt LoRA run into its base: a full checkpoint (--to litgpt).")
    ] = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
) -> None:
    """Convert between litgpt (current and legacy order), Hugging Face, Meta and PEFT, exactly."""
    changes = converting.Transformations(RopeOrder(rope.value) if rope else None, kv_heads, fold_norms,
                                         qkv.value if qkv else None)
    report = converting.convert(
        sources.resolve(source, revision), to, out, base=base, max_shard_size=parse_size(max_shard_size),
        dry_run=dry_run, forward_check=verify, device=device, changes=changes, merge=merge,
        allow_nonfinite=allow_nonfinite,
    )
    _show_conversion(report, dry_run, json)


def _show_conversion(report: converting.ConvertReport, dry_run: bool, json: bool) -> None:
    if json:
        render.emit_json(report.as_dict())
        return
    if dry_run:
        render.plan_table(report.plan)
    verb = "plan" if dry_run else "converted"
    render.lines(f"[bold]{verb}:[/] {report.source} ({report.source_format}) -> {report.destination or '-'} "
                 f"({report.target_format})", report.actions)
    if report.checks:
        render.lines("[bold green]checked before publishing:[/]", report.checks)


@app.command("fold-norms")
@reports_errors
def fold_norms_cmd(
    source: SourceArg,
    out: NewDirOpt,
    to: Annotated[
        Optional[str], typer.Option(help="Output format: litgpt, litgpt-legacy, hf or meta (default: the source's).")
    ] = None,
    revision: RevisionOpt = None,
    max_shard_size: MaxShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = True,
    device: DeviceOpt = "cpu",
    json: JsonOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
) -> None:
    """Fold every norm's gain (and LayerNorm bias) into the linears it feeds; the norms become identities."""
    path = sources.resolve(source, revision)
    target = to or converting.detect_format(path.parent if path.is_file() else path)
    report = converting.convert(
        path, target, out, max_shard_size=parse_size(max_shard_size), dry_run=dry_run, forward_check=verify,
        device=device, changes=converting.Transformations(fold_norms=True), allow_nonfinite=allow_nonfinite,
    )
    _show_conversion(report, dry_run, json)


@app.command("verify")
@reports_errors
def verify_cmd(
    reference: Annotated[str, typer.Argument(help="The checkpoint you trust (directory or repo id).", show_default=False)],
    candidate: Annotated[str, typer.Argument(help="The checkpoint to check against it.", show_default=False)],
    device: DeviceOpt = "cpu",
    tokens: Annotated[int, typer.Option(help="Sequence length of the random input.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the random tokens.")] = 0,
    atol: Annotated[Optional[float], typer.Option(help="Absolute tolerance (default: fits the dtype).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Relative tolerance (default: fits the dtype).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype (default: float32 on CPU, stored dtype on GPU).")] = None,
    base: Annotated[
        Optional[Path], typer.Option(help="Base model of a LoRA run or PEFT adapter (default: what its files name).")
    ] = None,
    candidate_base: Annotated[
        Optional[Path], typer.Option(help="Base of the candidate, where it differs from --base.")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Run the same random tokens through both; compare every layer and the logits. Exit 1 if they differ.

    Either side may be a full checkpoint (litgpt, HF, Meta) or an adapter on its base (litgpt LoRA run, PEFT).
    """
    report = verifying.verify(
        open_weights(sources.resolve(reference), base=base),
        open_weights(sources.resolve(candidate), base=candidate_base or base),
        device=device, tokens=tokens, seed=seed, atol=atol, rtol=rtol, dtype=dtype,
    )
    if json:
        render.emit_json(report.as_dict())
    else:
        render.verify_table(report)
    if not report.passed:
        raise typer.Exit(1)


def version_callback(value: bool) -> None:
    if value:
        print(f"qkvconv {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """qkvconv: make LLM checkpoints safe to move between attention-weight layouts."""


def main() -> None:
    """Entry point (console script)."""
    app()


if __name__ == "__main__":
    main()
