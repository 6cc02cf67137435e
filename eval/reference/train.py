"""Train the reference model from scratch and write it as a diffusers pipeline folder.

    python -m dit_sparse.eval.reference.train --work reference-train --out eval/reference/model \\
        --plot docs/img/reference_training.png

Stages, each seeded, checkpointed every ``--checkpoint-every`` steps and resumed from its last
checkpoint when the command runs again (a finished stage is skipped):

1. ``vae`` and ``vae_long``: the ``AutoencoderKLWan`` on 32x32 windows of clips rendered at 128x128
   and 64x64, 9 frames long and then as long as the default video, decoding the posterior mean (the transformer is trained on means too), L1 + MSE
   with a small KL term; then its reconstruction PSNR on held-out clips.
2. ``latents``: the VAE encodes ``--latent-clips`` 29-frame 64x64 training clips once; per-channel
   mean and standard deviation become the VAE's ``latents_mean`` / ``latents_std``.
3. ``transformer``: the ``WanTransformer3DModel`` and the ``UMT5EncoderModel`` together, by flow
   matching on those latents (1,024 tokens per 13-frame clip), with prompt dropout so that CFG works;
   ``--object-weight W`` weights the squared error of latent positions an object covers by
   ``1 + W`` (default 0: the plain loss the shipped weights were trained with). It trains on the
   latents of each clip's first ``--clip-frames`` frames (13: cheaper steps, the clip's own speed);
   then ``--long-steps`` steps on the whole 29-frame clips, the stage ``transformer_long``.
4. ``finetune``: the same at the default size (29 frames of 128x128, 8,192 tokens), clips rendered
   and encoded as they are needed.
5. ``export``: the exponential moving averages of the weights, saved with ``save_pretrained``, a
   ``training.json`` with the command and its figures, and the loss plot.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..harness.video_size import VideoSize
from .clips import BACKGROUNDS, HELDOUT_SEED_START, clip_spec, render_clip
from .components import (ReferenceSizes, assemble_pipeline, build_text_encoder, build_tokenizer,
                         build_transformer, build_vae)

VAE_FRAMES = 9
VAE_WINDOW = 32
CLIP_FRAMES = 29
SMALL_SIDE = 64
PROMPT_DROPOUT = 0.1
VAE_KL_WEIGHT = 1e-6
EMA_DECAY = 0.995


@dataclass(frozen=True)
class TrainSettings:
    """Steps and batch sizes of every stage (the defaults are the shipped model's)."""

    vae_steps: int = 2400
    vae_batch: int = 4
    vae_lr: float = 3e-3
    vae_long_steps: int = 1500
    vae_long_lr: float = 1e-3
    latent_clips: int = 3000
    steps: int = 4400
    batch: int = 4
    lr: float = 1e-3
    clip_frames: int = 13
    long_steps: int = 300
    long_lr: float = 5e-4
    long_ema_decay: float = 0.99
    finetune_steps: int = 100
    finetune_batch: int = 1
    finetune_lr: float = 3e-4
    finetune_ema_decay: float = 0.98
    object_weight: float = 0.0
    heldout_clips: int = 8
    checkpoint_every: int = 25
    seed: int = 0


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """``(B, F, H, W, 3)`` frames in ``[0, 1]`` to the VAE's ``(B, 3, F, H, W)`` in ``[-1, 1]``."""
    return frames.permute(0, 4, 1, 2, 3) * 2 - 1


def vae_batch(first_seed: int, frames: int, settings: TrainSettings) -> torch.Tensor:
    """``settings.vae_batch`` training clips of ``frames`` frames, seeds from ``first_seed`` on:
    32x32 windows of clips rendered at 128x128 and at 64x64 (alternately), so the VAE sees objects at
    both scales the transformer uses (a convolutional VAE needs no whole frame, and small windows
    make steps cheap)."""
    clips = []
    for i in range(settings.vae_batch):
        seed = first_seed + i
        side = VAE_WINDOW * (4 if i % 2 == 0 else 2)
        full = render_clip(clip_spec(seed), frames, side, side)
        top, left = torch.randint(0, side - VAE_WINDOW + 1, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        clips.append(full[:, top:top + VAE_WINDOW, left:left + VAE_WINDOW])
    return to_model_range(torch.stack(clips))


def object_masks(clips: torch.Tensor, backgrounds: list[str], scale: int) -> torch.Tensor:
    """``(B, T, H / scale, W / scale)`` bool: the latent positions an object covers in any frame the
    latent frame encodes (Wan's causal VAE: the first frame alone, then groups of ``scale``), from
    rendered ``(B, F, H, W, 3)`` clips and their background names.

    Example::

        >>> spec = clip_spec(3)
        >>> masks = object_masks(render_clip(spec, 9, 32, 32)[None], [spec.background], scale=4)
        >>> tuple(masks.shape), 0 < masks.float().mean().item() < 0.5
        ((1, 3, 8, 8), True)
    """
    background = torch.tensor([BACKGROUNDS[name] for name in backgrounds]).view(-1, 1, 1, 1, 3)
    covered = ((clips - background).abs().sum(-1) > 0.05).float()                      # (B, F, H, W)
    batch, frames, height, width = covered.shape
    later = covered[:, 1:].reshape(batch, (frames - 1) // scale, scale, height, width).amax(2)
    return F.max_pool2d(torch.cat([covered[:, :1], later], 1), scale) > 0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames in ``[-1, 1]`` (on the ``[0, 1]`` scale)."""
    mse = ((a - b) / 2).clamp(-1, 1).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def cosine_lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))


class Checkpoints:
    """One stage's checkpoint file in the work folder, written atomically."""

    def __init__(self, work: Path, stage: str):
        self.path = work / f"{stage}.ckpt"

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state: dict) -> None:
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)


class LossLog:
    """``stage,step,loss`` lines in ``work/loss.csv``; a resumed stage drops lines past its checkpoint."""

    def __init__(self, work: Path):
        self.path = work / "loss.csv"

    def truncate(self, stage: str, step: int) -> None:
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if not (line.split(",")[0] == stage and int(line.split(",")[1]) >= step)]
            self.path.write_text("".join(line + "\n" for line in keep))

    def add(self, stage: str, step: int, loss: float) -> None:
        with self.path.open("a") as file:
            file.write(f"{stage},{step},{loss:.6f}\n")

    def read(self) -> dict[str, list[tuple[int, float]]]:
        curves: dict[str, list[tuple[int, float]]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                stage, step, loss = line.split(",")
                curves.setdefault(stage, []).append((int(step), float(loss)))
        return curves


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for target, source in zip(ema.parameters(), model.parameters(), strict=True):
            target.lerp_(source, 1 - decay)


def train_vae(work: Path, sizes: ReferenceSizes, settings: TrainSettings, log: LossLog) -> torch.nn.Module:
    """Stage 1: the VAE on short clips (``vae``), then on clips of the default length (``vae_long``,
    so that Wan's causal chunk-by-chunk cache stays stable over every chunk of a default video);
    returned trained, its held-out PSNR written to ``work/vae.json``."""
    torch.manual_seed(settings.seed)
    vae = build_vae(sizes)
    fit_vae("vae", vae, VAE_FRAMES, settings.vae_steps, settings.vae_lr, 0, work, settings, log)
    fit_vae("vae_long", vae, sizes.frames, settings.vae_long_steps, settings.vae_long_lr,
            settings.vae_steps * settings.vae_batch, work, settings, log)
    vae.eval().requires_grad_(False)
    report = work / "vae.json"
    if not report.exists():
        report.write_text(json.dumps(heldout_vae_psnr(vae, sizes, settings.heldout_clips), indent=2))
    return vae


def fit_vae(stage: str, vae: torch.nn.Module, frames: int, steps: int, lr: float, first_seed: int, work: Path,
            settings: TrainSettings, log: LossLog) -> None:
    """``steps`` AdamW steps on ``frames``-frame windows, resumed from the stage's checkpoint (a
    finished stage only loads its weights; a new one starts from ``vae`` as it is)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_loss(step: int) -> torch.Tensor:
        clips = vae_batch(first_seed + step * settings.vae_batch, frames, settings)
        posterior = vae.encode(clips).latent_dist
        recon = vae.decode(posterior.mode()).sample
        return F.l1_loss(recon, clips) + F.mse_loss(recon, clips) + VAE_KL_WEIGHT * posterior.kl().mean()

    optimise(stage, work, steps, lr, optimizer, list(vae.parameters()), step_loss, lambda: None,
             lambda: {"model": vae.state_dict()}, lambda state: vae.load_state_dict(state["model"]), log, settings)


def heldout_vae_psnr(vae: torch.nn.Module, sizes: ReferenceSizes, clips: int) -> dict:
    """Reconstruction PSNR of ``clips`` held-out clips at the default size, per clip and mean."""
    values = []
    with torch.no_grad():
        for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + clips):
            video = to_model_range(render_clip(clip_spec(seed), sizes.frames, sizes.height, sizes.width)[None])
            values.append(psnr(vae.decode(vae.encode(video).latent_dist.mode()).sample, video))
    return {"heldout_seeds": [HELDOUT_SEED_START, HELDOUT_SEED_START + clips], "psnr_db": values,
            "mean_psnr_db": sum(values) / len(values), "frames": sizes.frames, "height": sizes.height,
            "width": sizes.width}


def encode_latents(work: Path, vae: torch.nn.Module, settings: TrainSettings) -> dict:
    """Stage 2: 29-frame 64x64 training clips encoded once (``work/latents.pt``), with their prompts,
    the latent positions their objects cover and the per-channel statistics that normalise them."""
    path = work / "latents.pt"
    if path.exists():
        data = torch.load(path)
        if "masks" not in data:
            raise SystemExit(f"{path} was written without object masks; delete it and run again to encode the clips anew")
        return data
    chunk_size = 8
    latents, masks, prompts = [], [], []
    first_seed = 10 * (settings.vae_steps + settings.vae_long_steps) * settings.vae_batch  # clips the VAE never saw
    with torch.no_grad():
        for start in tqdm(range(0, settings.latent_clips, chunk_size), desc="latents"):
            seeds = range(first_seed + start, first_seed + min(start + chunk_size, settings.latent_clips))
            specs = [clip_spec(seed) for seed in seeds]
            clips = torch.stack([render_clip(spec, CLIP_FRAMES, SMALL_SIDE, SMALL_SIDE) for spec in specs])
            latents.append(vae.encode(to_model_range(clips)).latent_dist.mode())
            masks.append(object_masks(clips, [spec.background for spec in specs], vae.config.scale_factor_spatial))
            prompts += [spec.prompt for spec in specs]
    stacked = torch.cat(latents)
    data = {"latents": stacked, "masks": torch.cat(masks), "prompts": prompts, "mean": stacked.mean(dim=(0, 2, 3, 4)),
            "std": stacked.std(dim=(0, 2, 3, 4))}
    torch.save(data, path)
    return data


class Denoiser:
    """The transformer and text encoder in training, their EMA copies, and one flow-matching step."""

    def __init__(self, sizes: ReferenceSizes, seed: int):
        torch.manual_seed(seed)
        self.sizes = sizes
        self.tokenizer = build_tokenizer(sizes.max_sequence_length)
        self.transformer = build_transformer(sizes)
        self.text_encoder = build_text_encoder(sizes)
        self.ema_transformer = build_transformer(sizes).requires_grad_(False)
        self.ema_text_encoder = build_text_encoder(sizes).requires_grad_(False)
        self.ema_transformer.load_state_dict(self.transformer.state_dict())
        self.ema_text_encoder.load_state_dict(self.text_encoder.state_dict())
        self.parameters = [*self.transformer.parameters(), *self.text_encoder.parameters()]

    def state(self) -> dict:
        return {name: getattr(self, name).state_dict()
                for name in ("transformer", "text_encoder", "ema_transformer", "ema_text_encoder")}

    def load(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)

    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as ``WanPipeline`` makes them: encoded with the attention mask,
        zeroed past each prompt's length, ``max_sequence_length`` long."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.sizes.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        embeds = self.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        return embeds * tokens.attention_mask[..., None]

    def loss(self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss: ``x_t = (1 - s) x0 + s n``, target ``n - x0``, ``s`` logit-normal and
        shifted as the scheduler shifts its sigmas; with ``weights`` (broadcast over the latents) a
        weighted mean of the squared errors."""
        batch = latents.shape[0]
        dropped = torch.rand(batch, generator=generator) < PROMPT_DROPOUT
        prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist(), strict=True)]
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        shift = self.sizes.flow_shift
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        noise = torch.randn(latents.shape, generator=generator)
        s = sigma.view(batch, 1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = self.transformer(noisy, timestep=sigma * 1000, encoder_hidden_states=self.prompt_embeds(prompts),
                                      return_dict=False)[0]
        if weights is None:
            return F.mse_loss(prediction, noise - latents)
        weights = weights.expand_as(latents)
        return (weights * (prediction - (noise - latents)) ** 2).mean() / weights.mean()

    def update_ema(self, decay: float) -> None:
        ema_update(self.ema_transformer, self.transformer, decay)
        ema_update(self.ema_text_encoder, self.text_encoder, decay)


def train_denoiser(stage: str, work: Path, denoiser: Denoiser, steps: int, lr: float, ema_decay: float,
                   batches, log: LossLog, settings: TrainSettings) -> None:
    """Stages 3 and 4: ``steps`` AdamW steps on ``batches(step) -> (latents, prompts)``, resumed
    from the stage's checkpoint (a finished stage only loads its weights)."""
    optimizer = torch.optim.AdamW(denoiser.parameters, lr=lr, weight_decay=0.01)

    def step_loss(step: int) -> torch.Tensor:
        latents, prompts, masks = batches(step)
        noise_seed = settings.seed + len(stage) * 10**6 + step   # each stage draws its own noise
        weights = 1 + settings.object_weight * masks.unsqueeze(1).float() if settings.object_weight else None
        return denoiser.loss(latents, prompts, torch.Generator().manual_seed(noise_seed), weights)

    optimise(stage, work, steps, lr, optimizer, denoiser.parameters, step_loss, lambda: denoiser.update_ema(ema_decay),
             lambda: {"models": denoiser.state()}, lambda state: denoiser.load(state["models"]), log, settings)


def optimise(stage: str, work: Path, steps: int, lr: float, optimizer: torch.optim.Optimizer,
             parameters: list[torch.nn.Parameter], step_loss, after_step, weights, load_weights, log: LossLog,
             settings: TrainSettings) -> None:
    """A stage's steps, resumed after its last checkpoint (``load_weights(state)`` and the optimizer
    restored; a finished stage only loads): cosine learning rate, ``step_loss(step)``, gradients
    clipped to norm 1, ``after_step()``, the loss logged and shown, and a checkpoint of
    ``weights()``, the optimizer and the step every ``settings.checkpoint_every`` steps and at the end."""
    checkpoints = Checkpoints(work, stage)
    state = checkpoints.load()
    start = 0
    if state is not None:
        load_weights(state)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    log.truncate(stage, start)
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        after_step()
        log.add(stage, step, loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == steps:
            checkpoints.save({**weights(), "optimizer": optimizer.state_dict(), "step": step + 1})



def cached_batches(data: dict, settings: TrainSettings, latent_frames: int):
    """Batches ``(latents, prompts, object masks)`` of the encoded 64x64 clips, normalised, in a
    seeded order: the first ``latent_frames`` latent frames of each (with Wan's causal VAE, the
    latents of the clip's first frames)."""
    normalised = (data["latents"] - data["mean"].view(1, -1, 1, 1, 1)) / data["std"].view(1, -1, 1, 1, 1)
    normalised, masks = normalised[:, :, :latent_frames], data["masks"][:, :latent_frames]

    def batch(step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        index = torch.randint(0, len(normalised), (settings.batch,),
                              generator=torch.Generator().manual_seed(settings.seed + 7 * step))
        return normalised[index], [data["prompts"][i] for i in index.tolist()], masks[index]

    return batch


def rendered_batches(vae: torch.nn.Module, data: dict, sizes: ReferenceSizes, settings: TrainSettings):
    """Batches ``(latents, prompts, object masks)`` of clips at the default size, rendered and encoded
    when they are needed."""
    first_seed = 20 * (settings.vae_steps + settings.vae_long_steps) * settings.vae_batch + settings.latent_clips

    def batch(step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        specs = [clip_spec(first_seed + step * settings.finetune_batch + i) for i in range(settings.finetune_batch)]
        clips = torch.stack([render_clip(spec, sizes.frames, sizes.height, sizes.width) for spec in specs])
        with torch.no_grad():
            latents = vae.encode(to_model_range(clips)).latent_dist.mode()
        latents = (latents - data["mean"].view(1, -1, 1, 1, 1)) / data["std"].view(1, -1, 1, 1, 1)
        masks = object_masks(clips, [spec.background for spec in specs], vae.config.scale_factor_spatial)
        return latents, [spec.prompt for spec in specs], masks

    return batch


def export(out: Path, work: Path, vae: torch.nn.Module, data: dict, denoiser: Denoiser, sizes: ReferenceSizes,
           settings: TrainSettings, log: LossLog, plot: Path | None, seconds: float) -> None:
    """Stage 5: the pipeline folder with the EMA weights, ``training.json`` and the loss plot."""
    vae.register_to_config(latents_mean=data["mean"].tolist(), latents_std=data["std"].tolist())
    pipe = assemble_pipeline(vae, denoiser.ema_text_encoder.eval(), denoiser.ema_transformer.eval(), sizes)
    pipe.save_pretrained(out, safe_serialization=True)
    curves = log.read()
    summary = {
        "command": "python -m dit_sparse.eval.reference.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "sizes": sizes.to_dict(),
        "settings": settings.__dict__,
        "vae_reconstruction": json.loads((work / "vae.json").read_text()),
        "final_loss": {stage: sum(v for _, v in points[-50:]) / len(points[-50:]) for stage, points in curves.items()},
        "seconds_this_sitting": round(seconds),
        "parameters": {name: sum(p.numel() for p in module.parameters())
                       for name, module in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder),
                                            ("vae", pipe.vae))},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plot is not None:
        plot_losses(curves, plot)


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One panel per stage: the loss at every step and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (stage, points) in zip(axes[0], curves.items(), strict=True):
        steps = [s for s, _ in points]
        losses = torch.tensor([v for _, v in points])
        window = max(1, len(points) // 20)
        smooth = losses.unfold(0, window, 1).mean(1) if len(points) >= window else losses
        ax.plot(steps, losses, color="0.75", linewidth=0.8, label="step")
        ax.plot(steps[window - 1:], smooth, color="C0", label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_sparse.eval.reference.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainSettings()
    parser.add_argument("--work", type=Path, required=True, help="checkpoints, cached latents and the loss log")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    parser.add_argument("--plot", type=Path, default=None, help="where to save the loss curves (PNG)")
    for name, value in defaults.__dict__.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"default: {value}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def train(work: Path, out: Path, sizes: ReferenceSizes, settings: TrainSettings, plot: Path | None = None) -> None:
    """Run every stage not yet finished in ``work`` and write the pipeline folder ``out``."""
    began = time.time()
    work.mkdir(parents=True, exist_ok=True)
    log = LossLog(work)
    vae = train_vae(work, sizes, settings, log)
    data = encode_latents(work, vae, settings)
    denoiser = Denoiser(sizes, settings.seed)
    train_denoiser("transformer", work, denoiser, settings.steps, settings.lr, EMA_DECAY,
                   cached_batches(data, settings, sizes.latent_frames(settings.clip_frames)), log, settings)
    if settings.long_steps:
        train_denoiser("transformer_long", work, denoiser, settings.long_steps, settings.long_lr, settings.long_ema_decay,
                       cached_batches(data, settings, sizes.latent_frames(CLIP_FRAMES)), log, settings)
    train_denoiser("finetune", work, denoiser, settings.finetune_steps, settings.finetune_lr,
                   settings.finetune_ema_decay, rendered_batches(vae, data, sizes, settings), log, settings)
    export(out, work, vae, data, denoiser, sizes, settings, log, plot, time.time() - began)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = TrainSettings(**{name: getattr(args, name) for name in TrainSettings.__dataclass_fields__})
    sizes = ReferenceSizes()
    if not 1 <= settings.clip_frames <= CLIP_FRAMES:
        parser.error(f"--clip-frames {settings.clip_frames}: the training clips have {CLIP_FRAMES} frames; "
                     f"use 1 to {CLIP_FRAMES} (e.g. 13)")
    try:
        VideoSize("--clip-frames", frame_step=sizes.vae_scale).check(frames=settings.clip_frames)
    except ValueError as error:
        parser.error(str(error))
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "model_index.json").exists():
        raise SystemExit(f"--out {args.out} exists and is not a pipeline folder; name an empty or new folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.work, args.out, sizes, settings, args.plot)
    print(f"wrote {args.out} ({args.out / 'training.json'})")


if __name__ == "__main__":
    main()
