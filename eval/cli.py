"""dit-sparse-eval: run a model dense and with block-sparse attention on the same prompts and seeds,
and report how much faster and how close the sparse result is.

    python -m dit_sparse.eval --out eval-out                     # the shipped reference model, CPU-sized
    dit-sparse-eval --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
        --patterns auto radial --densities 0.1 0.15 --dense-steps 0.25 --dense-layers 0 --frames 81 \\
        --vbench all --out wan-eval

Writes results.json, results.md, videos/ (dense, each config, side by side), plots/ and, with
--save-plans, plans/ under --out, and prints the table. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dit_sparse.config import PATTERNS, SparseAttentionConfig

from .harness.configs import config_grid, config_label, load_config_file, parse_dense_steps
from .harness.settings import DTYPE_NAMES, MAX_SEED, MODEL_PROMPTS, GenerationSettings
from .preflight import check_before_loading
from .vbench_bridge import check_dimensions

if TYPE_CHECKING:
    from .evaluation import EvalRequest

# This module imports neither torch nor diffusers at import time: --help and argument errors return
# at once, and the heavy modules load after the arguments have been checked.

DEFAULT_HELDOUT = 2  # held-out prompts the reference model runs when no --prompts are given


def default_prompts(model: str | None, heldout: int | None) -> list[str]:
    """The prompts of a run without ``--prompts``: the reference model's first held-out prompts
    (``heldout`` of them, default :data:`DEFAULT_HELDOUT`) for the reference model or a folder its
    training command wrote, or a generic prompt for any other ``--model``.

    Example::

        >>> default_prompts(None, 1)
        ['a blue circle moving up on a black background']
    """
    from .reference import heldout_prompts, runs_as_reference

    if not runs_as_reference(model):
        return MODEL_PROMPTS

    return [prompt for _, prompt in heldout_prompts(heldout or DEFAULT_HELDOUT)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-sparse-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("model and prompts")
    what.add_argument("--model", default=None,
                      help="diffusers model id or local directory (default: the shipped reference model); a folder "
                           "the reference training command wrote runs as the reference model does")
    what.add_argument("--prompts", nargs="+", default=None, metavar="TEXT_OR_FILE",
                      help="prompts, or text files with one prompt per line (blank and # lines skipped)")
    what.add_argument("--heldout", type=int, default=None, metavar="N",
                      help=f"the reference model's first N held-out prompts (its measurement set; default "
                           f"{DEFAULT_HELDOUT} when --prompts is left out), for it or a retrained folder")

    sparse = parser.add_argument_group(
        "sparse configurations (a grid, or a file)",
        f"Grid flags left out take the library defaults' value ({config_label(SparseAttentionConfig())}).",
    )
    sparse.add_argument("--configs", type=Path, default=None, metavar="FILE",
                        help="JSON or YAML list of SparseAttentionConfig dicts (replaces the grid flags)")
    sparse.add_argument("--patterns", nargs="+", choices=PATTERNS, default=None, metavar="PATTERN",
                        help=f"mask patterns: {', '.join(PATTERNS)}")
    sparse.add_argument("--densities", nargs="+", type=float, default=None, help="density budgets")
    sparse.add_argument("--top-p", nargs="+", type=float, default=None,
                        help="attention-mass budgets (replace the default density)")
    sparse.add_argument("--dense-steps", nargs="+", default=None, metavar="N_OR_FRACTION",
                        help="leading dense steps, a count (2) or a fraction of the run (0.25)")
    sparse.add_argument("--dense-layers", nargs="*", type=int, default=None, metavar="LAYER",
                        help="self-attention layers that stay dense (no value: none)")

    gen = parser.add_argument_group("generation (defaults: the model's own)")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                     help="default: bfloat16 on CUDA, float32 elsewhere")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per variant (default: 1)")
    timing.add_argument("--repeats", type=int, default=1, help="timed calls per prompt and variant (default: 1)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder (default: eval-out)")
    out.add_argument("--vbench", nargs="*", default=[], metavar="DIM",
                     help="VBench dimensions to score, or 'all' (temporal_flickering always runs)")
    out.add_argument("--vbench-python", default=None, help="Python interpreter that has vbench installed")
    out.add_argument("--save-plans", action="store_true", help="save each config's plans under OUT/plans")
    out.add_argument("--mask-layer", type=int, default=None,
                     help="self-attention layer for the block-mask pictures (default: the middle one)")
    out.add_argument("--fps", type=int, default=16, help="frame rate of the written mp4s (default: 16)")
    return parser


def request_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EvalRequest:
    """Validate the parsed flags (``parser.error`` on bad input) and build the request: everything
    that can be checked before a model loads is (see :mod:`~dit_sparse.eval.preflight`)."""
    for name in ("steps", "frames", "height", "width", "threads", "repeats", "fps", "heldout"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    for name in ("warmup", "mask_layer"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must lie in [0, {MAX_SEED}], got {args.seed}")
    grid_flags = [f"--{n.replace('_', '-')}" for n in ("patterns", "densities", "top_p", "dense_steps", "dense_layers")
                  if getattr(args, n) is not None]
    if args.configs is not None and grid_flags:
        parser.error(f"give either --configs FILE or the grid flags ({', '.join(grid_flags)}), not both")
    settings = GenerationSettings(args.steps, args.frames, args.height, args.width, args.guidance_scale, args.seed)
    try:
        configs = load_config_file(args.configs) if args.configs is not None else _grid(args)
        from .reference import runs_as_reference

        if args.heldout is not None and (args.prompts or not runs_as_reference(args.model)):
            raise ValueError("--heldout picks the reference model's prompts: leave out --prompts, and give --model "
                             "only for a folder the reference training command wrote (it holds training.json)")
        prompts = _read_prompts(args.prompts) if args.prompts else default_prompts(args.model, args.heldout)
        check_dimensions(args.vbench)
        check_before_loading(args.model, settings, configs, args.out)
        from .harness.models import pick_device, pick_dtype

        device = pick_device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}" if error.filename else str(error))
    from .evaluation import EvalRequest

    return EvalRequest(
        model=args.model, prompts=prompts, configs=configs, settings=settings, out=args.out, warmup=args.warmup,
        repeats=args.repeats, device=device, dtype=pick_dtype(args.dtype, device), vbench_dimensions=args.vbench,
        vbench_python=args.vbench_python, save_plans=args.save_plans, mask_layer=args.mask_layer, fps=args.fps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    request = request_from_args(args, parser)
    import torch

    from .evaluation import evaluate
    from .report import format_terminal

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = evaluate(request)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(format_terminal(results))
    print(f"\nwrote results.md, results.json, videos/ and plots/ under {request.out}")
    return 0


def _grid(args: argparse.Namespace) -> list[SparseAttentionConfig]:
    """The grid from the flags, each flag left out taken from the default configuration."""
    default = SparseAttentionConfig()
    densities = args.densities if args.densities is not None else ([] if args.top_p else [default.density])
    dense_steps = [parse_dense_steps(text) for text in args.dense_steps] if args.dense_steps else [default.dense_steps]
    dense_layers = default.dense_layers if args.dense_layers is None else tuple(args.dense_layers)
    return config_grid(args.patterns or [default.pattern], densities, args.top_p or [], dense_steps, dense_layers)


def _read_prompts(items: list[str]) -> list[str]:
    prompts = []
    for item in items:
        path = Path(item)
        if path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            found = [line for line in lines if line and not line.startswith("#")]
            if not found:
                raise ValueError(f"prompt file {path} has no prompts (one per line; blank and # lines are skipped)")
            prompts += found
        elif item.strip():
            prompts.append(item.strip())
        else:
            raise ValueError("--prompts got an empty prompt")
    return prompts
