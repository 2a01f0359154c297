"""Run logging: console (rich | plain | none), metrics.jsonl, wandb, TensorBoard.

Only the main rank writes; every other rank gets the same object with every method a
no-op, so the trainer never branches on rank. Named ``run_logger`` so it does not shadow
the standard library's ``logging``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger", "per_rank_logging", "render_expert_load"]

log = logging.getLogger("moefold")

# Keys shown on the console line, in order, with their format; everything logged still
# goes to metrics.jsonl / wandb / TensorBoard.
_CONSOLE_KEYS = {
    "loss": ("loss", ".4f"),
    "lm_loss": ("lm_loss", ".4f"),
    "aux_loss": ("aux", ".4f"),
    "val_loss": ("val_loss", ".4f"),
    "lr": ("lr", ".2e"),
    "grad_norm": ("gnorm", ".3f"),
    "tokens_per_s": ("tok/s", "tok"),
    "mfu": ("mfu", "pct"),
    "peak_mem_gib": ("mem GiB", ".2f"),
}
# Live-bar field -> (metric, format).
_BAR_FIELDS = {
    "loss": ("loss", ".4f"),
    "lm_loss": ("lm_loss", ".4f"),
    "tps": ("tokens_per_s", "tok"),
    "lr": ("lr", ".2e"),
}


def _fmt(value: float, spec: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if spec == "tok":
        return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"
    if spec == "pct":
        return f"{100 * value:.2f}%"
    return format(value, spec)


def _fmt_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _jsonable(v: Any) -> Any:
    if type(v) is float:  # the usual case (the trainer's record is host floats)
        return v if math.isfinite(v) else None
    if isinstance(v, torch.Tensor):
        v = v.item()
    elif hasattr(v, "item") and callable(v.item):  # numpy scalars
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    v = float(v)
    return v if math.isfinite(v) else None


def is_console_handler(h: logging.Handler) -> bool:
    if type(h).__name__ == "RichHandler":
        return True
    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
        std = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        return getattr(h, "stream", None) in std
    return False


def per_rank_logging(rank: int, world_size: int) -> None:
    """Under a launcher, only rank 0 logs INFO to the console and to the run dir's
    ``train.log`` (Hydra's job log); rank r > 0 logs to ``train_rank{r}.log`` and shows
    only its warnings and errors on the console, prefixed ``[rank r]`` (Python warnings
    included), so an N-process run prints each INFO line once."""
    if world_size <= 1 or rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            path = Path(h.baseFilename)
            own = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"),
                                      mode="a", encoding=h.encoding)
            own.setFormatter(h.formatter)
            own.setLevel(h.level)
            root.removeHandler(h)
            h.close()
            root.addHandler(own)
        elif is_console_handler(h):
            h.setLevel(logging.WARNING)
            h.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)  # warnings.warn -> the handlers above, with the rank


def _to_log_files(msg: str, level: int = logging.INFO) -> None:
    """Send ``msg`` to the Python-logging handlers that are *not* the console (e.g. the
    ``train.log`` Hydra writes into the run dir): the console already has it from us."""
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, None)
    node: logging.Logger | None = log
    while node is not None:
        for h in node.handlers:
            if not is_console_handler(h) and record.levelno >= h.level:
                h.handle(record)
        node = node.parent if node.propagate else None


def render_expert_load(counts_LE: torch.Tensor, layer_ids: list[int], step: int):
    """Heatmap (layers × experts) of each expert's share of its layer's routed assignments
    relative to uniform (1.0 = a perfectly balanced expert). Returns a matplotlib Figure
    on an Agg canvas (no pyplot, no global figure state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    c = counts_LE.detach().float().cpu().numpy()
    if c.ndim != 2 or c.shape[0] != len(layer_ids):
        raise ValueError(f"counts_LE shape {tuple(c.shape)} does not match {len(layer_ids)} layers")
    L, E = c.shape
    # NaN marks experts a layer does not have (pyramid MoE: rows padded to the largest E)
    E_L = np.isfinite(c).sum(axis=1, keepdims=True)
    share = c / np.maximum(np.nansum(c, axis=1, keepdims=True), 1e-12) * E_L
    width = min(max(6.0, 0.25 * E + 5.0), 20.0)
    fig = Figure(figsize=(width, min(max(2.5, 0.4 * L + 1.5), 16.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(np.nanmax(share))))
    im = ax.imshow(share, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    # Per-layer imbalance in the row label: max/mean and min/mean of the expert loads.
    labels = [
        f"layer {i}  max {mx:.2f}x  min {mn:.2f}x"
        for i, mx, mn in zip(layer_ids, np.nanmax(share, axis=1), np.nanmin(share, axis=1))
    ]
    ax.set_yticks(range(L), labels)
    ax.set_xlabel("expert")
    if E <= 32:
        ax.set_xticks(range(E))
    ax.set_title(f"expert load / uniform (routed assignments), step {step}")
    fig.colorbar(im, ax=ax, label="share / uniform")
    return fig


class RunLogger:
    """One run's logging sinks. Use as a context manager (or call :meth:`close`)."""

    def __init__(
        self,
        cfg: Any,
        run_dir: str | Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_config: dict | None = None,
        show_aux: bool = True,
    ):
        self.active = bool(is_main)
        self.show_aux = show_aux  # False for dense models: no "aux 0.0000" on the console
        self.run_dir = Path(run_dir)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.console = str(cfg.console)
        self.print_every = max(1, self.total_steps // 20)
        self._metrics_f = None
        self._tb = None
        self._wandb = None
        self._rich = None  # rich Console (console=rich)
        self._progress = None  # live bar, only on a terminal
        self._task = None
        self._last_printed: int | None = None  # step of the last printed line (rich)
        # expert-load heatmaps render on one background thread (matplotlib's import and a
        # render cost ~1-4 s, off the training loop); wandb gets each image on the main
        # thread with the next logged step (wandb steps must not go back)
        self._plotter = None  # ThreadPoolExecutor, created on the first heatmap
        self._plots: list = []  # their futures
        self._wandb_images: list[tuple[int, Path]] = []
        if not self.active:
            return
        if self.console not in ("rich", "plain", "none"):
            raise ValueError(f"logger.console={self.console!r} is not one of rich, plain, none")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        # A run killed mid-write may leave a partial last line; start ours on a fresh one.
        needs_newline = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self._metrics_f = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._metrics_f.write("\n")
        if self.console == "rich":
            from rich.console import Console

            # soft_wrap: never hard-wrap a metrics line at 80 columns in a log file.
            self._rich = Console(soft_wrap=True)
            # Not a terminal (Slurm log, pipe): no live bar at all (rich would only print
            # its final frame, truncated); the periodic metric lines carry the progress.
            if self._rich.is_terminal:
                self._start_progress()
        if getattr(cfg, "tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter

            # On resume, hide events a killed run wrote after the checkpoint we resumed.
            purge = self.start_step + 1 if self.start_step > 0 else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        self._wandb = self._init_wandb(cfg.wandb, run_config)

    # -- set-up -----------------------------------------------------------------------
    def _start_progress(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} lm {task.fields[lm_loss]}"),
            TextColumn("{task.fields[tps]} tok/s lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=self._rich,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            "train",
            total=self.total_steps,
            completed=self.start_step,
            loss="-",
            lm_loss="-",
            tps="-",
            lr="-",
        )
        self._progress.start()

    def _init_wandb(self, wcfg: Any, run_config: dict | None):
        mode = str(getattr(wcfg, "mode", "disabled"))
        if mode == "disabled":
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else ""
            if not run_id:
                alphabet = string.ascii_lowercase + string.digits  # wandb's id alphabet
                run_id = "".join(secrets.choice(alphabet) for _ in range(8))
                id_file.write_text(run_id + "\n")
            tags = list(getattr(wcfg, "tags", None) or []) or None
            t0 = time.perf_counter()
            run = wandb.init(
                mode=mode,
                dir=str(self.run_dir),
                project=getattr(wcfg, "project", None),
                entity=getattr(wcfg, "entity", None),
                name=getattr(wcfg, "name", None),
                tags=tags,
                config=run_config,
                id=run_id,
                resume="allow",
                # console="off": wandb's stdout wrapping would fight rich's live bar;
                # the run dir keeps train.log and metrics.jsonl anyway.
                settings=wandb.Settings(silent=True, console="off"),
            )
            _to_log_files(f"wandb {mode} run {run.id} ready in {time.perf_counter() - t0:.2f}s")
            return run
        except Exception as e:  # never let wandb (network, auth) stop training
            self._warn(f"wandb init failed ({type(e).__name__}: {e}); continuing without wandb")
            return None

    # -- logging ------------------------------------------------------------------------
    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step)}
        record.update({k: _jsonable(v) for k, v in metrics.items() if k != "step"})
        self._metrics_f.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_f.flush()
        if self._wandb is None and self._tb is None and self.console == "none":
            return
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._wandb is not None:
            self._wandb.log({**scalars, **self._done_images()}, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        # the console shows non-finite values (nan, inf) rather than dropping the column
        shown = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._update_console(step, {**shown, **scalars}, metrics.get("skip_cause"))

    def _update_console(self, step: int, scalars: dict[str, float],
                        skipped: str | None = None) -> None:
        if self.console == "none":
            return
        # ETA: the smoothed step time (the throughput window, which leaves out the first,
        # warm-up step; validation and checkpoints are not steps) x the steps left.
        step_time = scalars.get("step_time_s")
        eta = (step_time * (self.total_steps - step)
               if step_time is not None and step > self.start_step + 1 else None)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [
            f"{label} {_fmt(scalars[k], spec)}"
            for k, (label, spec) in _CONSOLE_KEYS.items()
            if k in scalars and (self.show_aux or k != "aux_loss")
        ]
        # multimodal runs: the per-modality and diffusion losses after the LM loss
        parts[3:3] = [f"{k} {scalars[k]:.4f}" for k in scalars
                      if k.startswith("loss_") or k == "diffusion_loss"]
        if skipped:
            parts.append(f"skipped ({skipped})")
        parts.append(f"eta {_fmt_eta(eta) if eta is not None else '?'}")
        line = " | ".join(parts)
        if self.console == "plain":
            print(line, flush=True)
            _to_log_files(line)
            return
        if self._progress is not None:
            bar = {
                f: _fmt(scalars[k], spec) for f, (k, spec) in _BAR_FIELDS.items() if k in scalars
            }
            self._progress.update(self._task, completed=step, **bar)
        # First line, then whenever a multiple of print_every was reached since the last
        # line (so log_every need not divide it), and the last step.
        last, every = self._last_printed, self.print_every
        if last is None or step // every > last // every or step >= self.total_steps:
            self._rich.print(line, markup=False, highlight=False)
            _to_log_files(line)
            self._last_printed = step

    def log_expert_load(self, step: int, counts_LE: torch.Tensor, layer_ids: list[int]) -> None:
        """Render the heatmap of ``counts_LE`` (a CPU copy) in the background: a PNG in
        ``expert_load/``, TensorBoard's ``expert_load`` image, wandb's with the next step."""
        if not self.active:
            return
        if self._plotter is None:
            from concurrent.futures import ThreadPoolExecutor

            self._plotter = ThreadPoolExecutor(1, thread_name_prefix="moefold-plot")
        counts = counts_LE.detach().float().cpu().clone()
        self._plots.append(self._plotter.submit(self._expert_load, step, counts,
                                                list(layer_ids)))

    def _done_images(self) -> dict[str, Any]:
        """The rendered heatmaps not yet sent to wandb (the last one, as an image)."""
        self._plots = [f for f in self._plots if not f.done() or self._plot_result(f)]
        if not self._wandb_images:
            return {}
        import wandb

        step, path = self._wandb_images[-1]
        self._wandb_images.clear()
        return {"expert_load": wandb.Image(str(path), caption=f"step {step}")}

    def _plot_result(self, future) -> bool:
        """False (drop the future) once done; a failed render is a warning, not a crash."""
        e = future.exception()
        if e is not None:
            self._warn(f"expert-load heatmap failed ({type(e).__name__}: {e})")
        return False

    def _expert_load(self, step: int, counts_LE: torch.Tensor, layer_ids: list[int]) -> None:
        import numpy as np

        fig = render_expert_load(counts_LE, layer_ids, step)
        out_dir = self.run_dir / "expert_load"
        out_dir.mkdir(exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        fig.savefig(path, dpi=100)
        if self._tb is not None:
            fig.canvas.draw()
            rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
            self._tb.add_image("expert_load", rgb, step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb_images.append((step, path))

    def info(self, msg: str) -> None:
        if not self.active:
            return
        if self.console == "rich":
            self._rich.print(msg, markup=False, highlight=False)
        elif self.console == "plain":
            print(msg, flush=True)
        else:
            log.info(msg)
            return
        _to_log_files(msg)

    def warning(self, msg: str) -> None:
        """``warning: <msg>`` on the console (main rank) and in the log files."""
        if self.active:
            self._warn(msg)

    def _warn(self, msg: str) -> None:
        if self.console == "none":
            log.warning(msg)
            return
        text = f"warning: {msg}"
        if self._rich is not None:
            self._rich.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)
        _to_log_files(msg, logging.WARNING)

    # -- teardown -----------------------------------------------------------------------
    def close(self, exit_code: int = 0) -> None:
        if not self.active:
            return
        if self._plotter is not None:  # the heatmaps still rendering
            self._plotter.shutdown(wait=True)
            images = self._done_images() if self._wandb is not None else {}
            self._plots = [f for f in self._plots if self._plot_result(f)]
            if images:
                self._wandb.log(images)
        self.active = False
        if self._progress is not None:
            self._progress.stop()
        if self._metrics_f is not None:
            self._metrics_f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish(exit_code=exit_code)
            except Exception as e:
                print(f"warning: wandb finish failed: {e}", file=sys.stderr)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
