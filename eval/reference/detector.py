"""Read a clip's words back from its frames: background, and each object's colour, shape and motion.

Every pixel goes to the nearest colour of the palette (objects and backgrounds). An object colour
that covers enough of the frame is an object; its shape comes from how much of its bounding box it
fills (square ~1, circle ~0.79, triangle ~0.5) and its motion from its centroid track and its area
(growing: the area at the end is several times the area at the start).

Example::

    >>> from dit_sparse.eval.reference.clips import clip_spec, render_clip
    >>> spec = clip_spec(0)
    >>> spec.prompt
    'a red circle moving up on a gray background'
    >>> detect(render_clip(spec, frames=29, height=64, width=64).numpy())
    Reading(background='gray', objects=(('red', 'circle', 'up'),))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clips import BACKGROUNDS, COLOURS, MOTION_WORDS, SHAPES, ClipSpec

MIN_AREA = 0.004         # an object covers at least this share of the frame (mean over frames)
MIN_SHARE = 0.25         # ... and at least this share of the largest object's area
STILL = 0.12             # centroid travel below this many frame widths is standing still
GROWTH = 2.5             # area at the end over area at the start above this is growing
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.64


@dataclass(frozen=True)
class Reading:
    """What the detector reads: the background and ``(colour, shape, motion)`` per object, sorted."""

    background: str
    objects: tuple[tuple[str, str, str], ...]

    @classmethod
    def of(cls, spec: ClipSpec) -> Reading:
        """The reading a perfect detector gives for ``spec``."""
        return cls(spec.background, tuple(sorted((o.colour, o.shape, o.motion) for o in spec.objects)))


def detect(video: np.ndarray) -> Reading:
    """The :class:`Reading` of ``video``, ``(frames, height, width, 3)`` floats in ``[0, 1]``."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected (frames, height, width, 3) RGB frames, got shape {video.shape}")
    names = [*COLOURS, *BACKGROUNDS]
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)
    distance = ((video[..., None, :] - palette) ** 2).sum(-1)
    label = distance.argmin(-1)                                           # (F, H, W)
    frames, height, width = label.shape
    background_counts = np.bincount(label.ravel(), minlength=len(names))[len(COLOURS):]
    background = names[len(COLOURS) + int(background_counts.argmax())]

    areas = np.stack([(label == i).reshape(frames, -1).mean(1) for i in range(len(COLOURS))])   # (colours, F)
    mean_area = areas.mean(1)
    largest = mean_area.max()
    found = [i for i in np.argsort(-mean_area)[:2] if mean_area[i] >= MIN_AREA and mean_area[i] >= MIN_SHARE * largest]
    objects = tuple(sorted((names[i], _shape(label == i), _motion(label == i, areas[i])) for i in found))
    return Reading(background, objects)


def _shape(mask: np.ndarray) -> str:
    """Shape from the median fill of the bounding box over the frames where the object is big enough."""
    fills = []
    for frame in mask:
        rows, cols = np.nonzero(frame)
        if len(rows) < 12:
            continue
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(len(rows) / box)
    if not fills:
        return "circle"
    fill = float(np.median(fills))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def _motion(mask: np.ndarray, area: np.ndarray) -> str:
    """Motion from the centroids and areas of the first and the last third of the frames."""
    frames, height, width = mask.shape
    third = max(1, frames // 3)
    start, end = area[:third].mean(), area[-third:].mean()
    if start > 0 and end / start > GROWTH:
        return "growing"
    ys, xs = np.mgrid[0:height, 0:width] / width

    def centroid(frame_masks: np.ndarray) -> np.ndarray:
        weight = frame_masks.sum()
        if weight == 0:
            return np.array([np.nan, np.nan])
        return np.array([(frame_masks * xs).sum(), (frame_masks * ys).sum()]) / weight

    dx, dy = centroid(mask[-third:]) - centroid(mask[:third])
    if not np.isfinite(dx) or max(abs(dx), abs(dy)) < STILL:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def attribute_matches(truth: Reading, reading: Reading) -> dict[str, list[bool]]:
    """Per attribute, one entry per object of ``truth``: whether ``reading`` has an object of that
    colour (``colour``), and of that colour with the same shape (``shape``) and motion (``motion``);
    ``background`` has one entry.

    Example::

        >>> truth = Reading("black", (("red", "circle", "left"),))
        >>> attribute_matches(truth, Reading("black", (("red", "square", "left"),)))
        {'background': [True], 'colour': [True], 'shape': [False], 'motion': [True]}
    """
    found = {colour: (shape, motion) for colour, shape, motion in reading.objects}
    matches: dict[str, list[bool]] = {"background": [truth.background == reading.background],
                                      "colour": [], "shape": [], "motion": []}
    for colour, shape, motion in truth.objects:
        read = found.get(colour)
        matches["colour"].append(read is not None)
        matches["shape"].append(read is not None and read[0] == shape)
        matches["motion"].append(read is not None and read[1] == motion)
    return matches


def parse_prompt(prompt: str) -> Reading | None:
    """The :class:`Reading` a prompt in the clips' own phrasing asks for; ``None`` for any other text.

    Example::

        >>> parse_prompt("a red circle moving left and a blue square growing on a gray background")
        Reading(background='gray', objects=(('blue', 'square', 'growing'), ('red', 'circle', 'left')))
        >>> parse_prompt("a cat surfing a wave") is None
        True
    """
    words = {phrase: motion for motion, phrase in MOTION_WORDS.items()}
    objects_part, separator, background = prompt.strip().lower().rpartition(" on a ")
    background = background.removesuffix(" background")
    if not separator or background not in BACKGROUNDS:
        return None
    objects = []
    for part in objects_part.split(" and "):
        fields = part.split(maxsplit=3)
        if len(fields) != 4 or fields[0] != "a" or fields[1] not in COLOURS or fields[2] not in SHAPES \
                or fields[3] not in words:
            return None
        objects.append((fields[1], fields[2], words[fields[3]]))
    return Reading(background, tuple(sorted(objects)))
