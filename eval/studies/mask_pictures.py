"""Per-head block-mask pictures: every family and auto on one synthetic head of each type.

    python -m dit_sparse.eval.studies.mask_pictures                        # 12x16x32 grid + 64 text tokens
    python -m dit_sparse.eval.studies.mask_pictures --grid 1 48 64 --text 0 --block-size 128 --output mask_pictures_image

Each panel is one head's ``[query block, key block]`` map over the head's own token order (the tile
order, or for semantic heads the cluster orders), drawn as every block-mask picture of the project
is: white = kept, black = skipped, grey = text blocks (always kept), with a legend. Writes
docs/img/<output>.png (default mask_pictures).
"""

from __future__ import annotations

import argparse

import torch
from matplotlib.figure import Figure

from dit_sparse import SparseAttentionConfig
from dit_sparse.planner import FAMILIES, calibrate, plan_from_calibration

from ..plots import MASK_CMAP, MASK_KEPT, MASK_SKIPPED, MASK_TEXT, add_mask_legend
from ..synthetic import HEAD_TYPES, synthetic_attention
from .common import add_out_argument, figure_path

PATTERNS = (*FAMILIES, "auto")


def pictures(grid, text_len: int, density: float, block_size: int, seed: int) -> dict[str, tuple[torch.Tensor, object]]:
    """Per pattern, the ``[H, nQ, nK]`` picture (``MASK_SKIPPED``, ``MASK_KEPT``, ``MASK_TEXT`` for text
    blocks) and the plan report."""
    data = synthetic_attention(grid, HEAD_TYPES, head_dim=64, text_len=text_len, seed=seed)
    calibration = calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto", min_recall=0.0, block_size=block_size), v=data.v)
    out = {}
    for pattern in PATTERNS:
        config = SparseAttentionConfig(pattern=pattern, density=density, block_size=block_size)
        plan, report = plan_from_calibration(calibration, config)
        picture = plan.to_block_mask()[0].float()
        text_q, text_k = (plan.text_blocks(which)[0].expand(plan.num_heads, -1) for which in ("q", "kv"))
        picture[text_q] = MASK_TEXT
        picture.masked_fill_(text_k[:, None, :], MASK_TEXT)
        out[pattern] = (picture, report)
    return out


def draw(panels: dict, title: str, text_blocks: bool) -> Figure:
    """One column per pattern, one row per head type (``text_blocks``: the layout has text, whose
    blocks the legend names)."""
    fig = Figure(figsize=(2.6 * len(PATTERNS), 2.8 * len(HEAD_TYPES) + 0.4), layout="constrained")
    axes = fig.subplots(len(HEAD_TYPES), len(PATTERNS))
    for col, pattern in enumerate(PATTERNS):
        picture, report = panels[pattern]
        for row, kind in enumerate(HEAD_TYPES):
            ax = axes[row, col]
            ax.imshow(picture[row].numpy(), cmap=MASK_CMAP, vmin=MASK_SKIPPED, vmax=MASK_KEPT, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = report.family[0][row] if pattern == "auto" else pattern
            ax.set_title(
                f"{label}\nrecall {float(report.recall[0, row]):.2f}, density {float(report.density[0, row]):.2f}", fontsize=8
            )
            if col == 0:
                ax.set_ylabel(f"{kind} head", fontsize=10)
    fig.suptitle(title, fontsize=10)
    add_mask_legend(fig, text_blocks=text_blocks)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(12, 16, 32), metavar=("T", "H", "W"))
    parser.add_argument("--text", type=int, default=64, help="text tokens after the video")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="mask_pictures", help="file name under <out>/img, without .png")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    grid = tuple(args.grid)
    panels = pictures(grid, args.text, args.density, args.block_size, args.seed)
    path = figure_path(args.out, args.output)
    title = f"grid {grid} + {args.text} text tokens, blocks of {args.block_size}, density {args.density}"
    draw(panels, title, text_blocks=args.text > 0).savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
