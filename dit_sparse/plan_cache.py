"""The plan cache: one plan per (transformer, layer, CFG context, layout geometry), saved to and
loaded from safetensors with JSON metadata that names the model, the layouts and the config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layout import TokenLayout
from .plan import BlockSparsePlan
from .planner import PlanReport

FORMAT = "dit-sparse-plans"
# 1: fixed blocks only. 2: plans may carry variable block boundaries (q_starts, kv_starts).
# Every version up to this one loads.
FORMAT_VERSION = 2

Geometry = tuple[tuple[int, int, int], int, bool]


class PlanKey(NamedTuple):
    """Where a plan serves: a transformer of the pipeline, a self-attention layer of it (in
    module order), a CFG context, and the layout geometry (grid, text length, text side)."""

    transformer: str
    layer: int
    context: str
    geometry: Geometry


@dataclass
class CachedPlan:
    """A plan in the cache.

    Attributes:
        plan: the plan as built or loaded.
        fingerprint: a cheap summary of its contents (equal plans have equal fingerprints).
        density: its density (computed once): under context parallelism, the whole layer's, not
            only this rank's heads'.
        rank_density: the mean density of each Ulysses rank's heads, in rank order (one entry
            without context parallelism).
        head_order: under Ulysses with balanced heads, the order of the layer's heads whose
            consecutive slices the ranks hold (``None``: the natural order).
        report: the planner's report (``None`` for a loaded plan).
        generation: the generation that calibrated it; ``None`` for a loaded plan, which serves
            every generation and is never recalibrated.
        step: the step that calibrated it.
    """

    plan: BlockSparsePlan
    fingerprint: tuple
    density: float
    rank_density: list[float]
    report: PlanReport | None = None
    generation: int | None = None
    step: int | None = None
    head_order: torch.Tensor | None = None
    _ready: BlockSparsePlan | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.generation is None

    def plan_for(self, layout: TokenLayout) -> BlockSparsePlan:
        """The plan for ``layout`` (same geometry, possibly other text padding); the result is kept,
        so a steady run reuses one plan object and its gather indices."""
        ready = self._ready
        if ready is None or ready.layout != layout:
            ready = self._ready = self.plan.with_layout(layout)
        return ready


class PlanCache:
    """Plans by :class:`PlanKey`. Identical plans (a static pattern shared by many layers) are
    stored once and shared, not copied.

    Example::

        >>> from dit_sparse import SparseAttentionConfig, TokenLayout
        >>> from dit_sparse.planner import build_plan
        >>> layout = TokenLayout((2, 8, 8))
        >>> q = k = torch.randn(1, 128, 2, 16)
        >>> plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="adaptive", block_size=32))
        >>> cache = PlanCache()
        >>> key = PlanKey("transformer", 3, "cond", layout.geometry)
        >>> cache.put(key, plan, report, generation=0, step=4).plan is plan
        True
    """

    def __init__(self) -> None:
        self._entries: dict[PlanKey, CachedPlan] = {}

    def get(self, key: PlanKey) -> CachedPlan | None:
        return self._entries.get(key)

    def put(
        self,
        key: PlanKey,
        plan: BlockSparsePlan,
        report: PlanReport | None,
        generation: int | None,
        step: int | None,
        rank_density: list[float] | None = None,
        head_order: torch.Tensor | None = None,
    ) -> CachedPlan:
        """Store ``plan`` under ``key`` (replacing what was there), sharing an identical stored plan.
        ``rank_density``, ``head_order``: when ``plan`` is one Ulysses rank's heads, the density of
        every rank's and the order of the heads the ranks hold slices of."""
        fingerprint = _fingerprint(plan)
        for stored in self._entries.values():
            if stored.fingerprint == fingerprint and _equal_plans(stored.plan, plan):
                plan = stored.plan
                break
        rank_density = rank_density or [plan.density()]
        density = sum(rank_density) / len(rank_density)
        entry = CachedPlan(plan, fingerprint, density, rank_density, report, generation, step, head_order=head_order)
        self._entries[key] = entry
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def to(self, device: torch.device | str) -> None:
        """Move every plan to ``device`` (loaded plans start on the CPU), keeping shared plans shared."""
        moved: dict[int, BlockSparsePlan] = {}
        for entry in self._entries.values():
            if id(entry.plan) not in moved:
                moved[id(entry.plan)] = entry.plan.to(device)
            entry.plan, entry._ready = moved[id(entry.plan)], None
            if entry.head_order is not None:
                entry.head_order = entry.head_order.to(device)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[PlanKey, CachedPlan]]:
        return list(self._entries.items())

    def geometries(self, loaded_only: bool = False) -> set[Geometry]:
        """Layout geometries that have plans (only loaded ones with ``loaded_only``)."""
        return {key.geometry for key, entry in self._entries.items() if entry.loaded or not loaded_only}

    def unique_plans(self) -> int:
        """How many distinct plan objects the cache holds."""
        return len({id(entry.plan) for entry in self._entries.values()})

    # ----------------------------------------------------------------- files

    def save(self, path: str | Path, model: dict[str, Any], config: dict[str, Any]) -> None:
        """Write every plan to a safetensors file; ``model`` and ``config`` describe what they are for
        and are checked by :meth:`load`."""
        if not self._entries:
            raise ValueError("there are no plans to save: run the pipeline once (past the calibration step) first")
        tensors: dict[str, torch.Tensor] = {}
        names: dict[tuple, str] = {}
        plans: list[dict[str, Any]] = []
        index: dict[int, int] = {}
        entries = []
        for key, entry in self._entries.items():
            plan = entry.plan
            if id(plan) not in index:
                index[id(plan)] = len(plans)
                plans.append(_plan_record(plan, tensors, names))
            entries.append({
                "transformer": key.transformer,
                "layer": key.layer,
                "context": key.context,
                "layout": {"grid": list(key.geometry[0]), "text_len": key.geometry[1], "text_first": key.geometry[2]},
                "plan": index[id(plan)],
            })
        header = {"format": FORMAT, "version": FORMAT_VERSION, "model": model, "config": config,
                  "plans": plans, "entries": entries}
        save_file(tensors, str(path), metadata={"dit_sparse": json.dumps(header)})

    def load(self, path: str | Path, model: dict[str, Any], config: dict[str, Any]) -> int:
        """Add the plans of a file written by :meth:`save` as loaded plans; returns how many.

        Raises ``ValueError`` naming what differs when the file is for another model or config.
        """
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("dit_sparse", "null") or "null")
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a dit-sparse plan file (no 'dit_sparse' metadata)")
            version = header.get("version")
            if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
                raise ValueError(
                    f"{path} is a plan file of format version {version!r}; this dit-sparse reads versions 1 to "
                    f"{FORMAT_VERSION}: upgrade dit-sparse or calibrate anew"
                )
            _check_same(f"{path} holds plans for another model", header["model"], model)
            _check_same(f"{path} holds plans made with another config", header["config"], config)
            stored = {name: f.get_tensor(name) for name in f.keys()}
        plans = [{role: stored[name] for role, name in record["tensors"].items()} for record in header["plans"]]
        built: dict[int, BlockSparsePlan] = {}
        for item in header["entries"]:
            saved = item["layout"]
            layout = TokenLayout(tuple(saved["grid"]), saved["text_len"], saved["text_first"])
            number = item["plan"]
            if number not in built:
                block_size = tuple(header["plans"][number]["block_size"])
                built[number] = BlockSparsePlan.from_tensors(plans[number], layout, block_size)
            key = PlanKey(item["transformer"], item["layer"], item["context"], layout.geometry)
            self.put(key, built[number], None, generation=None, step=None)
        return len(header["entries"])


