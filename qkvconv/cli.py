"""The `qkvconv` command line: parse options, call the library, print. Nothing else.

Examples:
    qkvconv inspect fixtures/legacy/gqa_llama
    qkvconv inspect checkpoints/my-run --json --expect current
    qkvconv upgrade checkpoints/my-run                  # in place, atomically, checked first
    qkvconv upgrade out/lora-run --out out/lora-run-v2  # leave the source alone

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
from qkvconv import inspection, render, upgrade as upgrading

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

SourceArg = Annotated[Path, typer.Argument(help="Checkpoint directory (or its lit_model.pth).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]


class Expect(str, enum.Enum):
    current = "current"
    legacy = "legacy"


@app.command("inspect")
@reports_errors
def inspect_cmd(
    source: SourceArg,
    json: JsonOpt = False,
    expect: Annotated[
        Optional[Expect], typer.Option(help="Exit 1 unless the checkpoint is current (or legacy): a CI gate.")
    ] = None,
) -> None:
    """Show format, heads, QKV row order (with the evidence), LoRA settings, dtypes and sizes."""
    report = inspection.inspect_path(source)
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
    base: Annotated[Optional[Path], typer.Option(help="Base checkpoint of a LoRA run (default: hyperparameters.yaml).")] = None,
    json: JsonOpt = False,
) -> None:
    """Legacy litgpt (grouped attn.attn, LoRA included) -> current litgpt (sequential attn.qkv)."""
    report = upgrading.upgrade(source, out, lora_merge=lora_merge, base=base)
    if json:
        render.emit_json(report.as_dict())
        return
    for line in report.recovered:
        render.out.print(f"[yellow]{line}[/]")
    render.lines(f"[bold]{'upgraded' if report.changed else 'unchanged'}:[/] {report.destination}", report.actions)
    if report.checks:
        render.lines("[bold green]checked before replacing anything:[/]", report.checks)


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
