"""Which prompt words a reference model uses: its flow-matching loss on held-out clips with the true
prompt, against the same prompt with one word class swapped (the first object's motion, shape or
colour, or the background) and against an empty prompt, at the same noise and noise levels. A swap
that leaves the loss where it was is a word the model does not use.

    python -m dit_sparse.eval.reference.conditioning                                # the shipped model
    python -m dit_sparse.eval.reference.conditioning --model reference-train/model --clips 8

Clips are rendered at the transformer's training size (64x64, 29 frames), encoded by the folder's
own VAE and normalised as training normalised them.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import reference_call_kwargs, reference_model_dir
from .clips import BACKGROUNDS, COLOURS, HELDOUT_SEED_START, MOTIONS, SHAPES, ClipSpec, clip_spec, render_clip
from .train import CLIP_FRAMES, SMALL_SIDE, to_model_range

SWAPS = ("motion", "shape", "colour", "background")


def swapped_prompts(spec: ClipSpec, rng: random.Random) -> dict[str, str]:
    """The clip's prompt (``"true"``), the prompt with each word class of :data:`SWAPS` changed to
    another value drawn by ``rng``, and ``"empty"``.

    Example::

        >>> prompts = swapped_prompts(clip_spec(1_000_000), random.Random(0))
        >>> list(prompts), prompts["true"] == clip_spec(1_000_000).prompt
        (['true', 'motion', 'shape', 'colour', 'background', 'empty'], True)
    """
    first, *others = spec.objects
    used_colours = {obj.colour for obj in spec.objects}

    def other(values, current, taken=()):
        return rng.choice([value for value in sorted(values) if value != current and value not in taken])

    with_first = lambda **change: replace(spec, objects=(replace(first, **change), *others)).prompt  # noqa: E731
    return {
        "true": spec.prompt,
        "motion": with_first(motion=other(MOTIONS, first.motion)),
        "shape": with_first(shape=other(SHAPES, first.shape)),
        "colour": with_first(colour=other(COLOURS, first.colour, used_colours)),
        "background": replace(spec, background=other(BACKGROUNDS, spec.background)).prompt,
        "empty": "",
    }


def conditioning_losses(pipe, clips: int = 24, sigmas: tuple[float, ...] = (0.3, 0.6, 0.9), seed: int = 0) -> dict[str, float]:
    """Mean flow-matching loss (target ``noise - latents``) of ``pipe``'s transformer on the first
    ``clips`` held-out clips at each of ``sigmas``, per prompt variant of :func:`swapped_prompts`;
    every variant sees the same noise."""
    vae, transformer = pipe.vae, pipe.transformer
    mean, std = (torch.tensor(getattr(vae.config, name)).view(1, -1, 1, 1, 1) for name in ("latents_mean", "latents_std"))
    max_length = reference_call_kwargs()["max_sequence_length"]
    rng = random.Random(seed)
    totals: dict[str, float] = {}
    with torch.no_grad():
        for clip_seed in tqdm(range(HELDOUT_SEED_START, HELDOUT_SEED_START + clips), desc="clips"):
            spec = clip_spec(clip_seed)
            video = render_clip(spec, CLIP_FRAMES, SMALL_SIDE, SMALL_SIDE)[None]
            latents = (vae.encode(to_model_range(video)).latent_dist.mode() - mean) / std
            prompts = swapped_prompts(spec, rng)
            embeds = pipe.encode_prompt(list(prompts.values()), do_classifier_free_guidance=False,
                                        max_sequence_length=max_length)[0]
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(clip_seed))
            for sigma in sigmas:
                noisy = ((1 - sigma) * latents + sigma * noise).expand(len(prompts), -1, -1, -1, -1)
                timestep = torch.full((len(prompts),), sigma * 1000)
                prediction = transformer(noisy, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
                errors = ((prediction - (noise - latents)) ** 2).mean(dim=(1, 2, 3, 4))
                for name, error in zip(prompts, errors.tolist(), strict=True):
                    totals[name] = totals.get(name, 0.0) + error
    return {name: total / (clips * len(sigmas)) for name, total in totals.items()}


def format_losses(losses: dict[str, float]) -> str:
    """A table of each variant's loss and its change from the true prompt's."""
    lines = ["| prompt | loss | change from the true prompt |", "|---|---|---|"]
    lines += [f"| {name} | {loss:.4f} | {loss - losses['true']:+.4f} |" for name, loss in losses.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit_sparse.eval.reference.conditioning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--clips", type=int, default=24, help="held-out clips (default: 24)")
    args = parser.parse_args(argv)
    if args.clips < 1:
        parser.error(f"--clips must be at least 1, got {args.clips}")
    folder = args.model or reference_model_dir()
    if not (Path(folder) / "model_index.json").exists():
        parser.error(f"--model {folder} is not a pipeline folder (no model_index.json); name the folder the training command wrote")
    from diffusers import WanPipeline

    print(format_losses(conditioning_losses(WanPipeline.from_pretrained(folder), args.clips)))


if __name__ == "__main__":
    main()
