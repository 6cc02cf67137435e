"""The Gradio demo: its generate logic called directly, the app served on 127.0.0.1 and driven with
gradio_client, bad input, failures half-way, and the command line. A tiny offline Wan model."""

import threading
import time

import imageio.v3 as iio
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from matplotlib.figure import Figure

from dit_sparse.app import cli, demo
from dit_sparse.app.demo import DemoRequest, DemoSession
from dit_sparse.app.ui import _details, build_demo
from dit_sparse.eval.harness.models import load_offline_model
from dit_sparse.eval.harness.offline_model import OfflineWanSpec

SPEC = OfflineWanSpec(num_layers=2, frames=5, height=32, width=32, steps=3)  # 2x8x8 latent tokens
JOB_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_offline_model(SPEC, torch.device("cpu"), torch.float32)
    model.pipe.set_progress_bar_config(disable=True)
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def session(model):
    session = DemoSession(model)
    yield session
    session.close()


@pytest.fixture
def transformer_calls(model):
    """How many times the transformer ran since the test started."""
    calls = []
    handle = model.pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture(scope="module")
def client(session):
    app = build_demo(session)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        assert app.local_url.startswith("http://127.0.0.1:")
        yield Client(app.local_url, verbose=False)
    finally:
        app.close()


def decoded(path):
    """Codec and ``(frames, height, width, channels)`` of an mp4, read back through ffmpeg."""
    return iio.immeta(path, plugin="FFMPEG")["codec"], iio.imread(path, plugin="FFMPEG").shape


def is_stock(model) -> bool:
    return {type(p).__name__ for p in model.pipe.transformer.attn_processors.values()} == {"WanAttnProcessor"}


def test_generate_returns_two_playable_videos_timings_fidelity_and_figures(session, model):
    result = session.generate(DemoRequest("a red fox in the snow", seed=1, pattern="adaptive", density=0.5))
    for video in (result.dense_video, result.sparse_video):
        assert decoded(video) == ("h264", (SPEC.frames, SPEC.height, SPEC.width, 3))
    assert result.speedup == result.dense_seconds / result.sparse_seconds > 0
    assert result.fidelity.psnr_frame_mean > 0 and 0 < result.fidelity.ssim <= 1
    assert isinstance(result.density_figure, Figure)
    assert result.summary.density.shape == (SPEC.steps, SPEC.num_layers)        # [step, layer]
    assert result.summary.density[0].tolist() == [1.0, 1.0]                     # the dense (calibration) step
    # the library defaults keep layer 0 dense: layer 1 alone has a plan
    assert result.masks.layers == ["layer 1"] and result.masks.default_layer == "layer 1"
    one_head = result.masks.figure("layer 1", head=1)
    assert len(one_head.axes) == 1 and one_head.axes[0].get_title().startswith("head 1:")
    assert len(result.masks.figure("layer 1").axes) == SPEC.num_heads
    assert "adaptive" in result.masks.notes["layer 1"]
    assert result.masks.modules == {"layer 1": "blocks.1.attn1"}                # Wan's second self-attention
    assert is_stock(model)


def test_changing_only_the_sparse_knobs_reruns_only_the_sparse_side(session, transformer_calls):
    first = session.generate(DemoRequest("a cat on the grass", seed=2, pattern="adaptive", density=0.5))
    assert not first.dense_from_cache and len(transformer_calls) == 2 * SPEC.steps
    again = session.generate(DemoRequest("a cat on the grass", seed=2, pattern="radial", top_p=0.9, dense_steps=2))
    assert again.dense_from_cache and len(transformer_calls) == 3 * SPEC.steps
    assert (again.dense_video, again.dense_seconds) == (first.dense_video, first.dense_seconds)
    assert again.summary.dense_steps == 2 and again.config.top_p == 0.9
    other_seed = session.generate(DemoRequest("a cat on the grass", seed=3, pattern="radial", top_p=0.9))
    assert not other_seed.dense_from_cache and len(transformer_calls) == 5 * SPEC.steps
    all_dense = session.generate(DemoRequest("a cat on the grass", seed=3, pattern="dense"))
    assert all_dense.dense_from_cache and all_dense.masks.layers == [] and all_dense.masks.default_layer is None
    assert all_dense.summary.mean_sparse_density is None and all_dense.fidelity.psnr_frame_mean > 90


@pytest.mark.parametrize("request_, message", [
    (DemoRequest("a fox", frames=6), r"takes 4k\+1 frames \(1, 5, 9, ...\); got 6: use 5 or 9"),
    (DemoRequest("a fox", density=1.5), r"density must lie in \(0, 1\], got 1.5"),
    (DemoRequest("a fox", density=0.1, top_p=0.9), "give one budget"),
    (DemoRequest("a fox", pattern="diagonal"), "pattern must be one of auto, radial"),
    (DemoRequest("a fox", dense_steps=3), "3 dense steps of 3 leave no step sparse; use fewer dense steps"),
    (DemoRequest("  "), "the prompt is empty"),
    (DemoRequest("a fox", seed=-1), r"seed must be a whole number in \[0, "),
    (DemoRequest("a fox", steps=0), "steps must be a whole number >= 1, got 0"),
    (DemoRequest("a fox", height=40), r"height that is a multiple of 16 \(WanPipeline requires it\); got 40: use 32 "
                                      "or 48"),
])
def test_bad_input_is_a_readable_error_that_runs_and_changes_nothing(session, model, transformer_calls,
                                                                      request_, message):
    with pytest.raises(ValueError, match=message):
        session.generate(request_)
    assert not transformer_calls and is_stock(model)


