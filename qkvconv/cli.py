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
environment, 3 an internal error (a bug in qkvconv: please report it), 130 interrupted.

The library modules (and torch with them) are imported inside the commands, so `--help` and option
errors answer without loading torch.
"""

from __future__ import annotations

import enum
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

try:  # newer typer carries its own copy of click, whose exceptions are not click's
    from typer._click.exceptions import ClickException, UsageError
except ImportError:
    from click.exceptions import ClickException, UsageError

from qkvconv import __version__, formats, progress, render
from qkvconv.errors import QkvconvError

EXIT_MEANINGS = {
    0: "done, or nothing to do",
    1: "a check failed",
    2: "bad input or environment",
    3: "internal error: a bug in qkvconv",
    130: "interrupted",
}

EXIT_CODES_HELP = (
    "\b\nExit codes: 0 done or nothing to do, 1 a check failed (verify, inspect --expect,\n"
    "  a conversion's check), 2 bad input or environment, 3 a bug in qkvconv,\n"
    "  130 interrupted. With --json, stdout holds exactly one JSON document, on\n"
    "  failure too: {error, exit_code, meaning}."
)


def examples(*lines: str) -> str:
    """A command's epilog: its examples, kept as written (\\b stops click re-wrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines) + "\n\n" + EXIT_CODES_HELP


# What SIGINT does once a command's work is over (set by __main__ to SIG_IGN: the result stands, a late
# Ctrl-C during output or interpreter exit changes nothing). None in-process (tests): left alone.
after_work: Any = None


def working() -> None:
    """From here on a Ctrl-C raises KeyboardInterrupt, which the commands clean up after (see __main__)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def fail(message: str, code: int, as_json: bool, report: dict[str, Any] | None = None) -> NoReturn:
    """Print one error (a line on stderr, or the one JSON document on stdout) and exit with `code`."""
    progress.clear()
    if as_json:
        render.emit_json({**(report or {}), "error": message, "exit_code": code, "meaning": EXIT_MEANINGS[code]})
    else:
        render.error(message)
    raise typer.Exit(code)


def reports_errors(command: Callable[..., None]) -> Callable[..., None]:
    """One line (or one JSON document with --json) and an exit code for every failure; no tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("json"))
        try:
            try:
                command(*args, **kwargs)
            finally:
                if after_work is not None:
                    signal.signal(signal.SIGINT, after_work)
        except QkvconvError as e:
            fail(str(e), e.exit_code, as_json)
        except OSError as e:  # the environment said no: permissions, a full disk, a vanished file
            where = f" ({e.filename})" if e.filename else ""
            fail(f"{e.strerror or e}{where}", 2, as_json)
        except KeyboardInterrupt:
            fail("interrupted; nothing was replaced", 130, as_json)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("QKVCONV_DEBUG"):
                raise
            fail(f"internal error ({type(e).__name__}: {e}); this is a bug in qkvconv, please report it "
                 "(set QKVCONV_DEBUG=1 for the traceback)", 3, as_json)

    return wrapper


