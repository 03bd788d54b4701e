"""Rendering reports for people (Rich tables) and pipelines (JSON on stdout). No logic lives here.

Rich is imported when something is first drawn (`out`, `err`, a table): `--help` and `--json` runs,
whose start-up time is most of what they cost, do not pay for it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _out() -> Console:
    return _console(False)


def _err() -> Console:
    return _console(True)


def __getattr__(name: str) -> Any:
    """`render.out` (stdout) and `render.err` (stderr): Rich consoles, made on first use."""
    if name in ("out", "err"):
        return _console(name == "err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def emit_json(data: Any) -> None:
    """One JSON document on stdout, nothing else (progress and errors go to stderr)."""
    print(json.dumps(data, indent=2, default=str))


def _plain(text: Any) -> str:
    """Text shown as it is: Rich would take "[in, out]" (GPT-2's Conv1D storage) for markup and drop it."""
    from rich.markup import escape

    return escape(str(text))


def _cell(value: Any, inline: bool = False) -> str:
    """One table cell: a list one item a line (`inline`, inside a dict's entry: comma-separated)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ("," if inline else "\n").join(_cell(v, inline) for v in value) or "-"
    if isinstance(value, dict):
        if {"name", "bytes"} <= set(value):
            return _plain(f"{value['name']} ({value['bytes']:,} bytes)")
        return ", ".join(f"{_plain(k)}={_cell(v, True)}" for k, v in value.items())
    return _plain(value)


def report_table(report: dict[str, Any], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in report.items():
        table.add_row(key, _cell(value))
    _out().print(table)


def lines(header: str, items: list[str]) -> None:
    _out().print(header)
    for item in items:
        _out().print(f"  - {_plain(item)}")


def notes(items: list[str]) -> None:
    """What the user should know or do next, apart from what was done."""
    if items:
        lines("[bold yellow]notes:[/]", items)


def error(message: str) -> None:
    _err().print(f"[bold red]error:[/] {_plain(message)}", soft_wrap=True)


def verify_table(report) -> None:
    """Per-stage differences, the first stage that differs in red, then a one-line verdict."""
    from rich.table import Table

    _out().print(f"[bold]qkvconv verify[/] on {report.device}, {report.dtype}, {report.tokens} tokens, seed {report.seed}")
    table = Table()
    table.add_column("stage")
    table.add_column("max |diff|", justify="right")
    table.add_column("max |reference|", justify="right")
    table.add_column("", justify="left")
    first = report.first_difference
    for s in report.stages:
        mark = "[green]ok[/]" if s.within else ("[bold red]differs (first)[/]" if s.name == first else "[red]differs[/]")
        if s.nonfinite:
            mark += f" ({s.nonfinite:,} NaN/inf" + (", the same in the candidate)" if s.within else " in the reference)")
        table.add_row(s.name, f"{s.max_abs_diff:.3g}", f"{s.scale:.3g}", mark)
    _out().print(table)
    _out().print(f"reference: {_plain(report.reference)}\ncandidate: {_plain(report.candidate)}")
    memory = f"peak RSS {report.peak_rss_bytes / 2**20:,.0f} MiB"
    if report.peak_gpu_bytes is not None:
        memory += f", peak GPU {report.peak_gpu_bytes / 2**20:,.0f} MiB"
    _out().print(f"top-1 agreement {report.top1_agreement:.1%}; tolerance atol={report.atol:g} rtol={report.rtol:g}; "
              f"{report.seconds:.2f} s, {memory}")
    if report.tolerance_reason:
        _out().print(f"tolerance: {_plain(report.tolerance_reason)}")
    for note in report.notes:
        _out().print(f"[yellow]note:[/] {_plain(note)}")
    if report.nonfinite_summary:
        _out().print(f"[yellow]{_plain(report.nonfinite_summary)}[/]")
    if report.passed:
        _out().print("[bold green]same function[/] within tolerance")
    else:
        _out().print(f"[bold red]different[/]: they part at {first}")


def plan_table(plan: list[dict[str, Any]]) -> None:
    """`convert --dry-run`: every output tensor, where it comes from, its size and file."""
    from rich.table import Table

    table = Table()
    for col, justify in (("output", "left"), ("from", "left"), ("how", "left"), ("shape", "right"),
                         ("dtype", "left"), ("bytes", "right"), ("file", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in plan:
        table.add_row(row["output"], "\n".join(row["inputs"]), row["steps"], "x".join(map(str, row["shape"])),
                      row["dtype"], f"{row['bytes']:,}", row["file"])
    _out().print(table)
