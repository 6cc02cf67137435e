"""The reference model: a small text-to-video Wan pipeline trained by the project on procedural
clips, shipped in the package, and the eval's and the demo's default.

It loads with the stock ``WanPipeline.from_pretrained`` and takes plain-English prompts built from
its vocabulary (colours, shapes, motions, backgrounds)::

    >>> import torch
    >>> from diffusers import WanPipeline
    >>> pipe = WanPipeline.from_pretrained(reference_model_dir())
    >>> kwargs = reference_call_kwargs()
    >>> kwargs
    {'num_frames': 29, 'height': 128, 'width': 128, 'num_inference_steps': 16, 'guidance_scale': 1.0}
    >>> video = pipe(prompt="a red circle moving left on a black background", output_type="np",
    ...              generator=torch.Generator().manual_seed(0), **kwargs).frames[0]   # doctest: +SKIP
    >>> video.shape                                                                     # doctest: +SKIP
    (29, 128, 128, 3)

Training: :mod:`dit_sparse.eval.reference.train`; measurement: :mod:`dit_sparse.eval.reference.measure`;
docs/reference-model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clips import HELDOUT_SEED_START, clip_spec
from .components import ReferenceSizes
from .vocabulary import unknown_words

REFERENCE_MODEL_NAME = "dit-sparse reference Wan (trained, procedural clips)"


def reference_model_dir() -> Path:
    """The shipped pipeline folder (``model_index.json``, ``transformer/``, ``vae/``, ...)."""
    folder = Path(__file__).parent / "model"
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"the reference model folder {folder} is missing; reinstall dit-sparse, or train it with "
            f"python -m dit_sparse.eval.reference.train --work reference-train --out {folder}"
        )
    return folder


def reference_call_kwargs() -> dict[str, Any]:
    """The default generation settings to pass to the reference pipeline (Wan's own call defaults
    are 480p sizes)."""
    sizes = ReferenceSizes()
    return {"num_frames": sizes.frames, "height": sizes.height, "width": sizes.width,
            "num_inference_steps": sizes.steps, "guidance_scale": sizes.guidance_scale}


def heldout_prompts(count: int) -> list[tuple[int, str]]:
    """``count`` held-out ``(seed, prompt)`` pairs: the seed draws the clip the prompt describes
    and is the generation seed too.

    Example::

        >>> heldout_prompts(1)
        [(1000000, 'a yellow circle standing still on a dark blue background')]
    """
    return [(seed, clip_spec(seed).prompt) for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + count)]


__all__ = ["REFERENCE_MODEL_NAME", "heldout_prompts", "reference_call_kwargs", "reference_model_dir",
           "unknown_words"]
