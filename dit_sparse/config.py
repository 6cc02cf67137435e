"""What a user sets: the sparse pattern, its budget, and when attention stays dense."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PATTERNS = ("auto", "radial", "spatiotemporal", "semantic", "adaptive", "dense", "radial_paper", "svg1", "svg2")
BACKENDS = ("auto", "torch", "torch_reference", "triton", "flex")
# The peers' rules and the defaults of their public code (docs/families.md, "Peer presets").
PRESETS: dict[str, dict[str, Any]] = {
    "radial_paper": {"pattern": "radial_paper", "block_size": 128, "radial_decay": 0.2, "dense_steps": 12 / 50,
                     "dense_layers": (0,)},
    "svg1": {"pattern": "svg1", "density": 0.25, "block_size": 128, "dense_steps": 0.075, "dense_layers": ()},
    "svg2": {"pattern": "svg2", "top_p": 0.9, "kmeans_iters": 50, "dense_steps": 0.2, "dense_layers": ()},
}
DEFAULT_DENSITY = 0.15
# The fields a plan depends on: plans saved under one config serve another that agrees on these.
PLAN_FIELDS = ("pattern", "density", "top_p", "alpha", "exponent", "block_size", "tile_shape", "min_recall",
               "max_error", "fallback_share", "error_rows", "mass_rows", "radial_decay", "per_context_plans", "seed",
               "query_clusters", "key_clusters", "kmeans_iters", "split_key_clusters")


@dataclass
class SparseAttentionConfig:
    """Configuration for :func:`dit_sparse.apply_sparse_attention`.

    Args:
        pattern: ``"auto"`` (per head, the family with the lowest estimated output error), ``"radial"``,
            ``"spatiotemporal"``, ``"semantic"``, ``"adaptive"`` (measured block mass),
            ``"dense"`` (the hooks run, attention stays dense: a baseline), or a peer's own rule:
            ``"radial_paper"``, ``"svg1"``, ``"svg2"`` (start from :meth:`preset` for their defaults).
        density: fraction of key blocks each query block keeps. The default budget (0.15) when
            neither ``top_p`` nor ``alpha`` is given.
        top_p: keep each query block's heaviest key blocks until this share of its attention mass.
        alpha, exponent: keep ``alpha * n ** exponent`` keys per query for ``n`` keys: a budget that
            adapts to the sequence length ("Attention is naturally n^C-sparse").
        dense_steps: leading denoising steps run dense, as a count or a fraction of the run. The
            last dense step also calibrates the plans.
        dense_last_steps: trailing steps run dense.
        dense_layers: self-attention layers (by index) that always run dense.
        recalibrate_at: steps at which plans are measured again (with a dense pass).
        recalibrate_error: ``None`` (default): no per-step check. A number: at every sparse step, each
            layer's plan is checked on ``check_rows`` sampled query rows per head (their exact
            attention against the plan's, about ``check_rows / S`` of a dense call), and the layer
            is planned again from that step's queries and keys (no dense pass) when the estimated
            relative output error, averaged over its heads, exceeds this bound. ``0`` re-plans every
            sparse step (the peers' way); ``math.inf`` only records the error of every step
            (``last_stats.checks``: how plans age). Loaded plans are checked too. Off by default: on
            the reference model re-planning without a dense pass cost more than it gained
            (docs/fidelity.md).
        check_rows: query rows per head the ``recalibrate_error`` check samples.
        block_size: tokens per block, or ``(query, key)`` block sizes.
        tile_shape: ``(t, h, w)`` spatio-temporal tile that blocks are cut from; ``None`` picks one
            whose volume is the key block size.
        min_recall: ``None`` (default): ``pattern="auto"`` chooses each head's family by its
            estimated output error and spends ``fallback_share`` on the worst heads. A number selects
            the earlier rule: each head's family by measured recall, and heads whose best family keeps
            less attention mass than ``min_recall`` stay dense (whatever that costs).
        max_error: with ``pattern="auto"`` (by error), heads whose estimated relative output error
            exceeds this get more density from the fallback, worst first.
        fallback_share: the fallback may spend up to ``(1 + fallback_share)`` times the requested
            video density on average over a call's heads (0.1: a request of 0.15 spends at most
            0.165), on top of what the chosen masks spend; 0 leaves it only what they leave unspent.
        error_rows: query rows per head sampled for the error estimate (exact dense and sparse
            outputs of those rows at the calibration step).
        mass_rows: query rows per query block (a seeded random sample) whose attention the block
            mass is measured on, on the PyTorch path (CPU), when that is at most a quarter of the
            query block (16 of a block of 64, or of 128); ``None`` measures every query.
        radial_decay: with ``pattern="radial_paper"``, the paper's decay factor (its mask ignores
            the budget: the decay sets the density).
        backend: attention backend (see :func:`dit_sparse.sparse_attention`).
        per_context_plans: separate plans for the conditional and unconditional CFG passes.
        seed: seed of the semantic clustering.
        reuse_plans: plans calibrated by an earlier pipeline call at the same layout serve later
            calls without calibrating again (as loaded plans do). Off by default: every call
            calibrates its own plans, since data-driven plans depend on the prompt.
        query_clusters, key_clusters: k-means clusters of each head's video queries and keys for the
            semantic family; ``None`` scales them with the video (one per 256 queries and one per 64
            keys, SVG2's ratio at 720p).
        kmeans_iters: Lloyd iterations of that clustering.
        split_key_clusters: the semantic family also offers each head's key clusters split in two (a
            variant ``auto`` takes where its estimated error is lower; finer clusters win at low
            budgets on synthetic heads, while on the reference model they cost 0.3 dB and a tenth of
            the speedup: see docs/families.md). ``False`` keeps the clusters as made, and
            calibrates faster.
        balance_heads: under Ulysses context parallelism, hand each layer's heads to the ranks so
            that their shares of the sparse attention FLOPs are as even as the plans allow (heads
            left dense otherwise weigh on whichever rank holds them); the same output, one extra
            gather of each plan at calibration. No effect in one process.

    Example::

        >>> from dit_sparse import SparseAttentionConfig
        >>> SparseAttentionConfig(pattern="radial", density=0.2).num_dense_steps(50)
        12
    """

    pattern: str = "auto"
    density: float | None = None
    top_p: float | None = None
    alpha: float | None = None
    exponent: float = 0.5
    dense_steps: int | float = 0.25
    dense_last_steps: int = 0
    dense_layers: tuple[int, ...] = (0,)
    recalibrate_at: tuple[int, ...] = ()
    recalibrate_error: float | None = None
    check_rows: int = 64
    block_size: int | tuple[int, int] = 64
    tile_shape: tuple[int, int, int] | None = None
    min_recall: float | None = None
    max_error: float = 0.05
    fallback_share: float = 0.1
    error_rows: int = 256
    mass_rows: int | None = 16
    radial_decay: float = 0.2
    backend: str = "auto"
    per_context_plans: bool = True
    seed: int = 0
    reuse_plans: bool = False
    query_clusters: int | None = None
    key_clusters: int | None = None
    kmeans_iters: int = 10
    split_key_clusters: bool = True
    balance_heads: bool = False

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}; got {self.pattern!r}")
        budgets = [name for name in ("density", "top_p", "alpha") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise ValueError(f"give one budget (density, top_p or alpha), got {' and '.join(budgets)}")
        if not budgets:
            self.density = DEFAULT_DENSITY
        _check_fraction("density", self.density)
        _check_fraction("top_p", self.top_p)
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 < self.exponent < 1:
            raise ValueError(f"exponent must lie in (0, 1), got {self.exponent}")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, (int, float)):
            raise TypeError(f"dense_steps must be an int (steps) or a float (fraction), got {self.dense_steps!r}")
        if isinstance(self.dense_steps, float) and not 0.0 <= self.dense_steps <= 1.0:
            raise ValueError(f"a fractional dense_steps must lie in [0, 1], got {self.dense_steps}")
        if self.dense_steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {self.dense_steps}")
        _check_count("dense_last_steps", self.dense_last_steps)
        self.dense_layers = _index_tuple("dense_layers", self.dense_layers)
        self.recalibrate_at = _index_tuple("recalibrate_at", self.recalibrate_at)
        if self.recalibrate_error is not None and (
            isinstance(self.recalibrate_error, bool) or not isinstance(self.recalibrate_error, (int, float))
            or not self.recalibrate_error >= 0
        ):
            raise ValueError(
                f"recalibrate_error must be a number >= 0 (a relative output error such as 0.1; None turns the check "
                f"off), got {self.recalibrate_error!r}"
            )
        _check_count("check_rows", self.check_rows, minimum=1)
        bq, bk = (self.block_size,) * 2 if isinstance(self.block_size, int) else tuple(self.block_size)
        for b in (bq, bk):
            if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
                raise ValueError(f"block sizes must be powers of two >= 16 (64 or 128 are fast), got {self.block_size!r}")
        if self.tile_shape is not None:
            tile = tuple(self.tile_shape)
            if len(tile) != 3 or not all(isinstance(s, int) and s >= 1 for s in tile):
                raise ValueError(f"tile_shape must be three positive ints (t, h, w), got {self.tile_shape!r}")
            self.tile_shape = tile
        _check_fraction("min_recall (or None to choose by output error)", self.min_recall, allow_zero=True)
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or self.max_error < 0:
            raise ValueError(f"max_error must be a number >= 0, got {self.max_error!r}")
        if isinstance(self.fallback_share, bool) or not isinstance(self.fallback_share, (int, float)) or self.fallback_share < 0:
            raise ValueError(f"fallback_share must be a number >= 0 (0 turns the fallback off), got {self.fallback_share!r}")
        _check_count("error_rows", self.error_rows, minimum=1)
        if self.mass_rows is not None:
            _check_count("mass_rows (or None to measure every query)", self.mass_rows, minimum=1)
        if isinstance(self.radial_decay, bool) or not isinstance(self.radial_decay, (int, float)) or self.radial_decay <= 0:
            raise ValueError(f"radial_decay must be a number > 0, got {self.radial_decay!r}")
        if self.pattern == "svg1" and self.density is None:
            raise ValueError("pattern='svg1' takes its sparsity as density=... (the share of pairs its band keeps)")
        if self.pattern == "radial_paper" and self.block_sizes[0] != self.block_sizes[1]:
            raise ValueError(f"pattern='radial_paper' needs equal query and key blocks, got {self.block_size!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for name in ("per_context_plans", "reuse_plans", "balance_heads", "split_key_clusters"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("query_clusters", "key_clusters"):
            if getattr(self, name) is not None:
                _check_count(f"{name} (or None to scale it with the video)", getattr(self, name), minimum=1)
        _check_count("kmeans_iters", self.kmeans_iters, minimum=1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SparseAttentionConfig:
        """A peer's rule with the defaults of its public code (``"radial_paper"``, ``"svg1"``,
        ``"svg2"``); ``overrides`` change any field.

        Example::

            >>> config = SparseAttentionConfig.preset("svg1")
            >>> config.pattern, config.density, config.block_size, config.num_dense_steps(50)
            ('svg1', 0.25, 128, 3)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields_ = dict(PRESETS[name])
        if any(b in overrides for b in ("density", "top_p", "alpha")):
            for b in ("density", "top_p", "alpha"):
                fields_.pop(b, None)
        return cls(**{**fields_, **overrides})

    @property
    def needs_values(self) -> bool:
        """Whether calibration needs the attention call's values: ``auto`` choosing by error, and
        ``svg1`` (which profiles each head's output)."""
        return self.chooses_by_error or self.pattern == "svg1"

    @property
    def chooses_by_error(self) -> bool:
        """Whether planning estimates output errors: ``pattern="auto"`` without ``min_recall`` and
        with a count budget (a ``top_p`` budget is itself a recall target and keeps the recall rule)."""
        return self.pattern == "auto" and self.min_recall is None and self.top_p is None

    @property
    def block_sizes(self) -> tuple[int, int]:
        """``(query, key)`` block sizes."""
        return (self.block_size,) * 2 if isinstance(self.block_size, int) else tuple(self.block_size)

    @property
    def tile(self) -> tuple[int, int, int]:
        """The tile shape in use: ``tile_shape``, or a tile of one key block's volume
        (64 -> 1x8x8, 128 -> 2x8x8)."""
        if self.tile_shape is not None:
            return self.tile_shape
        bits = self.block_sizes[1].bit_length() - 1
        side = 1 << (bits // 2)
        return (1 << (bits % 2), side, side)

    def tile_for(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The tile shape for a ``(T, H, W)`` grid: ``tile_shape`` when set, else a tile of one key
        block's volume fitted to the grid. An image (``T = 1``) gets a flat tile (128 -> 1x8x16);
        a dimension smaller than the tile shrinks it and the volume moves to the other dimensions.

        Example::

            >>> config = SparseAttentionConfig(block_size=128)
            >>> config.tile_for((21, 30, 52)), config.tile_for((1, 64, 64)), config.tile_for((5, 4, 4))
            ((2, 8, 8), (1, 8, 16), (5, 4, 4))
        """
        if self.tile_shape is not None:
            return self.tile_shape
        frames, height, width = grid
        volume = self.block_sizes[1]
        tile_t = 1 if frames == 1 else min(frames, self.tile[0])
        spatial = volume // tile_t
        tile_w = min(width, 1 << (spatial.bit_length() // 2))
        tile_h = min(height, max(1, spatial // tile_w))
        tile_t = min(frames, max(tile_t, round(volume / (tile_h * tile_w))))
        return tile_t, tile_h, tile_w

    def num_dense_steps(self, total_steps: int) -> int:
        """Leading dense steps for a run of ``total_steps`` (a fraction rounds down, to at least 1)."""
        if isinstance(self.dense_steps, float):
            return min(total_steps, max(1 if self.dense_steps > 0 else 0, int(self.dense_steps * total_steps)))
        return min(total_steps, self.dense_steps)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def plan_signature(self) -> dict[str, Any]:
        """The fields plans depend on (JSON-ready); the time fields (dense steps, layers) and the
        backend are left out."""
        return {k: v for k, v in self.to_dict().items() if k in PLAN_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseAttentionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SparseAttentionConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _check_fraction(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value <= 1):
        raise ValueError(f"{name} must lie in {'[0' if allow_zero else '(0'}, 1], got {value!r}")


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _index_tuple(name: str, value) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) else tuple(value)
    for item in items:
        _check_count(f"every entry of {name}", item)
    return tuple(sorted(set(items)))