def test_a_failure_half_way_caches_no_failed_dense_run_and_leaves_the_pipeline_stock(session, model, monkeypatch):
    request = DemoRequest("a heron in the reeds", seed=4)
    writes = []

    def dense_video_fails(frames, path, fps):
        writes.append(path)
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "write_video", dense_video_fails)
        with pytest.raises(OSError, match="disk full"):
            session.generate(request)
    assert len(writes) == 1 and writes[0].name.startswith("dense")

    def planning_fails(*args):
        raise RuntimeError("planner crashed")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "summarize_sparse_run", planning_fails)
        with pytest.raises(RuntimeError, match="planner crashed"):
            session.generate(request)                         # the dense run succeeded this time: it is kept
    assert is_stock(model)
    assert session.generate(request).dense_from_cache


def test_the_served_app_generates_through_gradio_client(client):
    job = client.submit("a red fox in the snow", 0, SPEC.frames, SPEC.height, SPEC.width, SPEC.steps, "adaptive",
                        "density", 0.5, 1, api_name="/generate")
    (dense_video, sparse_video, dense_time, sparse_time, speedup, psnr, ssim, details, density_plot, layer, head,
     mask_plot) = job.result(timeout=JOB_TIMEOUT_S)
    for video in (dense_video, sparse_video):
        assert decoded(video) == ("h264", (SPEC.frames, SPEC.height, SPEC.width, 3))
    assert dense_time.endswith(" s") and sparse_time.endswith(" s") and speedup.endswith("x")
    assert psnr.endswith(" dB") and 0 < float(ssim) <= 1 and "1 of 3 steps dense" in details
    for plot in (density_plot, mask_plot):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    assert layer["value"] == "layer 1" and [value for _, value in head["choices"]] == ["all", "0", "1"]
    another_head = client.submit("layer 1", "1", api_name="/mask").result(timeout=JOB_TIMEOUT_S)
    assert another_head["plot"].startswith("data:image/") and another_head["plot"] != mask_plot["plot"]


def test_a_run_without_plans_offers_no_layer_and_no_mask_picture(client):
    job = client.submit("a fox", 0, SPEC.frames, SPEC.height, SPEC.width, SPEC.steps, "dense", "density", 0.5, 1,
                        api_name="/generate")
    *_, details, density_plot, layer, head, mask_plot = job.result(timeout=JOB_TIMEOUT_S)
    assert "3 of 3 steps dense" in details and density_plot["plot"].startswith("data:image/")
    assert (layer["choices"], layer["value"], head["choices"], mask_plot) == ([], None, [], None)


@pytest.mark.parametrize("frames, budget, message", [
    (6, 0.5, r"takes 4k\+1 frames \(1, 5, 9, ...\); got 6: use 5 or 9"),     # the model's constraint
    (SPEC.frames, 1.5, "Value 1.5 is greater than maximum value 1.0"),       # the slider's range
])
def test_bad_input_reaches_the_client_as_a_gradio_error(client, frames, budget, message):
    job = client.submit("a fox", 0, frames, SPEC.height, SPEC.width, SPEC.steps, "adaptive", "density", budget, 1,
                        api_name="/generate")
    with pytest.raises(AppError, match=message):
        job.result(timeout=JOB_TIMEOUT_S)


