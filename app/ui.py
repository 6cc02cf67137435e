"""The demo's page: the inputs, dense and sparse videos side by side, timings and fidelity, the
density plot and a plan's block masks for a chosen layer and head.

Requests queue one at a time on the session's single pipeline. Bad input and failed generations
show a readable error in the page and leave every output as it was.

Example::

    >>> demo = build_demo(DemoSession(load_model(None, torch.device("cpu"), torch.float32)))  # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1")                                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import Any

import gradio as gr
from matplotlib.figure import Figure

from dit_sparse.config import PATTERNS
from dit_sparse.eval.reference.detector import Reading
from dit_sparse.eval.results import RANDOM_WEIGHTS_NOTE

from .demo import DemoRequest, DemoResult, DemoSession
from .plan_masks import PlanMasks

logger = logging.getLogger(__name__)

ALL_HEADS = "all"
BUDGETS = ("density", "top_p")
SIDE_STEP = 16  # Wan, HunyuanVideo and Flux pipelines take heights and widths in multiples of 16
FALLBACK_SIDE = 1024  # pipelines whose __call__ computes its size (Flux) make 1024x1024 by default
STAT_MIN_WIDTH = 110  # five figures on one row next to the inputs
CACHE_SECONDS = 3600  # Gradio's copies of served videos are deleted after an hour


def build_demo(session: DemoSession) -> gr.Blocks:
    """The Gradio app around ``session``, its queue taking one request at a time."""
    model, defaults, config = session.model, session.defaults, session.base_config
    with gr.Blocks(title="dit-sparse demo", analytics_enabled=False,
                   delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown(_header(session))
        masks_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = _prompt_input(session)
                with gr.Row():
                    seed = gr.Number(defaults.seed, label="Seed", precision=0, minimum=0)
                    steps = gr.Slider(1, max(50, 2 * defaults.steps), value=defaults.steps, step=1, label="Steps")
                default_frames = defaults.frames or 1
                frames = gr.Slider(1, 2 * default_frames - 1, value=default_frames, step=model.frame_step,
                                   label="Frames", visible=model.makes_video)
                with gr.Row():
                    height = _side_slider("Height", defaults.height)
                    width = _side_slider("Width", defaults.width)
                pattern = gr.Dropdown(list(PATTERNS), value=config.pattern, label="Pattern")
                with gr.Row():
                    budget = gr.Radio(list(BUDGETS), value="top_p" if config.top_p is not None else "density",
                                      label="Budget")
                    budget_value = gr.Slider(0.01, 1.0, value=config.top_p or config.density, step=0.01,
                                             label="Density or top-p")
                dense_steps = gr.Slider(0, max(50, 2 * defaults.steps), value=config.num_dense_steps(defaults.steps),
                                        step=1, label="Dense steps",
                                        info="leading steps run dense; the last one calibrates")
                generate = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_video = gr.Video(label="dense", format="mp4", autoplay=True, loop=True, interactive=False)
                    sparse_video = gr.Video(label="sparse", format="mp4", autoplay=True, loop=True, interactive=False)
                with gr.Row():
                    dense_time, sparse_time, speedup, psnr, ssim = (
                        gr.Textbox(label=label, interactive=False, min_width=STAT_MIN_WIDTH)
                        for label in ("dense wall time", "sparse wall time", "speedup", "PSNR, per-frame mean", "SSIM")
                    )
                details = gr.Markdown()
                density_plot = gr.Plot(label="attention density per layer and step", show_label=False)
                with gr.Row():
                    layer = gr.Dropdown([], label="Plan of layer")
                    head = gr.Dropdown([], label="Head")
                mask_plot = gr.Plot(label="block mask", show_label=False)

        def run(prompt_text: str, seed_value: int, frame_count: int, height_px: int, width_px: int, step_count: int,
                pattern_name: str, budget_name: str, budget: float, dense_step_count: int,
                progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[Any, ...]:
            # the progress default makes Gradio mirror the session's tqdm bars in the page
            request = DemoRequest(
                prompt_text, seed_value, frame_count if model.makes_video else None, height_px, width_px, step_count,
                pattern_name, density=budget if budget_name == "density" else None,
                top_p=budget if budget_name == "top_p" else None, dense_steps=dense_step_count,
            )
            result = _shown_errors(session.generate, request)
            masks = result.masks
            return (
                str(result.dense_video), str(result.sparse_video), f"{result.dense_seconds:.2f} s",
                f"{result.sparse_seconds:.2f} s", f"{result.speedup:.2f}x", _decibels(result.fidelity.psnr_frame_mean),
                f"{result.fidelity.ssim:.4f}", _details(result), result.density_figure,
                gr.Dropdown(choices=masks.layers, value=masks.default_layer),
                gr.Dropdown(choices=_head_choices(masks), value=ALL_HEADS if masks.layers else None),
                _mask_picture(masks, masks.default_layer, ALL_HEADS), masks,
            )

        def show_mask(masks: PlanMasks | None, layer_label: str | None, head_choice: str | None) -> Figure | None:
            return _mask_picture(masks, layer_label, head_choice)

        generate.click(
            run, [prompt, seed, frames, height, width, steps, pattern, budget, budget_value, dense_steps],
            [dense_video, sparse_video, dense_time, sparse_time, speedup, psnr, ssim, details, density_plot,
             layer, head, mask_plot, masks_state],
            api_name="generate",
        )
        gr.on([layer.input, head.input], show_mask, [masks_state, layer, head], mask_plot, api_name="mask")
    demo.queue(default_concurrency_limit=1)
    return demo


def _shown_errors(generate: Any, request: DemoRequest) -> DemoResult:
    """``generate(request)``, its failures as a message in the page: bad input as it is worded,
    anything else named with a pointer to the server log (which has the traceback)."""
    try:
        return generate(request)
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from None
    except Exception as error:
        logger.exception("generation failed")
        raise gr.Error(f"{type(error).__name__}: {error}. The server log has the details.",
                       title="Generation failed", print_exception=False) from None


def _mask_picture(masks: PlanMasks | None, layer: str | None, head: str | None) -> Figure | None:
    if masks is None or layer is None or head is None:
        return None
    try:
        return masks.figure(layer, None if head == ALL_HEADS else int(head))
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid input", print_exception=False) from None


def _prompt_input(session: DemoSession) -> gr.components.Component:
    """A menu of the reference model's prompts that also takes free text; a text box for other models
    (the random offline model has no text encoder: its text seeds a fixed embedding)."""
    prompts = session.prompts
    if session.model.reads_clips:
        return gr.Dropdown(prompts, value=prompts[0], label="Prompt", allow_custom_value=True, filterable=True,
                           info="Pick a combination the model was trained on or type your own; words it does not "
                                "know are read as <unk>.")
    info = "The offline model has no text encoder: the text seeds a fixed embedding." if session.model.offline_spec \
        else None
    return gr.Textbox(prompts[0], label="Prompt", lines=3, info=info)


def _head_choices(masks: PlanMasks) -> list[tuple[str, str]]:
    if masks.default_layer is None:
        return []
    heads = range(masks.num_heads(masks.default_layer))
    return [("all heads", ALL_HEADS), *((f"head {index}", str(index)) for index in heads)]


def _header(session: DemoSession) -> str:
    model = session.model
    lines = [
        "# dit-sparse: dense and block-sparse attention, side by side",
        f"Model: **{model.name}** on {model.device} ({str(model.pipe.transformer.dtype).removeprefix('torch.')}). "
        "Generate runs the prompt dense and sparse with the same seed; the dense run is cached, so changing only "
        "the pattern, budget or dense steps reruns the sparse side alone.",
    ]
    if model.random_weights:
        lines.append(f"*{RANDOM_WEIGHTS_NOTE}*")
    return "\n\n".join(lines)


def _details(result: DemoResult) -> str:
    summary = result.summary
    dense_note = ("dense video from the cache (same prompt and settings as an earlier request; its wall time is from "
                  "that run)" if result.dense_from_cache else "dense video generated for this request")
    density = "-" if summary.mean_sparse_density is None else f"{summary.mean_sparse_density:.3f}"
    return (
        f"{dense_note}. Sparse: {summary.dense_steps} of {len(summary.steps)} steps dense, mean density of the sparse "
        f"calls {density}, {summary.flops_saved_fraction:.0%} of the self-attention FLOPs saved, calibration "
        f"{summary.calibration_seconds:.2f} s. PSNR over the whole video: {_decibels(result.fidelity.psnr_global)}. "
        "Fidelity is measured on the pipeline's raw frames, not the mp4s."
    ) + _readings_line(result)


def _readings_line(result: DemoResult) -> str:
    readings = result.readings
    if readings is None:
        return ""
    return (f"\n\nThe clip detector reads the dense video as *{_describe(readings.dense)}* and the sparse one as "
            f"*{_describe(readings.sparse)}*: {readings.agreement:.0%} of its readings agree.")


def _describe(reading: Reading) -> str:
    objects = " and ".join(f"{colour} {shape} ({motion})" for colour, shape, motion in reading.objects)
    return f"{objects or 'no object'} on {reading.background}"


def _decibels(value: float) -> str:
    return "identical (inf dB)" if math.isinf(value) else f"{value:.2f} dB"


def _side_slider(label: str, default: int | None) -> gr.Slider:
    """A height or width slider up to twice the model's default, in steps of :data:`SIDE_STEP`."""
    value = default or FALLBACK_SIDE
    return gr.Slider(SIDE_STEP, -(-2 * value // SIDE_STEP) * SIDE_STEP, value=value, step=SIDE_STEP, label=label)
