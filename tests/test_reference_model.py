"""The reference model: procedural clips, the detector, the vocabulary, the shipped pipeline folder
(loaded with the stock ``WanPipeline.from_pretrained``) and the training command."""

import json

import numpy as np
import pytest
import torch

from dit_sparse.eval.reference import heldout_prompts, prompt_choices, reference_call_kwargs, reference_model_dir
from dit_sparse.eval.reference.clips import HELDOUT_SEED_START, clip_spec, render_clip
from dit_sparse.eval.reference.components import ReferenceSizes
from dit_sparse.eval.reference.detector import Reading, detect, parse_prompt
from dit_sparse.eval.reference.scoring import adherence, agreement
from dit_sparse.eval.reference.train import (Denoiser, TrainSettings, cached_batches, main, object_masks, to_model_range,
                                             train)
from dit_sparse.eval.reference.vocabulary import build_tokenizer, unknown_words, vocabulary


def test_a_seed_draws_one_clip_and_every_prompt_parses_back_to_it():
    assert clip_spec(7) == clip_spec(7)
    for seed in range(400):
        spec = clip_spec(seed)
        assert parse_prompt(spec.prompt) == Reading.of(spec)
        assert len({obj.colour for obj in spec.objects}) == len(spec.objects)


def test_training_never_draws_a_heldout_seed():
    settings = TrainSettings()
    last_finetune_seed = (20 * (settings.vae_steps + settings.vae_long_steps) * settings.vae_batch
                          + settings.latent_clips + settings.finetune_steps * settings.finetune_batch)
    assert last_finetune_seed < HELDOUT_SEED_START
    assert [seed for seed, _ in heldout_prompts(3)] == [HELDOUT_SEED_START + i for i in range(3)]


@pytest.mark.parametrize("side", [64, 128])
def test_the_detector_reads_rendered_clips_exactly(side):
    seeds = range(HELDOUT_SEED_START, HELDOUT_SEED_START + (24 if side == 64 else 6))
    for seed in seeds:
        spec = clip_spec(seed)
        assert detect(render_clip(spec, 29, side, side).numpy()) == Reading.of(spec), spec.prompt


def test_the_detector_tells_motions_and_shapes_apart_and_refuses_non_rgb_frames():
    spec = clip_spec(HELDOUT_SEED_START)
    video = render_clip(spec, 29, 64, 64).numpy()
    (colour, shape, motion), = Reading.of(spec).objects
    reversed_motion = {"up": "down", "down": "up", "left": "right", "right": "left"}.get(motion, motion)
    assert detect(video[::-1].copy()).objects == ((colour, shape, reversed_motion),)
    with pytest.raises(ValueError, match=r"\(frames, height, width, 3\)"):
        detect(video[..., :2])


def test_scores_count_each_attribute_and_disagreement_shows():
    specs = [clip_spec(HELDOUT_SEED_START + i) for i in range(4)]
    videos = [render_clip(spec, 29, 64, 64).numpy() for spec in specs]
    scores = adherence([spec.prompt for spec in specs] + ["a cat surfing a wave"], videos + [videos[0]])
    assert scores["accuracy"] == {"background": 1.0, "colour": 1.0, "shape": 1.0, "motion": 1.0}
    assert scores["checked"] == 4 and scores["prompts"][-1]["unknown_words"] == ["cat", "surfing", "wave"]
    assert agreement(videos, videos)["all"] == 1.0
    flat = [np.full_like(video, 0.5) for video in videos]   # gray and empty: every object missing
    assert agreement(videos, flat)["accuracy"]["colour"] == 0.0


def test_the_tokenizer_maps_unknown_words_to_unk_and_names_them():
    tokenizer = build_tokenizer()
    ids = tokenizer("a crimson circle").input_ids
    assert ids == [vocabulary().index("a"), vocabulary().index("<unk>"), vocabulary().index("circle"),
                   vocabulary().index("</s>")]
    assert unknown_words("A Crimson circle, moving left") == ["crimson", ","]
    assert all(not unknown_words(prompt) for prompt in prompt_choices())


@pytest.fixture(scope="module")
def reference_pipe():
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(reference_model_dir())


def test_the_shipped_folder_loads_with_the_stock_wan_pipeline(reference_pipe):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    pipe = reference_pipe
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel) and isinstance(pipe.tokenizer, PreTrainedTokenizerFast)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 5_000_000
    kwargs = reference_call_kwargs()
    tokens = ReferenceSizes().video_tokens(kwargs["num_frames"], kwargs["height"], kwargs["width"])
    assert tokens >= 8192
    summary = json.loads((reference_model_dir() / "training.json").read_text())
    assert summary["command"].startswith("python -m dit_sparse.eval.reference.train")
    assert summary["settings"] == TrainSettings().__dict__, "the shipped weights are not the default command's output"