def test_the_command_line_serves_on_loopback_after_a_warm_up_and_cleans_up(model, monkeypatch, transformer_calls):
    launches, closed = [], []
    close = DemoSession.close
    monkeypatch.setattr("dit_sparse.eval.harness.models.load_model", lambda name, device, dtype: model)
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kwargs: launches.append(kwargs))
    monkeypatch.setattr(DemoSession, "close", lambda self: (closed.append(self), close(self)))
    assert cli.main(["--port", "7999"]) == 0
    assert launches == [{"server_name": "127.0.0.1", "server_port": 7999, "share": False}]
    assert len(transformer_calls) == 1 + 2           # warm-up: one dense step; one dense and the first sparse step
    assert len(closed) == 1


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port must be >= 1, got 0"),
    (["--device", "cuda:9"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_the_command_line_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_reference_model_offers_its_prompts_and_the_detector_reads_both_videos():
    from dit_sparse.eval.harness.models import load_reference_model
    from dit_sparse.eval.reference import prompt_choices

    reference = load_reference_model(torch.device("cpu"), torch.float32)
    reference.pipe.set_progress_bar_config(disable=True)
    session = DemoSession(reference)
    try:
        assert session.prompts == prompt_choices()
        page = build_demo(session)
        (menu,) = [c for c in page.blocks.values() if getattr(c, "label", None) == "Prompt"]
        assert type(menu).__name__ == "Dropdown" and menu.allow_custom_value and menu.value == prompt_choices()[0]
        result = session.generate(DemoRequest("a red circle moving left on a black background", 0, 5, 32, 32, 3,
                                              "adaptive", density=0.5, dense_steps=1))
        assert result.readings is not None and 0.0 <= result.readings.agreement <= 1.0
        assert "The clip detector reads the dense video as" in _details(result)
    finally:
        session.close()


# Concurrent requests: each its own seed, pattern, budget and dense steps, so that a request that saw
# another's settings or plans would show it in its output.
CONCURRENT = [
    (21, "adaptive", "density", 0.5, 1),
    (22, "radial", "top_p", 0.9, 2),
    (23, "spatiotemporal", "density", 0.3, 1),
    (24, "dense", "density", 0.5, 1),
]


def generate_args(seed, pattern, budget, value, dense_steps):
    return ("a fox in the snow", seed, SPEC.frames, SPEC.height, SPEC.width, SPEC.steps, pattern, budget, value,
            dense_steps)


def submit_in_order(client, requests):
    """Submit every request before the first finishes, each one once the queue has taken the previous."""
    from gradio_client.utils import Status

    jobs = []
    for request in requests:
        job = client.submit(*generate_args(*request), api_name="/generate")
        while job.status().code in (Status.STARTING, Status.JOINING_QUEUE) and not job.done():
            time.sleep(0.01)
        jobs.append(job)
    return jobs


def what_it_shows(outputs):
    """What a generation's output depends on (its settings and plans), without timings or cache notes."""
    (_, sparse_video, _, _, _, psnr, ssim, details, _, layer, head, _) = outputs
    dense_steps = details.split("Sparse: ")[1].split(" steps dense")[0]
    return iio.imread(sparse_video, plugin="FFMPEG").tobytes(), psnr, ssim, dense_steps, layer["choices"], head["choices"]


class GenerateCalls(list):
    """``(event, seed)`` for every start and end of a generation; generations wait for ``all_queued``."""

    def __init__(self) -> None:
        super().__init__()
        self.all_queued = threading.Event()


@pytest.fixture
def generate_calls(session, monkeypatch):
    """The session's generations during the test, held back until the test has queued every request
    (so that they are in the queue together, whatever the machine's speed)."""
    calls = GenerateCalls()
    generate = session.generate

    def recorded(request):
        assert calls.all_queued.wait(JOB_TIMEOUT_S)
        calls.append(("start", request.seed))
        try:
            return generate(request)
        finally:
            calls.append(("end", request.seed))

    monkeypatch.setattr(session, "generate", recorded)
    return calls


@pytest.fixture(scope="module")
def alone(client):
    """What each of CONCURRENT shows when it is the only request."""
    return {request[0]: what_it_shows(client.submit(*generate_args(*request), api_name="/generate")
                                      .result(timeout=JOB_TIMEOUT_S)) for request in CONCURRENT}


@pytest.mark.parametrize("count", [2, 4])
def test_concurrent_requests_all_complete_in_order_each_with_its_own_settings(client, alone, generate_calls, model,
                                                                              count):
    requests = CONCURRENT[:count]
    jobs = submit_in_order(client, requests)
    generate_calls.all_queued.set()
    results = [job.result(timeout=JOB_TIMEOUT_S * count) for job in jobs]
    seeds = [request[0] for request in requests]
    assert generate_calls == [(event, seed) for seed in seeds for event in ("start", "end")]   # one at a time, FIFO
    for request, outputs in zip(requests, results):
        assert what_it_shows(outputs) == alone[request[0]]
    assert is_stock(model)


def test_a_failing_request_among_concurrent_ones_leaves_the_next_working(client, alone, generate_calls, model,
                                                                         monkeypatch):
    summaries = []

    def second_fails(*args):
        summaries.append(1)
        if len(summaries) == 2:
            raise RuntimeError("planner crashed")
        return summarize(*args)

    summarize = demo.summarize_sparse_run
    monkeypatch.setattr(demo, "summarize_sparse_run", second_fails)
    first, failing, after = submit_in_order(client, CONCURRENT[:3])
    generate_calls.all_queued.set()
    assert what_it_shows(first.result(timeout=JOB_TIMEOUT_S * 3)) == alone[CONCURRENT[0][0]]
    with pytest.raises(AppError, match="RuntimeError: planner crashed"):
        failing.result(timeout=JOB_TIMEOUT_S * 3)
    assert what_it_shows(after.result(timeout=JOB_TIMEOUT_S * 3)) == alone[CONCURRENT[2][0]]
    assert [seed for event, seed in generate_calls if event == "end"] == [21, 22, 23]
    assert is_stock(model)
