"""Reports from stored rows: ``report.md``, PNG figures and an index of result folders.

Pure functions of ``cells.jsonl``: nothing here trains or measures, so a report can be rebuilt at
any time, also while a run is still appending rows. The numbers come from :mod:`bench.reports.stats`
(which also documents how the baseline is found); this module only formats and draws them. The
design is inferred from the rows: one_at_a_time when no cell differs from the baseline in more
than one axis, unless the folder's ``matrix.json`` records it (and the baseline, and which cells
belong to the matrix: rows of cells or seeds it does not list are left out). The newest row of a
(cell, seed) counts, so a failure retried with ``run --retry-failed`` is replaced by the retry.

Heavy libraries (pandas, matplotlib, seaborn, scipy) are imported where used: the CLI imports
this module for ``add_cli`` and every command would otherwise pay for them at start-up.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.execution import machine
from bench.reports.figures import write_figures
from bench.reports.stats import (
    Row,
    all_cell_stats,
    axis_key,
    infer_design,
)
from bench.reports.tables import (
    LEGEND,
    _ok_failed,
    environment_section,
    factorial_section,
    failures_section,
    load_section,
    machine_section,
    md_table,
    one_at_a_time_section,
    other_machines_section,
    scaling_section,
    unstable_note,
)
from bench.reports.wording import headline_findings, noise_section
from bench.store.results import (
    CSV_FILE,
    MATRIX_FILE,
    ROWS_FILE,
    StoreError,
    latest_runs,
    print_warning,
    read_matrix_record,
    read_rows,
    refuse_link,
    write_atomic,
    write_csv,
)

REPORT_FILE = "report.md"
INFERRED = "inferred from the cells' axes"
FIGURES_DIR = "figures"


# --- markdown ------------------------------------------------------------------------------------------


# --- the report and the index --------------------------------------------------------------------------

@dataclass
class StoredResults:
    """What a report is built from: the standing rows of the recorded matrix, and its baseline.

    Rows of different machines are never pooled: ``rows`` are those of the machine that wrote the
    last row (the one being measured now), ``others`` the standing rows of each other machine."""

    rows: list[Row]  # the newest row of each (cell, seed), in the matrix's cell order when recorded
    all_rows: list[Row]  # every usable row of cells.jsonl (for results.csv)
    baseline_cell_id: Optional[str]  # None: no matrix.json, the first row's cell is the baseline
    design: Optional[str]  # None: inferred from the cells' axes
    machine: Optional[str] = None  # fingerprint of ``rows``' machine (bench.execution.machine); None without rows
    others: dict[str, list[Row]] = field(default_factory=dict)  # other machine → its standing rows


def split_by_machine(rows: list[Row], order: Optional[dict[str, int]] = None) -> tuple[Optional[str], dict[str, list[Row]]]:
    """(the latest machine, machine → its standing rows), each machine's rows apart, in cell order."""
    by_machine: dict[str, list[Row]] = {}
    for key in machine.machines(rows):
        standing = list(latest_runs(machine.rows_of(rows, key)).values())
        by_machine[key] = sorted(standing, key=lambda r: order[r["cell_id"]]) if order else standing
    return machine.latest_machine(rows), by_machine


def _stored(rows: list[Row], all_rows: list[Row], baseline: Optional[str], design: Optional[str],
            order: Optional[dict[str, int]] = None) -> StoredResults:
    latest, by_machine = split_by_machine(rows, order)
    mine = by_machine.pop(latest, []) if latest else []
    return StoredResults(mine, all_rows, baseline, design, latest, by_machine)


def load_results(out_dir: Path, warn: bool = True) -> StoredResults:
    """The rows of ``out_dir/cells.jsonl`` restricted to ``matrix.json``'s cells and seeds;
    FileNotFoundError naming the path when there are no rows."""
    path = Path(out_dir) / ROWS_FILE
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"no results to report: {out_dir} is not a folder")
    if not path.is_file():
        what = "is not a regular file" if os.path.lexists(path) else "does not exist (run `trickbench run` first)"
        raise FileNotFoundError(f"no results to report: {path} {what}")
    rows = read_rows(path, warn=warn)
    try:
        record = read_matrix_record(out_dir)
    except StoreError as err:
        if warn:
            print_warning(f"{err}; reporting every row, baseline = the cell of the first row")
        return _stored(rows, rows, None, None)
    if record is None:
        if warn and rows:
            print_warning(f"{out_dir}: no {MATRIX_FILE} (results of an older trickbench): baseline = the "
                          "cell of the first row, design inferred")
        return _stored(rows, rows, None, None)
    order = {c["cell_id"]: i for i, c in enumerate(record["cells"])}
    seeds = set(record["seeds"])
    kept = [r for r in rows if r["cell_id"] in order and r["seed"] in seeds]
    if warn and len(kept) < len(rows):
        print_warning(f"{path}: {len(rows) - len(kept)} rows of cells or seeds not in {MATRIX_FILE} left out")
    return _stored(kept, rows, record["baseline_cell_id"], record["design"], order)


def load_rows(out_dir: Path) -> list[Row]:
    """The standing rows of ``out_dir`` (see :func:`load_results`)."""
    return load_results(out_dir).rows


