"""Prompt adherence and sparse-vs-dense agreement, read by the detector from generated frames.

Example::

    >>> from dit_sparse.eval.reference.clips import clip_spec, render_clip
    >>> spec = clip_spec(0)
    >>> video = render_clip(spec, frames=29, height=64, width=64).numpy()
    >>> adherence([spec.prompt], [video])["accuracy"]
    {'background': 1.0, 'colour': 1.0, 'shape': 1.0, 'motion': 1.0}
    >>> agreement([video], [video[:, :, ::-1]])["accuracy"]["motion"]    # mirrored: 'up' still reads 'up'
    1.0
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from .detector import Reading, attribute_matches, detect, parse_prompt
from .vocabulary import SPECIAL_TOKENS, unknown_words, vocabulary

ATTRIBUTES = ("background", "colour", "shape", "motion")


def adherence(prompts: list[str], videos: list[np.ndarray]) -> dict[str, Any]:
    """How often the detector reads from ``videos`` what their ``prompts`` ask for: accuracy per
    attribute over the prompts in the clips' phrasing (others are listed as not checked), the
    readings, each prompt's unknown words and the words the model knows."""
    matches: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    per_prompt = []
    for prompt, video in zip(prompts, videos, strict=True):
        wanted, reading = parse_prompt(prompt), detect(video)
        if wanted is not None:
            for name, values in attribute_matches(wanted, reading).items():
                matches[name] += values
        per_prompt.append({"prompt": prompt, "checked": wanted is not None, "reading": asdict(reading),
                           "unknown_words": unknown_words(prompt)})
    return {"accuracy": _accuracy(matches), "checked": sum(p["checked"] for p in per_prompt), "prompts": per_prompt,
            "vocabulary": [word for word in vocabulary() if word not in SPECIAL_TOKENS]}


def agreement(reference: list[np.ndarray], videos: list[np.ndarray]) -> dict[str, Any]:
    """How often the detector reads the same from ``videos`` as from ``reference`` (the dense
    videos of the same prompts and seeds): per attribute, over the reference's objects, and ``all``
    over every check together."""
    matches: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    readings = []
    for dense, sparse in zip(reference, videos, strict=True):
        dense_reading, sparse_reading = detect(dense), detect(sparse)
        for name, values in attribute_matches(dense_reading, sparse_reading).items():
            matches[name] += values
        readings.append(asdict(sparse_reading))
    every = [value for values in matches.values() for value in values]
    return {"accuracy": _accuracy(matches), "all": float(np.mean(every)) if every else None, "readings": readings}


def _accuracy(matches: dict[str, list[bool]]) -> dict[str, float | None]:
    return {name: float(np.mean(values)) if values else None for name, values in matches.items()}


__all__ = ["ATTRIBUTES", "Reading", "adherence", "agreement"]