def test_the_call_settings_encode_prompts_as_training_did(reference_pipe):
    from dit_sparse.eval.harness.models import load_reference_model
    from dit_sparse.eval.reference.train import Denoiser
    from dit_sparse.eval.harness.settings import GenerationSettings

    kwargs = reference_call_kwargs()
    prompts = ["a red circle moving left on a black background",
               "a yellow circle moving right and a blue circle moving left on a dark blue background", ""]
    denoiser = Denoiser(ReferenceSizes(), seed=0)
    denoiser.text_encoder = reference_pipe.text_encoder
    with torch.no_grad():
        trained = denoiser.prompt_embeds(prompts)
        called, _ = reference_pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                 max_sequence_length=kwargs["max_sequence_length"])
    torch.testing.assert_close(called, trained)
    eval_kwargs = load_reference_model(torch.device("cpu"), torch.float32).call_kwargs(prompts[0], GenerationSettings())
    assert eval_kwargs["max_sequence_length"] == kwargs["max_sequence_length"]


def test_a_retrained_folder_loads_as_the_reference_model_does(tmp_path):
    """The eval runs a folder the training command wrote (here a copy of the shipped one) with the
    reference call settings and the detector, and names the folder; one without training.json is any
    other pipeline."""
    import shutil

    from dit_sparse.eval.harness.models import load_model, load_reference_model
    from dit_sparse.eval.harness.settings import GenerationSettings

    folder = tmp_path / "retrained"
    shutil.copytree(reference_model_dir(), folder)
    shipped = load_reference_model(torch.device("cpu"), torch.float32)
    retrained = load_model(str(folder), torch.device("cpu"), torch.float32)
    assert retrained.reads_clips and str(folder) in retrained.name
    assert retrained.defaults == shipped.defaults
    prompt = "a red circle moving left on a black background"
    kwargs = [{k: v for k, v in m.call_kwargs(prompt, GenerationSettings()).items() if k != "generator"}
              for m in (retrained, shipped)]
    assert kwargs[0] == kwargs[1] and kwargs[0]["max_sequence_length"] == reference_call_kwargs()["max_sequence_length"]
    (folder / "training.json").unlink()
    assert not load_model(str(folder), torch.device("cpu"), torch.float32).reads_clips


def test_a_prompt_generates_end_to_end_and_unknown_words_still_generate(reference_pipe):
    kwargs = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    known = reference_pipe(prompt="a red circle moving left on a black background",
                           generator=torch.Generator().manual_seed(0), **kwargs).frames[0]
    unknown = reference_pipe(prompt="a crimson dodecahedron dancing", generator=torch.Generator().manual_seed(0),
                             **kwargs).frames[0]
    assert known.shape == unknown.shape == (5, 32, 32, 3)
    assert np.isfinite(known).all() and np.isfinite(unknown).all()
    assert np.abs(known - unknown).max() > 0    # the text reaches the video


def test_object_masks_follow_the_rendered_object_through_the_latent_frames():
    seed = next(s for s in range(100) if len(clip_spec(s).objects) == 1 and clip_spec(s).objects[0].motion == "right")
    spec = clip_spec(seed)
    clips = render_clip(spec, 9, 64, 64)[None]
    masks = object_masks(clips, [spec.background], scale=4)                 # latent frames: 0 | 1-4 | 5-8
    assert masks.shape == (1, 3, 16, 16)
    for latent_frame, last_frame in ((0, 0), (1, 4), (2, 8)):
        x, y, radius = spec.objects[0].centre_and_radius(last_frame / 8)
        assert masks[0, latent_frame, int(y * 16), int(x * 16)]           # the object's centre is covered
        assert masks[0, latent_frame].float().mean() < 0.35                  # the background is not
    columns = [masks[0, t].nonzero()[:, 1].float().mean().item() for t in range(3)]
    assert columns[0] < columns[1] < columns[2]                              # and it moves right


def test_the_weighted_loss_is_the_plain_loss_at_equal_weights_and_follows_the_weights():
    denoiser = Denoiser(ReferenceSizes(num_layers=1), seed=0)
    latents = torch.randn(2, 16, 2, 4, 4)
    prompts = ["a red circle moving left on a black background"] * 2
    plain = denoiser.loss(latents, prompts, torch.Generator().manual_seed(1))
    even = denoiser.loss(latents, prompts, torch.Generator().manual_seed(1), torch.full((2, 1, 2, 4, 4), 5.0))
    assert torch.allclose(plain, even)
    corner = torch.zeros(2, 1, 2, 4, 4)
    corner[..., 0, 0] = 1.0                                                   # only one latent position counts
    weighted = denoiser.loss(latents, prompts, torch.Generator().manual_seed(1), corner)
    assert not torch.allclose(weighted, plain)


