"""The reference model: a small text-to-video Wan pipeline trained by the project on procedural
clips, shipped in the package, and the eval's and the demo's default.

It loads with the stock ``WanPipeline.from_pretrained`` and takes plain-English prompts built from
its vocabulary (colours, shapes, motions, backgrounds)::

    >>> import torch
    >>> from diffusers import WanPipeline
    >>> pipe = WanPipeline.from_pretrained(reference_model_dir())
    >>> kwargs = reference_call_kwargs()
    >>> kwargs
    {'num_frames': 29, 'height': 128, 'width': 128, 'num_inference_steps': 16, 'guidance_scale': 1.0, 'max_sequence_length': 32}
    >>> video = pipe(prompt="a red circle moving left on a black background", output_type="np",
    ...              generator=torch.Generator().manual_seed(0), **kwargs).frames[0]   # doctest: +SKIP
    >>> video.shape                                                                     # doctest: +SKIP
    (29, 128, 128, 3)

Training: :mod:`dit_sparse.eval.reference.train`; the detector that reads colour, shape and motion
back from frames: :mod:`dit_sparse.eval.reference.detector`; which prompt words a trained model
uses: :mod:`dit_sparse.eval.reference.conditioning`; docs/reference-model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clips import HELDOUT_SEED_START, clip_spec
from .components import ReferenceSizes
from .vocabulary import unknown_words, vocabulary

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


def reference_weights_id(folder: str | Path | None = None) -> str:
    """A short fingerprint of a pipeline folder's weights (the shipped one by default): the SHA-256
    of its ``*.safetensors`` files, their paths and bytes, first 12 hex digits. The fidelity study's
    results record it, so that runs on different weights are never merged into one page.

    Example::

        >>> len(reference_weights_id())
        12
    """
    import hashlib

    folder = Path(folder) if folder is not None else reference_model_dir()
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def runs_as_reference(model: str | Path | None) -> bool:
    """Whether the eval runs ``model`` as the reference model (its held-out prompts, call settings and
    detector): ``None`` (the shipped folder), or a pipeline folder the training command wrote (it
    holds ``model_index.json`` and ``training.json``, as the shipped one does).

    Example::

        >>> [runs_as_reference(m) for m in (None, reference_model_dir(), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")]
        [True, True, False]
    """
    return model is None or all((Path(model) / name).is_file() for name in ("model_index.json", "training.json"))


def reference_call_kwargs() -> dict[str, Any]:
    """The default generation settings to pass to the reference pipeline: Wan's own call defaults
    are 480p sizes and 512 text tokens, while the model was trained on 29 frames of 128x128 and
    prompts padded to 32 tokens."""
    sizes = ReferenceSizes()
    return {"num_frames": sizes.frames, "height": sizes.height, "width": sizes.width,
            "num_inference_steps": sizes.steps, "guidance_scale": sizes.guidance_scale,
            "max_sequence_length": sizes.max_sequence_length}


def heldout_prompts(count: int) -> list[tuple[int, str]]:
    """``count`` held-out ``(seed, prompt)`` pairs: the seed draws the clip the prompt describes
    and is the generation seed too.

    Example::

        >>> heldout_prompts(1)
        [(1000000, 'a blue circle moving up on a black background')]
    """
    return [(seed, clip_spec(seed).prompt) for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + count)]


def prompt_choices(examples: int = 8) -> list[str]:
    """Prompts to offer in a menu: the first ``examples`` held-out prompts, then every one-object
    combination of colour, shape, motion and background, each once.

    Example::

        >>> choices = prompt_choices()
        >>> len(choices), choices[0]
        (435, 'a blue circle moving up on a black background')
    """
    from .clips import BACKGROUNDS, COLOURS, MOTION_WORDS, SHAPES

    singles = [f"a {colour} {shape} {motion} on a {background} background"
               for background in BACKGROUNDS for colour in COLOURS for shape in SHAPES for motion in MOTION_WORDS.values()]
    return list(dict.fromkeys([prompt for _, prompt in heldout_prompts(examples)] + singles))


__all__ = ["REFERENCE_MODEL_NAME", "heldout_prompts", "prompt_choices", "reference_call_kwargs", "reference_model_dir",
           "reference_weights_id", "runs_as_reference", "unknown_words", "vocabulary"]
