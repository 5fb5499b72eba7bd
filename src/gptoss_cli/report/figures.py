"""The figures of `gptoss report`: memory over time, loss / perplexity / learning rate, throughput, expert load.

Each function draws one PNG from runs loaded by logs.py and returns False when there is nothing to draw.
Figures are built with matplotlib's object API on an explicit Agg canvas instead of pyplot: no display is
needed, no backend switch leaks into a caller's session (a notebook keeps its own), and no global figure
list grows. matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .logs import GIB, RunData, is_number
from .table import Rows

DPI = 120
# memory.py's fields, as drawn: (record key, legend name, colour when one run and one rank are shown)
CUDA_FIELDS = [
    ("allocated_bytes", "allocated", "C0"),
    ("reserved_bytes", "reserved", "C1"),
    ("peak_bytes", "peak allocated", "C3"),
    ("nvml_used_bytes", "NVML device used", "C2"),
]
CPU_FIELDS = [("rss_bytes", "CPU memory (process RSS)", "C4")]
STYLES = ["-", "--", ":", "-."]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the non-interactive backend, attached to this figure only
    return fig


def _save(fig, path: Path) -> bool:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return True


def _xy(records, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for the records where both are finite numbers: a diverged (NaN) loss is skipped, not a crash."""
    if isinstance(records, Rows):  # by column: no row is built
        xs, ys = records.column(x), records.column(key)
        keep = np.isfinite(xs) & np.isfinite(ys)
        return xs[keep], ys[keep]
    pts = np.array([(r[x], r[key]) for r in records if is_number(r.get(x)) and is_number(r.get(key))], float)
    pts = pts.reshape(-1, 2)  # (n, 2), also when n == 0
    return pts[:, 0], pts[:, 1]


def _legend(ax) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="best", fontsize="small", ncol=2 if len(handles) > 6 else 1, framealpha=0.85)


def plot_loss(runs: list[RunData], path: Path) -> bool:
    """Top: training and validation loss with perplexity = exp(loss) on the right axis. Bottom: learning rate."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    runs = [r for r in runs if r.train or r.evals]
    if not runs:
        return False
    fig = _figure(10, 6.5)
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1])
    ax = fig.add_subplot(grid[0])
    lr_ax = fig.add_subplot(grid[1], sharex=ax)
    several = len(runs) > 1
    for i, run in enumerate(runs):
        prefix = f"{run.name}: " if several else ""
        steps, loss = _xy(run.train, "loss")
        if len(steps):
            ax.plot(steps, loss, color=f"C{i}", lw=1.5, label=prefix + "training loss")
        steps, val = _xy(run.evals, "val_loss")
        if len(steps):
            ax.plot(steps, val, color=f"C{i}", ls="--", marker="o", ms=4, label=prefix + "validation loss")
        steps, lr = _xy(run.train, "lr")
        if len(steps):
            lr_ax.plot(steps, lr, color=f"C{i}", lw=1.2, label=prefix + "learning rate")
    ax.set_title("Training and validation loss (LM cross-entropy; aux and z losses not included)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    _legend(ax)
    # Perplexity is exp(loss), so it gets an axis rather than lines of its own; log-spaced ticks
    # (1, 2, 5, 10, ...) fall evenly along the linear loss axis.
    ppl = ax.secondary_yaxis(
        "right", functions=(lambda x: np.exp(np.clip(x, -50, 50)), lambda y: np.log(np.maximum(y, 1e-300)))
    )
    ppl.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ppl.yaxis.set_minor_locator(NullLocator())
    ppl.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
    ppl.set_ylabel("perplexity = exp(loss)")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    _legend(lr_ax)
    return _save(fig, path)


def plot_throughput(runs: list[RunData], path: Path) -> bool:
    """Training tokens/s per logging interval, with each run's median (the first interval includes warm-up)."""
    series = [(run, *_xy(run.train, "tokens_per_s")) for run in runs]
    series = [s for s in series if len(s[1])]
    if not series:
        return False
    fig = _figure(10, 4.5)
    ax = fig.add_subplot()
    for i, (run, steps, tps) in enumerate(series):
        median = float(np.median(tps))
        prefix = f"{run.name}: " if len(series) > 1 else ""
        ax.plot(steps, tps, color=f"C{i}", marker=".", lw=1.2, label=f"{prefix}tokens/s (median {median:,.0f})")
        ax.axhline(median, color=f"C{i}", ls=":", lw=1)
    ax.set_title("Training throughput")
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import StrMethodFormatter

    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, 1.12 * max(float(tps.max()) for _, _, tps in series))  # headroom: the top line stays visible
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _by_rank(records: list[dict]) -> dict[int, list[dict]]:
    ranks: dict[int, list[dict]] = {}
    for r in records:
        if is_number(r.get("time")):
            rank = r.get("rank")
            ranks.setdefault(int(rank) if is_number(rank) else 0, []).append(r)
    return dict(sorted(ranks.items()))