def test_short_clip_batches_are_the_latents_of_the_clips_first_frames(reference_pipe):
    vae = reference_pipe.vae
    spec = clip_spec(5)
    clip = render_clip(spec, 29, 32, 32)[None]
    with torch.no_grad():
        whole = vae.encode(to_model_range(clip)).latent_dist.mode()
        first = vae.encode(to_model_range(clip[:, :13])).latent_dist.mode()
    data = {"latents": whole, "masks": torch.ones(1, 8, 8, 8, dtype=torch.bool), "prompts": [spec.prompt],
            "mean": torch.zeros(16), "std": torch.ones(16)}
    latents, prompts, masks = cached_batches(data, TrainSettings(batch=1), latent_frames=4)(0)
    assert latents.shape == first.shape == (1, 16, 4, 8, 8) and masks.shape == (1, 4, 8, 8) and prompts == [spec.prompt]
    torch.testing.assert_close(latents, first, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frames", ["12", "33", "0"])
def test_clip_frames_the_vae_cannot_cut_are_refused_before_training(tmp_path, capsys, frames):
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "model"), "--clip-frames", frames])
    assert "--clip-frames" in capsys.readouterr().err and not (tmp_path / "work").exists()


def test_two_training_steps_write_a_loadable_pipeline_and_a_rerun_resumes(tmp_path):
    from diffusers import WanPipeline

    sizes = ReferenceSizes(num_layers=1, frames=5, height=32, width=32)
    settings = TrainSettings(vae_steps=2, vae_long_steps=1, latent_clips=2, steps=2, finetune_steps=2,
                             heldout_clips=1, checkpoint_every=1, object_weight=4.0, clip_frames=13, long_steps=1)
    work, out = tmp_path / "work", tmp_path / "model"
    train(work, out, sizes, settings, plot=tmp_path / "loss.png")
    lines = (work / "loss.csv").read_text().splitlines()
    stages = ["vae"] * 2 + ["vae_long"] + ["transformer"] * 2 + ["transformer_long"] + ["finetune"] * 2
    assert [line.split(",")[0] for line in lines] == stages
    assert (tmp_path / "loss.png").stat().st_size > 0
    pipe = WanPipeline.from_pretrained(out)
    video = pipe(prompt="a red circle moving left on a black background", num_frames=5, height=32, width=32,
                 num_inference_steps=2, output_type="np").frames[0]
    assert video.shape == (5, 32, 32, 3)

    longer = TrainSettings(**{**settings.__dict__, "finetune_steps": 3})
    train(work, out, sizes, longer)
    resumed = [line.split(",")[:2] for line in (work / "loss.csv").read_text().splitlines()]
    assert resumed[:8] == [line.split(",")[:2] for line in lines] and resumed[8] == ["finetune", "2"]


def test_swapped_prompts_change_one_word_class_each():
    import random

    from dit_sparse.eval.reference.conditioning import SWAPS, swapped_prompts
    from dit_sparse.eval.reference.detector import parse_prompt

    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + 12):
        spec = clip_spec(seed)
        prompts = swapped_prompts(spec, random.Random(seed))
        true = parse_prompt(prompts["true"])
        assert true == Reading.of(spec)
        for kind in SWAPS:
            swapped = parse_prompt(prompts[kind])
            if kind == "background":
                assert swapped.background != true.background and swapped.objects == true.objects
                continue
            assert swapped.background == true.background
            (old,), (new,) = set(true.objects) - set(swapped.objects), set(swapped.objects) - set(true.objects)
            changed = [name for name, a, b in zip(("colour", "shape", "motion"), old, new) if a != b]
            assert changed == [kind]
        assert prompts["empty"] == ""


def test_conditioning_losses_show_which_words_the_model_uses(reference_pipe):
    """On two held-out clips the shipped model's loss rises when the background word is swapped (it
    draws the background its prompt names) and every variant is reported."""
    from dit_sparse.eval.reference.conditioning import conditioning_losses, format_losses

    losses = conditioning_losses(reference_pipe, clips=2, sigmas=(0.6,))
    assert list(losses) == ["true", "motion", "shape", "colour", "background", "empty"]
    assert losses["background"] > 1.2 * losses["true"]
    assert "| background |" in format_losses(losses)