def _plan_record(plan: BlockSparsePlan, tensors: dict[str, torch.Tensor], names: dict[tuple, str]) -> dict[str, Any]:
    """Add ``plan``'s tensors to ``tensors`` (one copy of each distinct tensor, e.g. one order shared
    by queries and keys) and describe the plan by the names of its tensors."""
    roles = {}
    for role, tensor in plan.tensors().items():
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity not in names:
            names[identity] = f"t{len(names)}"
            tensors[names[identity]] = tensor.detach().to("cpu", copy=True).contiguous()
        roles[role] = names[identity]
    return {"block_size": [plan.block_size_q, plan.block_size_k], "tensors": roles}


def _fingerprint(plan: BlockSparsePlan) -> tuple:
    weights = torch.arange(plan.kv_indices.numel(), device=plan.device, dtype=torch.int64) % 65521 + 1
    checksum = int((plan.kv_indices.long() * weights).sum()) if plan.kv_indices.numel() else 0
    return (
        plan.layout.geometry, plan.block_size_q, plan.block_size_k, tuple(plan.kv_counts.shape),
        plan.kv_indices.numel(), checksum, plan.q_order is None, plan.kv_order is None,
        plan.q_starts is None, plan.kv_starts is None,
    )


def _equal_plans(a: BlockSparsePlan, b: BlockSparsePlan) -> bool:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return x.shape == y.shape and bool(torch.equal(x, y.to(x.device)))

    names = ("kv_counts", "kv_indices", "q_order", "kv_order", "q_starts", "kv_starts")
    return all(same(getattr(a, name), getattr(b, name)) for name in names)


def _check_same(problem: str, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    differences = [
        f"{name}: file {stored.get(name)!r}, here {expected.get(name)!r}"
        for name in sorted(set(stored) | set(expected))
        if stored.get(name) != expected.get(name)
    ]
    if differences:
        raise ValueError(f"{problem} ({'; '.join(differences)}); calibrate anew or load a file made for this setup")
