"""VBench scores for the dense and sparse videos, through an optional bridge to the ``vbench`` package.

``vbench`` (0.1.5 on PyPI) pins ``transformers==4.33.2`` and ``numpy<2``, so it is never a dependency
of dit-sparse: it may live in another environment. The bridge finds an interpreter that has it (the
``--vbench-python`` flag, else ``$DIT_SPARSE_VBENCH_PYTHON``, else this one), checks that each
requested dimension's weights are already under ``$VBENCH_CACHE_DIR`` (default ``~/.cache/vbench``),
and runs :mod:`dit_sparse.eval.vbench_job` there, one folder of mp4s per variant. Dimensions whose
weights are missing are skipped with the paths to fill; nothing is ever downloaded.

``temporal_flickering`` needs no weights and always runs: through VBench when it is installed
(on the mp4s, as VBench reads them), otherwise with :func:`dit_sparse.eval.metrics.temporal_flickering`
(VBench's definition, on the raw frames quantised to 8 bits), labelled as such.

To enable everything (another environment keeps VBench's pins away from this one)::

    python -m venv ~/vbench-env && ~/vbench-env/bin/pip install vbench   # its README lists extras (detectron2 …)
    export DIT_SPARSE_VBENCH_PYTHON=~/vbench-env/bin/python VBENCH_CACHE_DIR=/data/vbench-weights
    # place the weights listed by the skip messages under $VBENCH_CACHE_DIR

Example::

    >>> plan = plan_vbench(["subject_consistency"], python=None)      # doctest: +SKIP
    >>> plan.skipped["subject_consistency"]                             # doctest: +SKIP
    'skipped: vbench is not installed ...'
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ALWAYS_RUN = "temporal_flickering"
PYTHON_ENV = "DIT_SPARSE_VBENCH_PYTHON"
OWN_FLICKER_SOURCE = "dit-sparse implementation of VBench's definition, on raw frames quantised to 8 bits"

# Files VBench 0.1.5 loads in local mode, relative to VBENCH_CACHE_DIR (vbench/utils.py, init_submodules).
WEIGHTS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    ALWAYS_RUN: (),
}
# Dimensions that need VBench's own prompt suite and its auxiliary annotations.
PROMPT_SUITE_ONLY = ("object_class", "multiple_objects", "color", "spatial_relationship", "scene", "appearance_style")


def vbench_cache_dir() -> Path:
    """``$VBENCH_CACHE_DIR``, or VBench's default ``~/.cache/vbench``."""
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


@dataclass
class VBenchPlan:
    """What the bridge will do.

    Attributes:
        python: interpreter that has ``vbench`` (``None`` when none was found).
        version: its ``vbench`` version.
        runnable: dimensions VBench will score.
        skipped: dimension -> a ``"skipped: ..."`` message naming what is missing and how to enable it.
        cache_dir: where the weights were looked for.
    """

    python: str | None
    version: str | None
    runnable: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    cache_dir: Path = field(default_factory=vbench_cache_dir)

    @property
    def flicker_source(self) -> str:
        """Who computes ``temporal_flickering``."""
        return f"vbench {self.version} on the mp4s" if ALWAYS_RUN in self.runnable else OWN_FLICKER_SOURCE


def check_dimensions(dimensions: list[str]) -> list[str]:
    """Validated, de-duplicated dimensions with ``temporal_flickering`` added (``"all"``: every one
    that custom prompts support)."""
    if "all" in dimensions:
        dimensions = list(WEIGHTS)
    suite_only = [d for d in dimensions if d in PROMPT_SUITE_ONLY]
    if suite_only:
        raise ValueError(
            f"VBench dimensions {', '.join(suite_only)} need VBench's own prompt suite and cannot score custom "
            f"prompts; choose from {', '.join(WEIGHTS)}"
        )
    unknown = [d for d in dimensions if d not in WEIGHTS]
    if unknown:
        raise ValueError(f"unknown VBench dimensions {', '.join(unknown)}; choose from {', '.join(WEIGHTS)} or 'all'")
    return list(dict.fromkeys([*dimensions, ALWAYS_RUN]))


def plan_vbench(dimensions: list[str], python: str | None = None, timeout_s: float = 120.0) -> VBenchPlan:
    """Find VBench and its weights for ``dimensions`` (see :func:`check_dimensions`), without running it.

    ``python``: the interpreter to use; default ``$DIT_SPARSE_VBENCH_PYTHON``, else this one when
    it has ``vbench``. ``timeout_s`` bounds the probe of an external interpreter.
    """
    dimensions = check_dimensions(dimensions)
    python = python or os.environ.get(PYTHON_ENV) or (sys.executable if importlib.util.find_spec("vbench") else None)
    version, missing_reason = _probe(python, timeout_s) if python else (None, _not_installed_reason())
    plan = VBenchPlan(python=python if version else None, version=version)
    for dim in dimensions:
        if version is None:
            if dim != ALWAYS_RUN:
                plan.skipped[dim] = missing_reason
            continue
        missing = [str(plan.cache_dir / rel) for rel in WEIGHTS[dim] if not (plan.cache_dir / rel).exists()]
        if missing:
            plan.skipped[dim] = (
                f"skipped: weights not found at {', '.join(missing)}; place VBench's {dim} weights there "
                f"(or point VBENCH_CACHE_DIR at a folder that has them)"
            )
        else:
            plan.runnable.append(dim)
    return plan


def score_folders(
    plan: VBenchPlan,
    folders: dict[str, Path],
    prompts: dict[str, str],
    work_dir: Path,
    device: str,
    timeout_s: float = 6 * 3600.0,
) -> dict[str, dict[str, float]]:
    """Run VBench on each folder of mp4s (``variant -> folder``); ``prompts`` maps each file name in
    a folder to its prompt. Returns ``variant -> dimension -> mean score``."""
    if not plan.runnable:
        return {variant: {} for variant in folders}
    job_script = Path(__file__).with_name("vbench_job.py")
    env = {**os.environ, "VBENCH_CACHE_DIR": str(plan.cache_dir), "HF_HUB_OFFLINE": "1"}
    scores: dict[str, dict[str, float]] = {}
    for variant, folder in folders.items():
        job = {"videos": str(folder), "prompts": prompts, "dimensions": plan.runnable, "device": device,
               "work_dir": str(work_dir), "name": variant}
        done = subprocess.run([plan.python, str(job_script)], input=json.dumps(job), text=True, env=env,
                              capture_output=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"VBench failed on {folder} (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results = json.loads((work_dir / f"{variant}_eval_results.json").read_text())
        scores[variant] = {dim: float(results[dim][0]) for dim in plan.runnable}
    return scores


def _probe(python: str, timeout_s: float) -> tuple[str | None, str]:
    """``(vbench version, "")`` if ``python`` has vbench, else ``(None, reason)``."""
    code = "import importlib.metadata as m; print(m.version('vbench'))"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"skipped: could not run {python} to look for vbench ({error}); {_how_to_enable()}"
    if done.returncode != 0:
        return None, f"skipped: vbench is not installed for {python}; {_how_to_enable()}"
    return done.stdout.strip(), ""


def _not_installed_reason() -> str:
    return f"skipped: vbench is not installed; {_how_to_enable()}"


def _how_to_enable() -> str:
    return (
        f"install it in its own environment (pip install vbench) and give that interpreter with --vbench-python "
        f"or ${PYTHON_ENV}, with the weights under $VBENCH_CACHE_DIR (see docs/eval.md)"
    )
