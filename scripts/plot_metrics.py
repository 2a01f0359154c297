"""Plot training curves from one or more runs' ``metrics.jsonl``.

    python scripts/plot_metrics.py runs/a runs/b --out loss.png --keys loss,lm_loss,val_loss

One panel per key, one line per run (labelled by the run directory's name). A resumed run
re-logs the steps after its checkpoint; for a repeated step the last record wins, which
is the one the final curve was trained through.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

DEFAULT_KEYS = "loss,lm_loss,val_loss"


def dedup_steps(records: Iterable[dict]) -> list[dict]:
    """Records sorted by step; a step that appears more than once keeps its last record."""
    by_step: dict[int, dict] = {}
    for rec in records:
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Parse ``<run_dir>/metrics.jsonl`` (or a .jsonl path); unparsable lines are skipped
    with a warning (a killed run can leave a partial last line)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (expected a run directory)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: not JSON, skipped", file=sys.stderr)
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    return dedup_steps(records)


def _labels(run_dirs: list[str]) -> list[str]:
    """Run directory names; parent/name where two runs share a name."""
    paths = [Path(r).resolve() for r in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def plot(
    runs: dict[str, list[dict]], keys: list[str], out: str | Path, *, logy: bool = False
) -> Path:
    """Draw one panel per key that some run has; returns the written PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [k for k in keys if any(k in r for recs in runs.values() for r in recs)]
    if not present:
        raise ValueError(f"none of the keys {keys} occur in the metrics of {list(runs)}")
    fig = Figure(figsize=(7.0, 2.8 * len(present)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present):
        for label, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            # null (non-finite when logged) becomes a gap in the line
            ys = [math.nan if v is None else float(v) for _, v in pts]
            sparse = len(pts) < 0.5 * len(recs)  # e.g. val_loss: show the points
            ax.plot(xs, ys, label=label, marker="o" if sparse else None, markersize=3)
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", default="metrics.png", help="output PNG path")
    ap.add_argument("--keys", default=DEFAULT_KEYS, help="comma-separated metric names")
    ap.add_argument("--logy", action="store_true", help="log-scale y axes")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    try:
        runs = {label: read_metrics(r) for label, r in zip(_labels(args.runs), args.runs)}
        out = plot(runs, keys, args.out, logy=args.logy)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
