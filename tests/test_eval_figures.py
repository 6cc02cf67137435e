"""What the eval's pictures and videos show: one convention for block masks (kept = bright, with a
legend) in the eval, the demo and the docs, labelled side-by-side videos, and a wall-time figure
instead of a one-dot speed/quality plot."""

import argparse
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image, ImageDraw, ImageFont

from dit_sparse.eval.evaluation import overview_figures
from dit_sparse.eval.studies import mask_pictures
from dit_sparse.eval.studies.common import add_out_argument
from dit_sparse.eval.studies.mask_pictures import draw, pictures
from dit_sparse.eval.plots import mask_figure
from dit_sparse.eval.videos import LABEL_PX, SEPARATOR_PX, label_band, side_by_side

WHITE, BLACK, GREY = to_rgba("white"), to_rgba("black"), to_rgba("0.5")


def _colour(image, value) -> tuple:
    return tuple(np.round(image.cmap(image.norm(value)), 2))


def _legend(fig) -> dict[str, tuple]:
    (legend,) = fig.legends
    return {text.get_text(): tuple(np.round(patch.get_facecolor(), 2))
            for text, patch in zip(legend.get_texts(), legend.get_patches(), strict=True)}


def test_eval_and_demo_masks_draw_kept_blocks_white_with_a_legend():
    fig = mask_figure(np.eye(4)[None].repeat(2, axis=0), "radial: layer 1")
    image = fig.axes[0].images[0]
    assert _colour(image, 1.0) == WHITE and _colour(image, 0.0) == BLACK
    assert _legend(fig) == {"kept": WHITE, "skipped": BLACK}


def test_docs_mask_pictures_follow_the_same_convention():
    panels = pictures((2, 8, 8), text_len=16, density=0.3, block_size=16, seed=0)
    fig = draw(panels, "tiny", text_blocks=True)
    image = fig.axes[0].images[0]
    picture = image.get_array()
    assert _colour(image, picture.max()) == WHITE and _colour(image, picture.min()) == BLACK
    assert set(np.unique(picture)) == {0.0, 0.5, 1.0}                     # skipped, text, kept
    assert _legend(fig) == {"kept": WHITE, "skipped": BLACK, "text (always kept)": GREY}
    assert list(_legend(draw(panels, "no text", text_blocks=False))) == ["kept", "skipped"]


def test_a_study_writes_under_its_out_folder_default_docs_under_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mask_pictures.main(["--grid", "1", "8", "8", "--text", "0", "--block-size", "16", "--output", "tiny",
                        "--out", "study-out"])
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == ["study-out/img/tiny.png"]
    parser = argparse.ArgumentParser()
    add_out_argument(parser)
    assert parser.parse_args([]).out == Path("docs")  # relative: the docs of the folder it runs from


def test_side_by_side_keeps_both_videos_under_their_labels():
    rng = np.random.default_rng(0)
    dense, sparse = rng.random((2, 3, 32, 48, 3), dtype=np.float32)
    video = side_by_side(dense, sparse)
    assert video.shape == (3, LABEL_PX + 32, 2 * 48 + SEPARATOR_PX, 3)
    np.testing.assert_array_equal(video[:, LABEL_PX:, :48], dense)
    np.testing.assert_array_equal(video[:, LABEL_PX:, 48 + SEPARATOR_PX:], sparse)
    for band, label in ((video[0, :LABEL_PX, :48], "dense"), (video[0, :LABEL_PX, 48 + SEPARATOR_PX:], "sparse")):
        np.testing.assert_array_equal(band, label_band(label, 48))
    assert not np.array_equal(label_band("dense", 48), label_band("sparse", 48))


@pytest.mark.parametrize("text", ["dense", "sparse"])
def test_a_label_is_its_text_drawn_in_pillows_default_font(text):
    band = label_band(text, 64)[:, :, 0]
    reference = Image.new("L", (64, LABEL_PX), 255)
    ImageDraw.Draw(reference).text((32, LABEL_PX / 2), text, fill=0, font=ImageFont.load_default(size=12), anchor="mm")
    np.testing.assert_allclose(band, np.asarray(reference) / 255.0)
    narrow = label_band(text, 24)[:, :, 0]                       # shrunk to fit: no ink on the outer columns
    assert narrow.min() < 0.5 and narrow[:, 0].min() == 1.0 and narrow[:, -1].min() == 1.0


def _results(configs: int) -> dict:
    timing = {"wall_seconds": 2.0, "attention_seconds": {"self": 1.5, "cross": 0.1}}
    config = {"wall_seconds": 1.0, "attention_seconds": {"self": 0.5}, "speedup": 2.0,
              "fidelity": {"psnr_frame_mean": 40.0}}
    return {"dense": timing, "configs": [config | {"label": f"config {i}"} for i in range(configs)]}


def test_one_config_gets_a_wall_time_figure_and_no_single_dot_plot():
    figures = overview_figures(_results(1))
    assert [name for _, name in figures.values()] == ["wall_time.png"]
    fig, _ = figures["wall time, self-attention and the rest"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["2.00 s", "1.00 s, 2.00x"]
    bars = [(round(p.get_x(), 3), round(p.get_width(), 3)) for p in fig.axes[0].patches]
    assert bars == [(0.0, 1.5), (0.0, 0.5), (1.5, 0.5), (0.5, 0.5)]       # self-attention, then the rest


def test_two_configs_also_get_speedup_against_psnr():
    names = [name for _, name in overview_figures(_results(2)).values()]
    assert names == ["wall_time.png", "speedup_vs_psnr.png"]
