"""The evaluation's plots as matplotlib figures (no pyplot state, Agg-rendered): wall time per variant
split into self-attention and the rest, speedup against PSNR per configuration (two or more), density
per layer and step, and per-head block masks of one layer.

Every function returns a :class:`matplotlib.figure.Figure` (a Gradio ``gr.Plot`` shows one as is);
:func:`save_figure` writes a PNG.

Example::

    >>> import numpy as np
    >>> fig = density_figure(np.array([[1.0, 1.0], [1.0, 0.2]]), "radial, density 0.2")
    >>> save_figure(fig, Path("/tmp/density.png"))                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

PNG_DPI = 120
# Every block-mask picture (eval, demo, docs) draws kept blocks bright and skipped ones dark, with a legend.
MASK_CMAP = "gray"
MASK_KEPT, MASK_TEXT, MASK_SKIPPED = 1.0, 0.5, 0.0


def wall_time_figure(rows: list[tuple[str, float, float]]) -> Figure:
    """One horizontal bar per variant, ``(label, wall seconds, self-attention seconds)``, dense first:
    the self-attention part (what sparse attention speeds up) and the rest, with each bar's total
    and its speedup over the first.

    Example::

        >>> fig = wall_time_figure([("dense", 16.2, 14.6), ("adaptive, density 0.05", 6.5, 4.8)])
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['16.20 s', '6.50 s, 2.49x']
    """
    fig = Figure(figsize=(7, 1.4 + 0.7 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    labels = [textwrap.fill(label, 28) for label, _, _ in rows]
    walls = np.array([wall for _, wall, _ in rows])
    attention = np.array([min(attn, wall) for _, wall, attn in rows])
    y = np.arange(len(rows))[::-1]
    ax.barh(y, attention, color="tab:orange", label="self-attention")
    ax.barh(y, walls - attention, left=attention, color="tab:grey", label="everything else")
    for row, wall in zip(y, walls, strict=True):
        text = f"{wall:.2f} s" if row == y[0] else f"{wall:.2f} s, {walls[0] / wall:.2f}x"
        ax.annotate(text, (wall, row), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, walls.max() * 1.3)
    ax.set_xlabel("wall time of one pipeline call (s)")
    ax.set_title("Where the time goes")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def speedup_vs_psnr_figure(points: list[tuple[str, float, float]]) -> Figure:
    """One point per configuration: ``(label, PSNR frame-mean in dB, end-to-end speedup)``. An
    ``inf`` PSNR (output identical to dense) sits at the right edge, marked as such. Worth drawing
    for two configurations or more (one is a single dot: :func:`wall_time_figure` says more)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    finite = [psnr for _, psnr, _ in points if math.isfinite(psnr)]
    edge = (max(finite) + 5.0) if finite else 60.0
    for label, psnr, speedup in points:
        x = psnr if math.isfinite(psnr) else edge
        ax.scatter([x], [speedup], marker="o" if math.isfinite(psnr) else ">", s=50)
        ax.annotate(label if math.isfinite(psnr) else f"{label} (identical to dense)", (x, speedup),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.margins(x=0.3, y=0.15)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("PSNR against dense, per-frame mean (dB)")
    ax.set_ylabel("end-to-end speedup over dense (x)")
    ax.set_title("Speed against fidelity")
    ax.grid(alpha=0.3)
    return fig


def density_figure(density: np.ndarray, title: str) -> Figure:
    """Heat map of ``density[step, layer]`` (1 = dense)."""
    steps, layers = density.shape
    fig = Figure(figsize=(max(5.0, 0.35 * steps + 2), max(3.0, 0.3 * layers + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(density.T, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                      extent=(-0.5, steps - 0.5, -0.5, layers - 0.5))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("self-attention layer")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(textwrap.fill(f"Attention density per layer and step: {title}", width=70), fontsize=10)
    fig.colorbar(image, ax=ax, label="density (1 = dense)")
    return fig


def mask_figure(masks: np.ndarray, title: str, heads: Sequence[int] | None = None) -> Figure:
    """Per-head block masks ``[H, nQ, nK]`` (query blocks down, key blocks across, in the plan's
    token order) of the heads ``heads`` (default: all); kept blocks are bright, with a legend."""
    heads = range(masks.shape[0]) if heads is None else heads
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows + 0.4), layout="constrained")
    for panel, head in enumerate(heads):
        ax = fig.add_subplot(rows, cols, panel + 1)
        ax.imshow(masks[head], cmap=MASK_CMAP, vmin=MASK_SKIPPED, vmax=MASK_KEPT, interpolation="nearest")
        ax.set_title(f"head {head}: {masks[head].mean():.1%} of blocks", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(textwrap.fill(title, width=int(45 * cols)), fontsize=10)
    add_mask_legend(fig)
    return fig


def add_mask_legend(fig: Figure, text_blocks: bool = False) -> None:
    """The block-mask legend under ``fig``: kept (bright), skipped (dark) and, with ``text_blocks``,
    text blocks (grey, always kept).

    Example::

        >>> fig = Figure(layout="constrained")
        >>> add_mask_legend(fig, text_blocks=True)
        >>> [t.get_text() for t in fig.legends[0].get_texts()]
        ['kept', 'skipped', 'text (always kept)']
    """
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    cmap = colormaps[MASK_CMAP]
    entries = [("kept", MASK_KEPT), ("skipped", MASK_SKIPPED)] + ([("text (always kept)", MASK_TEXT)] if text_blocks else [])
    handles = [Patch(facecolor=cmap(value), edgecolor="black", linewidth=0.5, label=label) for label, value in entries]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI)
    return path