def _end_to_end(records: list[dict]) -> tuple[np.ndarray, list[float]]:
    """x (seconds) per record, and where new sessions start.

    memory.py appends, and its `time` restarts at 0 whenever a sampler opens the file again (a resumed
    training, a second `gptoss infer`): such sessions are laid end to end instead of drawn on top of each other.
    """
    xs: list[float] = []
    starts: list[float] = []
    offset, prev = 0.0, None
    for r in records:
        t = float(r["time"])
        if prev is not None and t < prev:
            offset = xs[-1]
            starts.append(offset)
        xs.append(offset + t)
        prev = t
    return np.array(xs), starts


def _progress(xs: np.ndarray, records: list[dict], phase: str, scale: float) -> tuple[str, list[tuple]]:
    """(axis title, [(x, value)]): training steps, or tokens generated (else steps) during inference."""
    keys = [("step", "training step")] if phase == "train" else [("tokens", "tokens generated"), ("step", "step")]
    for key, title in keys:
        pts = [(x / scale, r[key]) for x, r in zip(xs, records, strict=True) if is_number(r.get(key))]
        if pts:
            return title, pts
    return "", []


def _marker_axis(ax, xs: np.ndarray, records: list[dict], phase: str, scale: float, owner: str) -> None:
    """Progress as ticks on a top axis (at most 8 labels), so memory can be read against steps or tokens."""
    title, pts = _progress(xs, records, phase, scale)
    if not pts:
        return
    idx = np.unique(np.linspace(0, len(pts) - 1, min(8, len(pts))).round().astype(int))
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks([pts[i][0] for i in idx], [f"{int(pts[i][1]):,}" for i in idx], fontsize="small")
    top.set_xlabel(title + (f" ({owner})" if owner else ""))
    for i in idx:
        ax.axvline(pts[i][0], color="0.88", lw=0.8, zorder=0)