class Commands(TyperGroup):
    """The root group: option errors and Ctrl-C keep the exit-code and --json contract too."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            if "--json" in argv:
                render.emit_json({"error": e.format_message(), "exit_code": 2, "meaning": EXIT_MEANINGS[2]})
            else:
                e.show()
            code = 2
        except (typer.Abort, KeyboardInterrupt):
            progress.clear()
            render.error("interrupted; nothing was replaced")
            code = 130
        except ClickException as e:
            e.show()
            code = e.exit_code
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="qkvconv",
    cls=Commands,
    help="Inspect, upgrade, convert and verify the attention-weight layouts of LLM checkpoints.",
    epilog=examples(
        "qkvconv inspect checkpoints/my-run --expect current     # a CI gate",
        "qkvconv upgrade checkpoints/my-run                      # legacy litgpt, in place",
        "qkvconv convert hf-model/ --to litgpt --out lit-model",
        "qkvconv verify hf-model/ lit-model/",
        "qkvconv COMMAND -h                                      # options of a command",
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
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
MaxShardOpt = Annotated[str, typer.Option(help="Largest safetensors shard of hf output, like 5GB or 500MB (0: one file).")]
NEW_DIR_HELP = "New directory to write (must not exist or be empty)."
MaybeNewDirOpt = Annotated[Optional[Path], typer.Option(help=NEW_DIR_HELP)]
AllowNonfiniteOpt = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Convert even when weights hold NaN/inf (refused by default).")
]
VariantOpt = Annotated[Optional[str], typer.Option(
    help="Which model a remote-code config.json stands for where it cannot tell (Baichuan: baichuan-7b, "
         "baichuan2-7b, ...); ignored by models whose config.json decides.")]
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


# --to choices come from the format registry (torch-free): a new format appears here by itself
Target = enum.Enum("Target", {name.replace("-", "_"): name for name in formats.NAMES}, type=str)  # type: ignore[misc]
FoldTarget = enum.Enum(  # type: ignore[misc]
    "FoldTarget", {name.replace("-", "_"): name for name in formats.MODEL_NAMES}, type=str)


@app.command("inspect", epilog=examples(
    "qkvconv inspect fixtures/legacy/gqa_llama",
    "qkvconv inspect checkpoints/my-run --json --expect current",
    "qkvconv inspect meta-llama/Llama-3.2-1B --revision main",
))
@reports_errors
def inspect_cmd(
    source: SourceArg,
    revision: RevisionOpt = None,
    base: Annotated[
        Optional[Path], typer.Option(help="Base of a LoRA run, for --expect (default: hyperparameters.yaml).")
    ] = None,
    json: JsonOpt = False,
    variant: VariantOpt = None,
    expect: Annotated[
        Optional[Expect],
        typer.Option(help="Exit 1 unless the checkpoint (and a LoRA run's base) is current, or legacy: a CI gate."),
    ] = None,
) -> None:
    """Show format, heads, QKV row order (with the evidence), LoRA settings, dtypes and sizes."""
    from qkvconv.io import sources
    from qkvconv.ops import inspect as inspection

    from qkvconv.formats.hf.variants import chosen_variant

    with chosen_variant(variant):
        report = inspection.inspect_path(sources.resolve(source, revision), base=base)
    failure = inspection.expectation_failure(report, expect.value) if expect is not None else None
    if json and failure is not None:
        fail(failure, 1, True, report)
    if json:
        render.emit_json(report)
        return
    render.report_table(report, title=f"qkvconv inspect {source}")
    if failure is not None:
        fail(failure, 1, False)


@app.command("upgrade", epilog=examples(
    "qkvconv upgrade checkpoints/my-run                      # in place, atomically",
    "qkvconv upgrade out/lora-run --out out/lora-run-v2      # leave the source alone",
    "qkvconv upgrade out/lora-run --lora-merge --out merged  # a full checkpoint",
))
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
    from qkvconv.io import sources

    if out is None and not Path(source).exists() and sources.is_repo_id(source):
        raise QkvconvError(f"{source} is a Hub repo id: upgrade it into a directory of your own with --out DIR")
    path = sources.resolve(source)
    with progress.status("planning"):
        if lora_merge:
            from qkvconv.ops import merge as merging
            from qkvconv.ops import check as checking
        else:  # a full model's upgrade only moves rows: its check imports torch only where it must (bitcheck.py)
            from qkvconv.ops import upgrade as upgrading
            from qkvconv.ops import bitcheck as checking  # type: ignore[no-redef]
    working()
    check = checking.upgrade_check(device) if verify else None
    if lora_merge:
        if out is None:
            raise QkvconvError("--lora-merge writes a full checkpoint: give it a new directory with --out")
        report = merging.merge_lora(path, out, base=base, forward_check=check, allow_nonfinite=allow_nonfinite)
    else:
        report = upgrading.upgrade(path, out, base=base, forward_check=check, allow_nonfinite=allow_nonfinite)
    if json:
        render.emit_json(report.as_dict())
        return
    for line in report.recovered:
        render.out.print(f"[yellow]{line}[/]")
    render.lines(f"[bold]{'upgraded' if report.changed else 'unchanged'}:[/] {report.destination}", report.actions)
    render.notes(report.notes)
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
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise QkvconvError(f"--max-shard-size must be a positive size like 5GB (or 0 for one file), got {text!r}")
    if 0 < value < 1:
        raise QkvconvError(f"--max-shard-size must be at least one byte (or 0 for one file), got {text!r}")
    return int(value) or None


def transformations(rope: Rope | None, kv_heads: int | None, fold_norms: bool, qkv: Fusion | None) -> Any:
    from qkvconv.ops.convert import Transformations
    from qkvconv.model.rotary import RopeOrder

    return Transformations(RopeOrder(rope.value) if rope else None, kv_heads, fold_norms, qkv.value if qkv else None)


@app.command("convert", epilog=examples(
    "qkvconv convert hf-model/ --to litgpt --out lit-model",
    "qkvconv convert llama-2-7b/ --to hf --out llama-2-7b-hf          # Meta's consolidated.00.pth",
    "qkvconv convert hf-model/ --to litgpt --kv-heads 32 --rope pairs --out mha-pairs",
    "qkvconv convert llama-hf/ --to hf --qkv fused --out phi3-style   # one qkv_proj",
    "qkvconv convert lora-run/ --to peft --out adapter                # litgpt LoRA -> PEFT",
    "qkvconv convert llama-adapter/ --to peft --base llamafied/ --target-base internlm2/ --out adapter",
    "qkvconv convert llamafied/ --to hf --target-base internlm2/ --out internlm2-again",
    "qkvconv convert hf-model/ --to hf --dry-run --json               # the plan only",
))
@reports_errors
def convert_cmd(
    source: SourceArg,
    to: Annotated[Target, typer.Option(help="Target format.", case_sensitive=False)],
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
    variant: VariantOpt = None,
    target_base: Annotated[
        Optional[Path],
        typer.Option(help="Write for this base (its config.json): the same model in another architecture's modules, "
                          "e.g. a remote-code original (InternLM2 wqkv, ...) from its transformers twin. --to peft: "
                          "an adapter on that base (the adapter's own base stays --base); --to hf: the checkpoint in "
                          "its layout, with its config.json."),
    ] = None,
) -> None:
    """Convert between litgpt (current and legacy order), Hugging Face, Meta and PEFT, exactly."""
    from qkvconv.io import sources

    shard_bytes = parse_size(max_shard_size)
    path = sources.resolve(source, revision)
    with progress.status("planning"):
        from qkvconv.ops import convert as converting

        changes = transformations(rope, kv_heads, fold_norms, qkv)
    working()
    from qkvconv.formats.hf.variants import chosen_variant

    with chosen_variant(variant):
        report = converting.convert(
            path, to.value, out, base=base, max_shard_size=shard_bytes, dry_run=dry_run, forward_check=verify,
            device=device, changes=changes, merge=merge, allow_nonfinite=allow_nonfinite, target_base=target_base,
        )
    _show_conversion(report, dry_run, json)


def _show_conversion(report: Any, dry_run: bool, json: bool) -> None:
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


@app.command("fold-norms", epilog=examples(
    "qkvconv fold-norms hf-model/ --out folded",
    "qkvconv fold-norms lit-model/ --to hf --out folded-hf",
    "qkvconv fold-norms hf-model/ --dry-run",
))
@reports_errors
def fold_norms_cmd(
    source: SourceArg,
    out: MaybeNewDirOpt = None,
    to: Annotated[
        Optional[FoldTarget], typer.Option(help="Output format (default: the source's). Full models only.")
    ] = None,
    revision: RevisionOpt = None,
    max_shard_size: MaxShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = True,
    device: DeviceOpt = "cpu",
    allow_nonfinite: AllowNonfiniteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Fold every norm's gain (and LayerNorm bias) into the linears it feeds; the norms become identities."""
    from qkvconv.io import sources

    shard_bytes = parse_size(max_shard_size)
    path = sources.resolve(source, revision)
    with progress.status("planning"):
        from qkvconv.ops import convert as converting
    working()
    report = converting.convert_folding_norms(
        path, to.value if to else None, out, max_shard_size=shard_bytes, dry_run=dry_run, forward_check=verify,
        device=device, allow_nonfinite=allow_nonfinite,
    )
    _show_conversion(report, dry_run, json)


