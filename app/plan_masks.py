"""The block masks of one sparse generation's plans, by layer, and their picture for a chosen layer
and head: kept after the generation, so another layer or head is drawn without generating again.

Example::

    >>> import numpy as np
    >>> masks = PlanMasks.from_run(
    ...     {("transformer", 1, "cond"): np.eye(4, dtype=bool)[None].repeat(2, axis=0)},
    ...     [{"transformer": "transformer", "layer": 1, "context": "cond", "step": 1,
    ...       "family": ["adaptive", "adaptive"], "recall": [0.9, 0.8], "density": [0.25, 0.25]}],
    ...     "adaptive, density 0.25", {("transformer", 1): "transformer.blocks.1.attn1"})
    >>> masks.layers, masks.num_heads("layer 1"), masks.modules["layer 1"]
    (['layer 1'], 2, 'blocks.1.attn1')
    >>> figure = masks.figure("layer 1", head=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dit_sparse.eval.plots import mask_figure

PlanKey = tuple[str, int, str]  # (transformer, layer, context)


@dataclass(frozen=True)
class PlanMasks:
    """Attributes:
        config_label: the sparse configuration the plans were made under.
        masks: per layer label (``"layer 2"``, with the transformer and CFG context when a run has
            several), the ``[H, nQ, nK]`` block mask in the plan's token order.
        notes: per layer label, each head's family and recall at calibration.
        modules: per layer label, the self-attention module of that layer (``blocks.2.attn1``).
    """

    config_label: str
    masks: dict[str, np.ndarray]
    notes: dict[str, str]
    modules: dict[str, str]

    @classmethod
    def from_run(cls, block_masks: dict[PlanKey, np.ndarray], plans: list[dict[str, Any]],
                 config_label: str, layer_names: dict[tuple[str, int], str]) -> PlanMasks:
        """From :func:`~dit_sparse.eval.harness.runner.plan_block_masks`, the plan records of
        :func:`~dit_sparse.eval.harness.sparse_stats.summarize_sparse_run` (the latest calibration of a
        layer describes its mask) and each ``(transformer, layer)``'s qualified module name
        (``"transformer.blocks.2.attn1"``, as the model's adapter numbers them)."""
        keys = sorted(block_masks)
        latest = {(plan["transformer"], plan["layer"], plan["context"]): plan
                  for plan in sorted(plans, key=lambda plan: plan["step"])}
        masks, notes, modules = {}, {}, {}
        for key in keys:
            label = _label(key, keys)
            masks[label] = block_masks[key]
            transformer, layer, _ = key
            modules[label] = layer_names[(transformer, layer)].removeprefix(f"{transformer}.")
            plan = latest.get(key)
            if plan is not None:
                heads = ", ".join(f"head {head} {family} (recall {recall:.2f})"
                                  for head, (family, recall) in enumerate(zip(plan["family"], plan["recall"],
                                                                              strict=True)))
                notes[label] = f"calibrated at step {plan['step']}: {heads}"
        return cls(config_label, masks, notes, modules)

    @property
    def layers(self) -> list[str]:
        """Layer labels, in model order."""
        return list(self.masks)

    @property
    def default_layer(self) -> str | None:
        """The middle layer (``None`` when the run made no plans, e.g. ``pattern="dense"``)."""
        return self.layers[len(self.layers) // 2] if self.masks else None

    def num_heads(self, layer: str) -> int:
        return self._mask(layer).shape[0]

    def figure(self, layer: str, head: int | None = None) -> Figure:
        """The block mask of ``layer``'s head ``head`` (``None``: every head)."""
        masks = self._mask(layer)
        if head is not None and not 0 <= head < masks.shape[0]:
            raise ValueError(f"{layer} has heads 0..{masks.shape[0] - 1}; got head {head}")
        title = (f"{self.config_label}: {layer} ({self.modules[layer]}), {self.notes.get(layer, 'loaded plan')} "
                 "(token order of the plan)")
        return mask_figure(masks, title, heads=None if head is None else [head])

    def _mask(self, layer: str) -> np.ndarray:
        if layer not in self.masks:
            known = ", ".join(self.layers) or "none (this run made no plans)"
            raise ValueError(f"no plan for {layer!r}; the layers with plans are: {known}")
        return self.masks[layer]


def _label(key: PlanKey, keys: list[PlanKey]) -> str:
    transformer, layer, context = key
    label = f"layer {layer}"
    if len({k[0] for k in keys}) > 1:
        label = f"{transformer} {label}"
    if len({k[2] for k in keys}) > 1:
        label = f"{label} ({context})"
    return label
