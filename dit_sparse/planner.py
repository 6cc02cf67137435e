"""The planner: from one dense attention call's q and k to a per-head :class:`BlockSparsePlan`.

Calibration measures what the families need once: the block mass over the tile order and, for the
semantic family, each head's query/key clustering (and the same with each key cluster split in two)
and the block mass over its cluster orders.
Planning turns that into a mask per head for the configured pattern and budget. ``auto`` keeps, per
head, the family whose mask has the lowest estimated output error at the budget (exact dense and
sparse outputs on sampled query rows), then spends at most ``fallback_share`` of the budget on more
density (1.5 to 4 times the budget, or dense) for the heads whose error exceeds ``max_error``,
worst first. With ``min_recall`` set (or a ``top_p`` budget) it keeps the recall rule instead: the
family whose mask keeps the most measured attention mass, and heads below ``min_recall`` dense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .budget import Budget
from .calibration import measure_block_masses
from .config import SparseAttentionConfig
from .families.peers import (
    SVG1_PROFILE_FIRST_TOKENS,
    SVG1_PROFILE_ROWS,
    radial_paper_block_mask,
    svg1_block_mask,
    svg1_profile_mask,
    svg2_block_mask,
    svg2_cluster_counts,
)
from .families import (
    adaptive_block_mask,
    cluster_heads,
    fit_band,
    fit_radial,
    fit_radial_band,
    fit_spatiotemporal,
    semantic_block_masks,
)
from .families.semantic import SemanticClustering, split_key_clusters
from .layout import TokenLayout
from .output_error import Candidate, RowSample, estimate_errors, estimate_errors_and_recall
from .plan import BlockSparsePlan
from .plan import _bounds as block_bounds
from .scoring import BestPerHead, recall, target_density, video_density
from .ulysses import UlyssesGroup

FAMILIES = ("radial", "spatiotemporal", "semantic", "adaptive")
# The densities, in multiples of the budget's, that auto's fallback may raise a head to (or dense).
FALLBACK_LEVELS = (1.5, 2.0, 3.0, 4.0)

__all__ = ["FAMILIES", "Calibration", "PlanReport", "build_plan", "calibrate", "plan_from_calibration", "recall"]


@dataclass
class PlanReport:
    """What the planner chose for each batch element and head.

    Attributes:
        family: ``[B][H]`` family names (``"dense"`` for heads left dense).
        recall: ``[B, H]`` share of the measured attention mass the plan keeps.
        density: ``[B, H]`` fraction of the attention FLOPs the plan keeps.
        seconds: wall time of calibration and planning.
        error: ``[B, H]`` estimated relative output error on the sampled query rows (``None`` when
            the pattern did not estimate it).
    """

    family: list[list[str]]
    recall: torch.Tensor
    density: torch.Tensor
    seconds: float
    error: torch.Tensor | None = None


# The token orders a family's variants use: the tile order, the raster order, the position-major
# order (all shared by every head) and each head's cluster orders, in fixed blocks ("semantic", SVG2's
# rule) or in cluster-aligned blocks, of the key clusters as made ("clusters") or each split in two
# ("fine_clusters").
FAMILY_ORDERS = {
    "radial": ("tile", "raster"),
    "spatiotemporal": ("tile", "raster", "position"),
    "semantic": ("clusters", "fine_clusters"),
    "adaptive": ("tile",),
    "radial_paper": ("raster",),
    "svg1": ("raster", "position"),
    "svg2": ("semantic",),
}
PEERS = ("radial_paper", "svg1", "svg2")
# Orders over cluster-aligned blocks: the semantic family's masks there come from the centroids, so
# only the recall rule reads their measured block mass (auto by error takes recall from its rows).
CLUSTER_ORDERS = ("clusters", "fine_clusters")


@dataclass
class Calibration:
    """What one dense attention call tells the planner (reusable for several budgets).

    Attributes:
        layout, block_size, tile: the geometry it was measured on.
        batch_size, num_heads: the plans' batch (1 when shared across the batch) and heads.
        orders: by name (``"tile"``, ``"raster"``, ``"position"``, and the cluster orders
            ``"semantic"``, ``"clusters"``, ``"fine_clusters"``), the ``(q_order, kv_order)``
            pairs (``[S]``, or ``[B, H, S]`` for the cluster orders).
        masses: by the same names, the ``[B, H, nQ, nK]`` block mass over that order (those
            planning reads: see :func:`calibrate`).
        clustering: the semantic family's k-means (``None`` when no pattern needs it).
        fine_clustering: the same with each key cluster split in two (``"fine_clusters"``).
        seconds: wall time of the calibration.
        rows: the sampled query rows, keys and values for the output-error estimate (``None`` when
            the pattern does not choose by error).
        ulysses: the group the layer's heads are split over (``None``: this call holds them all).
        starts: by order name, the ``(q_starts, kv_starts)`` ``[B, H, n + 1]`` boundaries of orders
            cut into variable blocks (``"clusters"``: the semantic family's cluster-aligned blocks).
    """

    layout: TokenLayout
    block_size: tuple[int, int]
    tile: tuple[int, int, int]
    batch_size: int
    num_heads: int
    orders: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masses: dict[str, torch.Tensor]
    clustering: SemanticClustering | None
    seconds: float
    rows: RowSample | None = None
    ulysses: UlyssesGroup | None = None
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fine_clustering: SemanticClustering | None = None

    @property
    def tile_order(self) -> torch.Tensor:
        """``[S]`` the tile order."""
        return self.orders["tile"][0]


def build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
    v: torch.Tensor | None = None,
    ulysses: UlyssesGroup | None = None,
) -> tuple[BlockSparsePlan, PlanReport]:
    """Calibrate on one attention call and plan every head.

    Args:
        q, k: ``(B, S, H, D)`` exactly as the attention call sees them (after norms and RoPE).
        layout: the call's token layout.
        config: pattern, budget, block size and tile shape.
        share_batch: one plan for the whole batch (block mass averaged over it) instead of one
            per batch element.
        v: ``(B, S, H, D)`` values, needed when ``config.chooses_by_error`` (``pattern="auto"``,
            the default).
        ulysses: under Ulysses context parallelism, the group the layer's heads are split over;
            ``q``, ``k``, ``v`` hold this rank's heads, and every rank calls ``build_plan`` at once.
            The plans of all ranks together equal those of one process holding every head.

    Returns the plan (on ``q``'s device; batch size 1 if ``share_batch`` else B) and a report.

    Example::

        >>> from dit_sparse import SparseAttentionConfig, TokenLayout
        >>> layout = TokenLayout((4, 16, 16))
        >>> q, k = torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32)
        >>> plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="adaptive", density=0.25))
        >>> plan.density()
        0.25
    """
    return plan_from_calibration(calibrate(q, k, layout, config, share_batch, v=v, ulysses=ulysses), config)


def calibrate(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
    v: torch.Tensor | None = None,
    ulysses: UlyssesGroup | None = None,
) -> Calibration:
    """Measure what ``config.pattern`` needs from one attention call (see :func:`build_plan`).

    Never holds an ``S x S`` matrix: block masses come from the chunked two-pass measurement
    (the Triton kernel on CUDA), output errors from ``config.error_rows`` sampled query rows.

    It measures what ``config`` plans with: ``auto`` by error measures no block mass over the
    semantic family's cluster orders (its masks there come from the centroids, its recall from the
    sampled rows). To plan every pattern from one calibration, calibrate with ``pattern="auto"`` and
    ``min_recall=0.0`` (every family's block mass, and the sampled rows).
    """
    start = time.perf_counter()
    _check_inputs(q, k, layout)
    if config.needs_values and v is None:
        if config.pattern == "svg1":
            raise ValueError("pattern='svg1' profiles each head's output and needs the values: pass v=...")
        raise ValueError(
            "pattern='auto' chooses each head's family by its output error and needs the values: pass v=..., "
            "or set min_recall (e.g. 0.0) to choose by measured recall instead"
        )
    blocks = config.block_sizes
    tile = config.tile_for(layout.grid)
    families = FAMILIES if config.pattern == "auto" else () if config.pattern == "dense" else (config.pattern,)
    needed = {name for family in families for name in _family_orders(family, config)}
    orders = {"tile": (layout.tile_order(tile).to(q.device),) * 2}
    clustering, fine, starts = None, None, {}
    if "raster" in needed:
        orders["raster"] = (layout.identity_order().to(q.device),) * 2
    if "position" in needed:
        orders["position"] = (layout.position_order().to(q.device),) * 2
    if needed & {"semantic", *CLUSTER_ORDERS}:
        q_in, k_in = (x.mean(0, keepdim=True) if share_batch else x for x in (q, k))
        counts = (config.query_clusters, config.key_clusters)
        if config.pattern == "svg2":
            counts = tuple(c if c is not None else d for c, d in zip(counts, svg2_cluster_counts(layout)))
        heads = {} if ulysses is None else {
            "heads": ulysses.heads(q.shape[2] * ulysses.size), "total_heads": q.shape[2] * ulysses.size
        }
        clustering = cluster_heads(q_in, k_in, layout, *counts, config.kmeans_iters, config.seed, **heads)
        if "fine_clusters" in needed:
            fine = split_key_clusters(clustering, k_in, layout, config.kmeans_iters)
            orders["fine_clusters"] = fine.orders(layout)
            starts["fine_clusters"] = tuple(s.to(q.device) for s in fine.block_starts(layout, blocks))
        orders["semantic"] = clustering.orders(layout)
        if "clusters" in needed:
            orders["clusters"] = orders["semantic"]
            starts["clusters"] = tuple(s.to(q.device) for s in clustering.block_starts(layout, blocks))
    measured = measure_block_masses(
        q, k, layout, blocks, {n: o for n, o in orders.items() if n in _mass_orders(families, config)}, config.backend,
        config.mass_rows, config.seed, starts,
    )
    masses = {name: _batch_mean(mass, share_batch) for name, mass in measured.items()}
    rows = None
    if v is not None and config.pattern == "auto":
        rows = RowSample.of(q, k, v, layout, config.error_rows, config.seed)
    elif config.pattern == "svg1":
        rows = RowSample.of(q, k, v, layout, SVG1_PROFILE_ROWS, config.seed, within=SVG1_PROFILE_FIRST_TOKENS)
    batch = 1 if share_batch else q.shape[0]
    return Calibration(
        layout, blocks, tile, batch, q.shape[2], orders, masses, clustering, time.perf_counter() - start, rows, ulysses,
        starts, fine,
    )


def plan_from_calibration(
    calibration: Calibration, config: SparseAttentionConfig
) -> tuple[BlockSparsePlan, PlanReport]:
    """Turn a calibration into a plan for ``config``'s pattern and budget (same block size)."""
    start = time.perf_counter()
    layout, blocks = calibration.layout, calibration.block_size
    if config.block_sizes != blocks:
        raise ValueError(f"the calibration was measured with blocks {blocks}, the config asks for {config.block_sizes}")
    if config.pattern == "dense":
        return _dense_plan(calibration, start)
    families = FAMILIES if config.pattern == "auto" else (config.pattern,)
    missing = sorted(_mass_orders(families, config) - set(calibration.masses))
    if missing:
        raise ValueError(
            f"this calibration has no block mass over the {', '.join(missing)} order; calibrate with pattern={config.pattern!r}, "
            "or with pattern='auto' and min_recall=0.0 to measure every family's"
        )
    missing = sorted({name for family in families for name in _family_orders(family, config)} - set(calibration.orders))
    if missing:
        raise ValueError(
            f"this calibration has no {', '.join(missing)} order; calibrate with the config you plan with "
            f"(split_key_clusters={config.split_key_clusters})"
        )
    budget = Budget.from_config(config)
    if config.pattern in PEERS:
        return _plan_peer(calibration, config, budget, start)
    if config.chooses_by_error:
        if calibration.rows is None:
            raise ValueError("this calibration sampled no rows for the error estimate; calibrate with pattern='auto' and v=...")
        return _plan_by_error(calibration, config, budget, start)
    best = BestPerHead(budget, layout, blocks)
    candidates = [c for family in families for c in _candidates(family, calibration, [budget], config)[0]]
    for candidate in candidates:
        best.offer_scores(*_recall_and_density(calibration, candidate))
    chosen = [[candidates[i] for i in row] for row in best.index.tolist()]
    kept = best.recall
    family = [[c.family for c in row] for row in chosen]
    dense = torch.zeros_like(kept, dtype=torch.bool)
    if config.pattern == "auto" and config.min_recall is not None:
        dense = kept < config.min_recall
        kept = torch.where(dense, 1.0, kept)
        family = [[name if not d else "dense" for name, d in zip(names, row)] for names, row in zip(family, dense.tolist())]
    plan = _assemble(calibration, candidates, best.index, dense)
    seconds = calibration.seconds + time.perf_counter() - start
    return plan, PlanReport(family, kept, plan.density(per_head=True), seconds)


def _recall_and_density(calibration: Calibration, candidate: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H]`` recall of a candidate on the block mass over its order, and its video density."""
    starts = calibration.starts.get(candidate.orders)
    kept = recall(calibration.masses[candidate.orders], candidate.mask, calibration.layout, calibration.block_size[0], starts)
    return kept, _density(calibration, candidate).expand_as(kept)


def _density(calibration: Calibration, candidate: Candidate) -> torch.Tensor:
    """``[B|1, H]`` video density of a candidate (over its order's variable blocks, if any)."""
    starts = calibration.starts.get(candidate.orders)
    return video_density(candidate.mask, calibration.layout, calibration.block_size, starts).float()


def _assemble(
    calibration: Calibration, candidates: list[Candidate], index: torch.Tensor, dense: torch.Tensor
) -> BlockSparsePlan:
    """The plan of each head's chosen candidate (``index``, ``[B, H]``), ``dense`` heads whole. When
    any head's candidate is over variable blocks, every head gets explicit block boundaries on one
    block count (fixed blocks followed by empty ones)."""
    layout, blocks = calibration.layout, calibration.block_size
    chosen = [[candidates[i] for i in row] for row in index.tolist()]
    q_order, kv_order = _orders(calibration, [[c.orders for c in row] for row in chosen])
    n_q = max(c.mask.shape[-2] for row in chosen for c in row)
    n_k = max(c.mask.shape[-1] for row in chosen for c in row)
    masks, bounds = [], {0: [], 1: []}
    for b, row in enumerate(chosen):
        for h, candidate in enumerate(row):
            mask = candidate.mask[min(b, candidate.mask.shape[0] - 1), min(h, candidate.mask.shape[1] - 1)]
            masks.append(torch.nn.functional.pad(mask, (0, n_k - mask.shape[1], 0, n_q - mask.shape[0])))
            starts = calibration.starts.get(candidate.orders, (None, None))
            for which, n in ((0, n_q), (1, n_k)):
                own = block_bounds(starts[which], layout, blocks[which], mask.device)
                own = own[min(b, own.shape[0] - 1), min(h, own.shape[1] - 1)]
                bounds[which].append(torch.nn.functional.pad(own, (0, n + 1 - own.shape[0]), value=layout.seq_len))
    shape = index.shape
    mask = torch.stack(masks).view(*shape, n_q, n_k) | dense[..., None, None]
    variable = any(c.orders in calibration.starts for row in chosen for c in row)
    q_starts, kv_starts = (torch.stack(bounds[w]).view(*shape, -1) if variable else None for w in (0, 1))
    return BlockSparsePlan.from_block_mask(
        mask, layout, blocks, q_order=q_order, kv_order=kv_order, q_starts=q_starts, kv_starts=kv_starts
    )


def _plan_by_error(
    calibration: Calibration, config: SparseAttentionConfig, budget: Budget, start: float
) -> tuple[BlockSparsePlan, PlanReport]:
    """``auto`` by estimated output error: each head's best candidate at the budget, then the fallback."""
    layout, blocks = calibration.layout, calibration.block_size
    target = target_density(budget, layout, blocks[1])
    level_budgets = [budget] + [Budget(density=target * f) for f in FALLBACK_LEVELS if target * f < 1]
    # without the widened radial band: chosen by this estimate on the reference model, it lowered the
    # main command's PSNR from 36.17 to 35.43 dB (docs/families.md)
    per_family = [_candidates(family, calibration, level_budgets, config, neighbours=(False,)) for family in FAMILIES]
    levels = [[c for family in per_family for c in family[i]] for i in range(len(level_budgets))]
    per_level = len(levels[0])
    candidates = [c for level in levels for c in level]
    errors, kept = estimate_errors_and_recall(
        calibration.rows, blocks, calibration.orders, candidates, calibration.batch_size, calibration.starts
    )
    density = torch.stack([_density(calibration, c).expand(errors.shape[1:]) for c in candidates])
    # per level, the candidate with the lowest error among those within the level's density (else the sparsest)
    limits = torch.tensor([target] + [level.density for level in level_budgets[1:]], device=density.device)
    by_level = (len(levels), per_level, *density.shape[1:])
    fits = density.view(by_level) <= limits[:, None, None, None] + 1e-6
    score = torch.where(fits, 10 - errors.view(by_level), -density.view(by_level))
    pick = score.argmax(1) + torch.arange(len(levels), device=score.device)[:, None, None] * per_level   # [L, B, H]
    # the allowance counts from the requested density when there is one (the budget's block count
    # may round it up), so that the fallback never takes the spend past (1 + share) x the request
    level = _fallback_over_layer(
        calibration.ulysses, errors.gather(0, pick), density.gather(0, pick), config.max_error,
        (1 + config.fallback_share) * (budget.density if budget.density is not None else target),
    )
    dense = level == len(levels)
    index = pick.gather(0, level.clamp(max=len(levels) - 1)[None])[0]                                   # [B, H]
    chosen = [[candidates[i] for i in row] for row in index.tolist()]
    family = [["dense" if d else c.family for c, d in zip(row, dense_row)] for row, dense_row in zip(chosen, dense.tolist())]
    plan = _assemble(calibration, candidates, index, dense)
    kept = torch.where(dense, 1.0, kept.gather(0, index[None])[0])
    error = torch.where(dense, 0.0, errors.gather(0, index[None])[0])
    seconds = calibration.seconds + time.perf_counter() - start
    return plan, PlanReport(family, kept, plan.density(per_head=True), seconds, error)


def _plan_peer(
    calibration: Calibration, config: SparseAttentionConfig, budget: Budget, start: float
) -> tuple[BlockSparsePlan, PlanReport]:
    """A peer's own rule (``radial_paper``, ``svg1``, ``svg2``) for every head."""
    layout, blocks = calibration.layout, calibration.block_size
    shape = (calibration.batch_size, calibration.num_heads)
    if config.pattern == "radial_paper":
        names = "raster"
        mask = radial_paper_block_mask(layout, blocks[1], config.radial_decay).to(calibration.tile_order.device)
    elif config.pattern == "svg2":
        names = "semantic"
        mask = svg2_block_mask(calibration.clustering, layout, blocks, budget)
    else:  # svg1: per head the order (spatial: raster, temporal: position-major) whose profiling mask errs less
        profile = svg1_profile_mask(layout, blocks).to(calibration.tile_order.device)
        errors = estimate_errors(
            calibration.rows, blocks, calibration.orders,
            [Candidate(profile[None, None].expand(1, shape[1], -1, -1), name) for name in ("raster", "position")],
            calibration.batch_size,
        )
        temporal = errors[1] < errors[0]
        names = [["position" if t else "raster" for t in row] for row in temporal.tolist()]
        mask = svg1_block_mask(layout, blocks, config.density).to(temporal.device)
    mask = mask.expand(*shape, *mask.shape[-2:])
    names = [[names] * shape[1] for _ in range(shape[0])] if isinstance(names, str) else names
    per_order = {n: recall(calibration.masses[n], mask, layout, blocks[0]) for row in names for n in row}
    kept = torch.stack([torch.stack([per_order[n][b, h] for h, n in enumerate(row)]) for b, row in enumerate(names)])
    q_order, kv_order = _orders(calibration, names)
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=q_order, kv_order=kv_order)
    family = [[config.pattern] * shape[1] for _ in range(shape[0])]
    return plan, PlanReport(family, kept, plan.density(per_head=True), calibration.seconds + time.perf_counter() - start)


def _fallback_over_layer(
    ulysses: UlyssesGroup | None, errors: torch.Tensor, density: torch.Tensor, max_error: float, allowed_per_head: float
) -> torch.Tensor:
    """:func:`_fallback` over every head of the layer, those of the other Ulysses ranks included (their
    pool is shared): this rank's ``[B, H/P]`` share of the levels."""
    if ulysses is None:
        return _fallback(errors, density, max_error, allowed_per_head)
    heads = ulysses.heads(errors.shape[-1] * ulysses.size)
    level = _fallback(ulysses.gather(errors, -1), ulysses.gather(density, -1), max_error, allowed_per_head)
    return level[..., heads.start : heads.stop]


def _fallback(errors: torch.Tensor, density: torch.Tensor, max_error: float, allowed_per_head: float) -> torch.Tensor:
    """``[B, H]`` the level each head gets (0 the budget's, ``L`` dense), from ``[L, B, H]`` errors and
    video densities of each level's choice.

    The call's heads share one pool: ``allowed_per_head`` times the heads, less what the level-0
    choices spend (so masks that under-spend the budget leave it to the fallback). Heads whose error
    exceeds ``max_error`` are served worst first: each takes the cheapest option that brings it
    within ``max_error``, else the one with the lowest error, among those the pool still affords.

    Example::

        >>> errors = torch.tensor([[[0.3, 0.02]], [[0.04, 0.01]]])       # levels x batch x heads
        >>> density = torch.tensor([[[0.1, 0.1]], [[0.2, 0.2]]])
        >>> _fallback(errors, density, max_error=0.05, allowed_per_head=0.15).tolist()
        [[1, 0]]
    """
    levels = errors.shape[0]
    options_error = torch.cat([errors, torch.zeros_like(errors[:1])]).flatten(1).tolist()
    options_density = torch.cat([density, torch.ones_like(density[:1])]).flatten(1).tolist()
    choice = [0] * len(options_error[0])
    pool = allowed_per_head * len(choice) - sum(options_density[0])
    for head in sorted(range(len(choice)), key=lambda h: -options_error[0][h]):
        now_error = options_error[0][head]
        if now_error <= max_error:
            break
        affordable = [
            level for level in range(1, levels + 1)
            if options_density[level][head] - options_density[0][head] <= pool + 1e-6 and options_error[level][head] < now_error
        ]
        if not affordable:
            continue
        within = [level for level in affordable if options_error[level][head] <= max_error]
        best = min(within, key=lambda lv: options_density[lv][head]) if within else min(affordable, key=lambda lv: options_error[lv][head])
        pool -= options_density[best][head] - options_density[0][head]
        choice[head] = best
    return torch.tensor(choice, device=errors.device).view(errors.shape[1:])


def _candidates(
    family: str, calibration: Calibration, budgets: list[Budget], config: SparseAttentionConfig,
    neighbours: tuple[bool, ...] = (False, True),
) -> list[list[Candidate]]:
    """One family's masks at each of ``budgets``: per budget, one per token order the family uses
    (the radial raster band once per ``neighbours``, see :func:`fit_radial_band`), each fitted per head
    on the block mass over that order."""
    layout, blocks, tile, masses = calibration.layout, calibration.block_size, calibration.tile, calibration.masses
    out: list[list[Candidate]] = [[] for _ in budgets]
    for order in _family_orders(family, config):
        mass = masses.get(order)
        if family == "radial" and order == "tile":
            variants = [[fit.mask for fit in fit_radial(mass, layout, tile, blocks, budgets)]]
        elif family == "radial":
            bands = neighbours if layout.grid[0] > 1 else (False,)
            variants = [[fit.mask for fit in fit_radial_band(mass, layout, blocks, budgets, wide)] for wide in bands]
        elif family == "spatiotemporal":
            fits = fit_spatiotemporal(mass, layout, tile, blocks, budgets) if order == "tile" else fit_band(mass, layout, blocks, budgets)
            variants = [[fit.mask for fit in fits]]
        elif family == "semantic":
            # a count budget in keys: the video density a fixed-block family's budget allows, so that
            # every family spends alike
            keys = [b if b.is_mass else Budget(density=target_density(b, layout, blocks[1])) for b in budgets]
            clustering = calibration.fine_clustering if order == "fine_clusters" else calibration.clustering
            variants = [semantic_block_masks(clustering, layout, blocks, keys, starts=calibration.starts[order])]
        else:
            variants = [[adaptive_block_mask(mass, layout, blocks, b) for b in budgets]]
        for masks in variants:
            for per_budget, mask in zip(out, masks, strict=True):
                per_budget.append(Candidate(mask.expand(calibration.batch_size, calibration.num_heads, -1, -1), order, family))
    return out


def _family_orders(family: str, config: SparseAttentionConfig) -> tuple[str, ...]:
    """The token orders of ``family``'s variants under ``config``."""
    return tuple(o for o in FAMILY_ORDERS[family] if config.split_key_clusters or o != "fine_clusters")


def _mass_orders(families: tuple[str, ...], config: SparseAttentionConfig) -> set[str]:
    """The orders whose block mass planning ``families`` under ``config`` reads."""
    orders = {name for family in families for name in _family_orders(family, config)}
    return orders - set(CLUSTER_ORDERS) if config.chooses_by_error else orders


def _orders(calibration: Calibration, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, S]`` query and key orders: each head's from the named order it was planned over."""
    batch, heads = len(names), len(names[0])
    picked = []
    for which in (0, 1):
        out = calibration.tile_order.expand(batch, heads, -1).clone()
        for name, pair in calibration.orders.items():
            chosen = torch.tensor([[n == name for n in row] for row in names], device=out.device)
            if chosen.any():
                out = torch.where(chosen[..., None], pair[which].expand_as(out), out)
        picked.append(out)
    return picked[0], picked[1]


def _dense_plan(calibration: Calibration, start: float) -> tuple[BlockSparsePlan, PlanReport]:
    layout, (bq, bk) = calibration.layout, calibration.block_size
    batch, heads = calibration.batch_size, calibration.num_heads
    mask = torch.ones(batch, heads, layout.num_blocks(bq), layout.num_blocks(bk), dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask.to(calibration.tile_order.device), layout, (bq, bk))
    report = PlanReport([["dense"] * heads for _ in range(batch)], torch.ones(batch, heads), plan.density(per_head=True),
                        calibration.seconds + time.perf_counter() - start)
    return plan, report


def _batch_mean(mass: torch.Tensor, share_batch: bool) -> torch.Tensor:
    return mass.mean(0, keepdim=True) if share_batch else mass


def _check_inputs(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must share one (B, S, H, D) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != layout.seq_len:
        raise ValueError(
            f"q has {q.shape[1]} tokens but the layout (grid {layout.grid} + {layout.text_len} text) has "
            f"{layout.seq_len}; pass the layout of this attention call"
        )
