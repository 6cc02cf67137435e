"""Per-head block-mask pictures: every family and auto on one synthetic head of each type.

    python -m dit_sparse.eval.mask_pictures                        # 12x16x32 grid + 64 text tokens
    python -m dit_sparse.eval.mask_pictures --grid 1 48 64 --text 0 --block-size 128 --output mask_pictures_image

Each panel is one head's ``[query block, key block]`` map over the head's own token order (the tile
order, or for semantic heads the cluster orders): black = kept, white = skipped, grey = text blocks
(always kept). Writes docs/img/<output>.png (default mask_pictures).
"""

from __future__ import annotations

import argparse

import torch

from dit_sparse import SparseAttentionConfig
from dit_sparse.planner import FAMILIES, calibrate, plan_from_calibration

from .fidelity import figure_path
from .synthetic import HEAD_TYPES, synthetic_attention

PATTERNS = (*FAMILIES, "auto")


def pictures(grid, text_len: int, density: float, block_size: int, seed: int) -> dict[str, tuple[torch.Tensor, object]]:
    """Per pattern, the ``[H, nQ, nK]`` picture (0 skipped, 1 kept, 0.5 text) and the plan report."""
    data = synthetic_attention(grid, HEAD_TYPES, head_dim=64, text_len=text_len, seed=seed)
    calibration = calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto", block_size=block_size), v=data.v)
    out = {}
    for pattern in PATTERNS:
        config = SparseAttentionConfig(pattern=pattern, density=density, block_size=block_size)
        plan, report = plan_from_calibration(calibration, config)
        picture = plan.to_block_mask()[0].float()
        picture[:, data.layout.num_video_blocks(block_size) :] *= 0.5
        picture[:, :, data.layout.num_video_blocks(block_size) :] *= 0.5
        out[pattern] = (picture, report)
    return out


def draw(panels: dict, title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(HEAD_TYPES), len(PATTERNS), figsize=(2.6 * len(PATTERNS), 2.8 * len(HEAD_TYPES)))
    for col, pattern in enumerate(PATTERNS):
        picture, report = panels[pattern]
        for row, kind in enumerate(HEAD_TYPES):
            ax = axes[row, col]
            ax.imshow(picture[row], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = report.family[0][row] if pattern == "auto" else pattern
            ax.set_title(
                f"{label}\nrecall {float(report.recall[0, row]):.2f}, density {float(report.density[0, row]):.2f}", fontsize=8
            )
            if col == 0:
                ax.set_ylabel(f"{kind} head", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(12, 16, 32), metavar=("T", "H", "W"))
    parser.add_argument("--text", type=int, default=64, help="text tokens after the video")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="mask_pictures", help="file name under docs/img, without .png")
    args = parser.parse_args()
    grid = tuple(args.grid)
    panels = pictures(grid, args.text, args.density, args.block_size, args.seed)
    path = figure_path(args.output)
    draw(panels, f"grid {grid} + {args.text} text tokens, blocks of {args.block_size}, density {args.density}", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