def plot_memory(runs: list[RunData], phase: str, path: Path) -> bool:
    """Memory over time in GiB: one line per run x rank x measure; CPU runs show process RSS."""
    attr = "train_memory" if phase == "train" else "infer_memory"
    series = [(run, _by_rank(getattr(run, attr))) for run in runs]
    series = [(run, ranks) for run, ranks in series if ranks]
    if not series:
        return False
    several_runs = len(series) > 1
    several_ranks = any(len(ranks) > 1 for _, ranks in series)
    laid = [(run, rank, recs, *_end_to_end(recs)) for run, ranks in series for rank, recs in ranks.items()]
    longest = max(float(xs.max()) for *_, xs, _ in laid)
    scale, unit = (60.0, "min") if longest > 2 * 3600 else (1.0, "s")
    fig = _figure(10, 5.5)
    ax = fig.add_subplot()
    kinds, run_index, session_label = set(), {run.name: i for i, (run, _) in enumerate(series)}, "new session"
    top = 0.0
    for run, rank, recs, xs, starts in laid:
        cuda = any(r.get("device") == "cuda" for r in recs)
        kinds.add("GPU" if cuda else "CPU (process RSS)")
        for f, (key, label, color) in enumerate(CUDA_FIELDS if cuda else CPU_FIELDS):
            ys = np.array([r[key] if is_number(r.get(key)) else np.nan for r in recs], float) / GIB
            if np.isnan(ys).all():  # e.g. no NVML on this machine
                continue
            # Colour tells apart what varies most (runs, then ranks, then measures); line style the next thing.
            if several_runs:
                color, style = f"C{run_index[run.name]}", STYLES[f % 4]
            elif several_ranks:
                color, style = f"C{rank % 10}", STYLES[f % 4]
            else:
                style = "-"
            name = " ".join(
                p for p in (run.name if several_runs else "", f"rank {rank}" if several_ranks else "", label) if p
            )
            ax.plot(xs / scale, ys, color=color, ls=style, lw=1.5, label=name, marker="." if len(xs) < 30 else None)
            top = max(top, float(np.nanmax(ys)))
        for start in starts:
            ax.axvline(start / scale, color="0.4", ls=":", lw=1, label=session_label)
            session_label = None  # one legend entry for all session boundaries
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)  # headroom: a flat line would sit on the frame
    ax.set_xlim(left=0)
    first_run, first_rank, first_recs, first_xs, _ = laid[0]
    owner = ", ".join(
        p for p in (first_run.name if several_runs else "", f"rank {first_rank}" if several_ranks else "") if p
    )
    _marker_axis(ax, first_xs, first_recs, phase, scale, owner)
    what = "Training" if phase == "train" else "Inference"
    ax.set_title(f"{what} memory over time: {' and '.join(sorted(kinds))}")
    ax.set_xlabel(f"time since start ({unit})" + ("; sessions laid end to end" if session_label is None else ""))
    ax.set_ylabel("memory (GiB)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_expert_load(loads: list[tuple[str, np.ndarray | None, list]], window: int, path: Path) -> bool:
    """One heatmap per run: layers x experts, each cell the expert's share of its layer's token-slots."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    loads = [(name, shares, dead) for name, shares, dead in loads if shares is not None]
    if not loads:
        return False
    max_experts = max(s.shape[1] for _, s, _ in loads)
    heights = [max(2.6, 1.4 + 0.38 * s.shape[0]) for _, s, _ in loads]
    fig = _figure(min(22.0, max(8.0, 3.0 + 0.55 * max_experts)), sum(heights))
    axes = fig.subplots(len(loads), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (name, shares, dead) in zip(axes, loads, strict=True):
        layers, experts = shares.shape
        uniform = 1.0 / experts
        # White = perfectly balanced, blue = underused (0 = deep blue), red = overloaded.
        top = max(float(np.nanmax(shares)), 2 * uniform)
        norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=top)
        image = ax.imshow(shares, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, format=PercentFormatter(xmax=1, decimals=1), pad=0.01)
        bar.set_ticks(sorted({0.0, uniform, top}))
        bar.set_label("share of layer's tokens")
        dead_cells = set(dead)
        for layer, e in dead:  # black is outside the colormap, so a dead expert stands out at any grid size
            ax.add_patch(Rectangle((e - 0.5, layer - 0.5), 1, 1, facecolor="black", edgecolor="black"))
        if layers * experts <= 400:  # small grids: print the whole-run share in every cell
            for (layer, e), v in np.ndenumerate(shares):
                if np.isfinite(v):
                    dark = (layer, e) in dead_cells or abs(norm(v) - 0.5) > 0.33
                    ax.text(
                        e,
                        layer,
                        f"{v:.0%}" if v >= 0.01 or v == 0 else "<1%",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
        step = max(1, experts // 32)
        ax.set_xticks(range(0, experts, step))
        ax.set_yticks(range(layers))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        verdict = f"{len(dead)} dead (black: 0 tokens in the last {window} logs)" if dead else "no dead experts"
        ax.set_title(
            f"{name + ': ' if len(loads) > 1 else ''}expert load over the whole run, "
            f"uniform = {uniform:.1%}; {verdict}",
            fontsize="medium",
        )
    fig.suptitle("MoE expert load (share of token-slots routed, per layer)")
    return _save(fig, path)