def refuse_linked_figures(folder: Path) -> None:
    """StoreError if ``figures/`` or a file in it is a link: figures are written by matplotlib,
    which opens paths the ordinary way."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise StoreError(f"{folder} is not a folder (or is a symbolic link); remove it")
        for entry in os.scandir(folder):
            refuse_link(Path(entry.path))


def render_report(rows: list[Row], stats: list[Row], figures: list[str], notes: list[str],
                  design: Optional[str] = None, others: Optional[dict[str, list[Row]]] = None,
                  baseline_cell_id: Optional[str] = None) -> str:
    """The markdown text of a report; ``figures`` are file names under ``figures/``; ``design``
    as recorded in matrix.json (None: inferred, and the baseline is the first row's cell);
    ``others``: the standing rows of other machines, reported apart."""
    others = others or {}
    recorded = design is not None
    design = design or infer_design(stats)
    ok = sum(r.get("status") == "ok" for r in rows)
    matrices = ", ".join(dict.fromkeys(str(r.get("matrix")) for r in rows))
    base_axes = ", ".join(f"{k}={axis_key(v)}" for k, v in stats[0]["axes"].items())
    lines = [f"# Report: {matrices}", "",
             f"{len(rows)} runs ({ok} ok, {len(rows) - ok} failed) of {len(stats)} cells × "
             f"{len({r['seed'] for r in rows})} seeds; design {design} "
             f"({'from matrix.json' if recorded else INFERRED}).", "",
             f"Baseline: {'the first cell of the matrix' if recorded else 'the cell of the first row written'} "
             f"({base_axes}); other cells are named by the axis values in which they differ from it.", "",
             *machine_section(rows, others), ""]
    if not stats[0]["n_ok"]:
        lines += ["**The baseline has no successful run: no comparisons are possible.**", ""]
    lines += ["## Environment", "", *environment_section(rows), "", "## Results", "", LEGEND, "",
              *unstable_note(stats)]
    lines += one_at_a_time_section(stats) if design == "one_at_a_time" else factorial_section(stats)
    lines += scaling_section(stats)
    lines += noise_section(stats)
    lines += other_machines_section(others, baseline_cell_id or stats[0]["cell_id"], design)
    labels = {s["cell_id"]: s["label"] for s in stats}
    lines += ["## Runs under competing load", "", *load_section(rows, labels), ""]
    lines += ["## Failed runs", "", *failures_section(rows, labels), "", "## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in figures] + [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def build_report(out_dir: Path) -> Path:
    """Read ``out_dir/cells.jsonl``; write ``report.md``, ``figures/*.png`` and ``results.csv``."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    report = out_dir / REPORT_FILE
    for path in (report, out_dir / CSV_FILE):
        refuse_link(path)
    refuse_linked_figures(out_dir / FIGURES_DIR)
    if not results.rows:
        write_atomic(report, "# Report\n\nNo complete rows in cells.jsonl yet.\n")
        return report
    stats = all_cell_stats(results.rows, results.baseline_cell_id)
    figures, notes = write_figures(stats, results.design or infer_design(stats), out_dir / FIGURES_DIR)
    write_atomic(report, render_report(results.rows, stats, figures, notes, results.design, results.others,
                                       results.baseline_cell_id))
    write_csv(results.all_rows, out_dir / CSV_FILE)
    return report


def write_index(results_dir: Path) -> Path:
    """``results_dir/README.md``: every folder holding a cells.jsonl, its counts, device and findings.

    A folder whose report is missing or older than its rows gets its report rebuilt first, so
    every link in the index points at a report of the current rows. A folder that cannot be
    read or reported is left out with a warning; the others are still indexed.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder: {results_dir} is not a folder")
    table, sections = [], []
    for rows_path in sorted(results_dir.rglob(ROWS_FILE)):
        try:
            row, section = index_entry(results_dir, rows_path)
        except (StoreError, OSError, ValueError) as err:
            print_warning(f"{rows_path.parent}: left out of the index: {err}")
            continue
        table.append(row)
        sections += section
    lines = ["# Results index", ""]
    if not table:
        lines.append("No results yet.")
    else:
        lines += [md_table(["matrix", "runs", "machine"], table, numeric=False), "", *sections]
    index = results_dir / "README.md"
    write_atomic(index, "\n".join(lines).rstrip() + "\n")
    return index


def index_entry(results_dir: Path, rows_path: Path) -> tuple[list[str], list[str]]:
    """One folder's line in the index table and its section of findings."""
    folder, report = rows_path.parent, rows_path.parent / REPORT_FILE
    stale = not report.exists() or report.stat().st_mtime < rows_path.stat().st_mtime
    if stale:
        build_report(folder)  # warns about skipped rows itself
    results = load_results(folder, warn=not stale)
    rows = results.rows
    link = report.relative_to(results_dir).as_posix()
    name = ", ".join(dict.fromkeys(str(r.get("matrix")) for r in rows)) or folder.name
    failed = Counter(r.get("status") for r in rows if r.get("status") != "ok")
    devices = f"`{results.machine}` {machine.describe(rows[-1].get('env'))}" if rows else "—"
    others = [f"`{key}` {machine.describe(r[-1].get('env'))}: {_ok_failed(r)}" for key, r in results.others.items()]
    row = [f"[{name}]({link})", f"{len(rows) - sum(failed.values())} ok / {sum(failed.values())} failed"
           + (f" ({', '.join(f'{k} {n}' for k, n in failed.items())})" if failed else ""),
           devices + (f" (+ {len(others)} other machine{'s' if len(others) > 1 else ''}, reported apart)"
                      if others else "")]
    findings = headline_findings(all_cell_stats(rows, results.baseline_cell_id)) if rows else ["no rows yet"]
    also = [f"Also in this folder, not pooled with the findings above (see the report): {'; '.join(others)}.", ""] \
        if others else []
    return row, [f"## [{name}]({link})", "", f"`{folder.relative_to(results_dir).as_posix() or '.'}` on {devices}",
                 "", *[f"- {f}" for f in findings], "", *also]


def cmd_report(args: argparse.Namespace) -> int:
    print(build_report(Path(args.dir)))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    print(write_index(Path(args.results_dir)))
    return 0


