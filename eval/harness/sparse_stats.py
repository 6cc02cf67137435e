"""What a sparse generation did, read from its statistics (``SparseRunStats.to_dict()``): density
of every self-attention layer at every step, attention FLOPs kept and saved, the dense share of the
steps, calibration time, and each head's family, recall and density.

A layer runs sparse at a step when that step made sparse calls and the layer has a plan calibrated at
or before it (the latest one serves); otherwise it ran dense (density 1). Dense FLOPs per call come
from :class:`~dit_sparse.eval.harness.attention_timer.AttentionTimer`; a sparse call keeps ``density`` of them.

Example::

    >>> stats = {"steps": [{"step": 0, "transformer": "transformer", "context": "cond", "sparse": 0},
    ...                    {"step": 1, "transformer": "transformer", "context": "cond", "sparse": 1}],
    ...          "plans": [{"transformer": "transformer", "layer": 1, "context": "cond", "step": 0,
    ...                     "density": [[0.25, 0.5]], "recall": [[0.9, 0.95]], "family": [["radial", "semantic"]],
    ...                     "seconds": 0.5}],
    ...          "calibration_seconds": 0.5}
    >>> summary = summarize_sparse_run(stats, {("transformer", 0): 100, ("transformer", 1): 100})
    >>> summary.density.tolist()
    [[1.0, 1.0], [1.0, 0.375]]
    >>> summary.flops_saved_fraction, summary.dense_steps
    (0.15625, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SHARED_CONTEXT = "shared"


@dataclass
class SparseRunSummary:
    """Attributes:
        steps: step indices, in order (rows of the matrices).
        density: ``[steps, layers]`` fraction of the dense attention FLOPs each layer kept (1 = dense),
            averaged over the transformer calls of that step (CFG contexts).
        dense_flops: ``[steps, layers]`` FLOPs the calls would have cost dense.
        kept_flops: ``[steps, layers]`` FLOPs they cost.
        dense_steps: steps without any sparse call.
        calibration_seconds: calibration and planning time.
        plans: per calibration: transformer, layer, context, step, and per head family, recall and
            density (first batch element).
    """

    steps: list[int]
    density: np.ndarray
    dense_flops: np.ndarray
    kept_flops: np.ndarray
    dense_steps: int
    calibration_seconds: float
    plans: list[dict[str, Any]]

    @property
    def flops_saved_fraction(self) -> float:
        """Share of the whole generation's self-attention FLOPs saved (dense steps included)."""
        return float(1.0 - self.kept_flops.sum() / self.dense_flops.sum())

    @property
    def mean_sparse_density(self) -> float | None:
        """Density over the sparse calls only (``None`` when none ran sparse)."""
        sparse = self.density < 1.0
        return float((self.kept_flops[sparse].sum()) / self.dense_flops[sparse].sum()) if sparse.any() else None

    @property
    def flops_saved(self) -> np.ndarray:
        """``[steps, layers]`` FLOPs saved."""
        return self.dense_flops - self.kept_flops


def summarize_sparse_run(stats: dict[str, Any], flops_per_call: dict[tuple[str, int], int]) -> SparseRunSummary:
    """Summarise one generation's ``stats``; ``flops_per_call`` gives each ``(transformer, layer)``'s
    dense FLOPs per call and so the layers to account for."""
    layers = 1 + max(layer for _, layer in flops_per_call)
    steps = sorted({record["step"] for record in stats["steps"]})
    row_of = {step: row for row, step in enumerate(steps)}
    dense_flops = np.zeros((len(steps), layers))
    kept_flops = np.zeros((len(steps), layers))
    for record in stats["steps"]:
        transformer, row = record["transformer"], row_of[record["step"]]
        for layer in range(layers):
            flops = flops_per_call.get((transformer, layer), 0)
            plan = _serving_plan(stats["plans"], record, layer) if record["sparse"] else None
            dense_flops[row, layer] += flops
            kept_flops[row, layer] += flops * (1.0 if plan is None else _mean_density(plan))
    density = np.divide(kept_flops, dense_flops, out=np.ones_like(kept_flops), where=dense_flops > 0)
    sparse_steps = {record["step"] for record in stats["steps"] if record["sparse"]}
    plans = [{key: plan[key] for key in ("transformer", "layer", "context", "step")}
             | {"family": plan["family"][0], "recall": plan["recall"][0], "density": plan["density"][0]}
             for plan in stats["plans"]]
    return SparseRunSummary(steps, density, dense_flops, kept_flops, len(steps) - len(sparse_steps),
                            float(stats["calibration_seconds"]), plans)


def _serving_plan(plans: list[dict[str, Any]], record: dict[str, Any], layer: int) -> dict[str, Any] | None:
    candidates = [plan for plan in plans
                  if plan["transformer"] == record["transformer"] and plan["layer"] == layer
                  and plan["context"] in (record["context"], SHARED_CONTEXT) and plan["step"] <= record["step"]]
    return max(candidates, key=lambda plan: plan["step"], default=None)


def _mean_density(plan: dict[str, Any]) -> float:
    return float(np.mean(plan["density"]))