@app.command("verify", epilog=examples(
    "qkvconv verify hf-model/ lit-model/",
    "qkvconv verify legacy-run/ upgraded-run/ --device cuda --json",
    "qkvconv verify adapter/ lora-run/ --base hf-model/ --candidate-base lit-model/",
))
@reports_errors
def verify_cmd(
    reference: Annotated[str, typer.Argument(help="The checkpoint you trust (directory or repo id).", show_default=False)],
    candidate: Annotated[str, typer.Argument(help="The checkpoint to check against it.", show_default=False)],
    device: DeviceOpt = "cpu",
    tokens: Annotated[
        Optional[int], typer.Option(help="Sequence length of the random input: at most the model's block_size "
                                         "(default: 16, or block_size where shorter).")
    ] = None,
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
    variant: VariantOpt = None,
) -> None:
    """Run the same random tokens through both; compare every layer and the logits. Exit 1 if they differ.

    Either side may be a full checkpoint (litgpt, HF, Meta) or an adapter on its base (litgpt LoRA run, PEFT).
    """
    from qkvconv.io import sources

    reference_path, candidate_path = sources.resolve(reference), sources.resolve(candidate)
    with progress.status("loading"):
        from qkvconv.ops import verify as verifying
        from qkvconv.formats.weights import open_weights
        from qkvconv.formats.hf.variants import chosen_variant

        with chosen_variant(variant):
            ref = open_weights(reference_path, base=base, base_option="--base")
            cand = open_weights(candidate_path, base=candidate_base or base,
                                base_option="--candidate-base" if candidate_base else "--candidate-base (or --base)")
    working()
    report = verifying.verify(ref, cand, device=device, tokens=tokens, seed=seed, atol=atol, rtol=rtol, dtype=dtype,
                              progress=progress.layers("checking"))
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
