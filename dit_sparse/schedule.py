"""Time: which denoising step a transformer call belongs to, and what each self-attention call does
at that step (dense, dense + calibration, or sparse)."""

from __future__ import annotations

from enum import Enum

from .config import SparseAttentionConfig


class Phase(Enum):
    """What one self-attention call does."""

    DENSE = "dense"
    CALIBRATE = "calibrate"  # dense output, and the call's q and k are measured to build a plan
    SPARSE = "sparse"


class StepClock:
    """Counts denoising steps from what each transformer call carries.

    A pipeline that passes ``step_index`` in its cache context (Wan) is taken at its word. Otherwise
    the ``timestep`` argument decides: the same value is the same step (classifier-free guidance as
    two calls), a smaller one the next step, a larger one the first step of a new generation. Any
    scheduler works, DDIM included (it has no ``step_index``).

    Example::

        >>> clock = StepClock()
        >>> [clock.advance(None, t) for t in (999.0, 999.0, 750.0, 999.0)], clock.step
        ([True, False, False, True], 0)
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._timestep: float | None = None

    def advance(self, step_index: int | None, timestep: float | None) -> bool:
        """Move to the step of a new transformer call; ``True`` when the call starts a new generation."""
        if step_index is not None:
            new_generation = self.step is None or step_index < self.step
            self.step, self._timestep = step_index, timestep
            return new_generation
        if timestep is None:
            raise ValueError("a transformer call carries neither a step_index (cache context) nor a timestep")
        if self.step is None or self._timestep is None or timestep > self._timestep:
            self.step, self._timestep = 0, timestep
            return True
        if timestep < self._timestep:
            self.step += 1
            self._timestep = timestep
        return False

    def reset(self) -> None:
        self.step = None
        self._timestep = None


class StepSchedule:
    """The dense / calibrate / sparse decision of one generation.

    ``dense_steps`` count from each transformer's (and CFG context's) first call, so a second expert
    (Wan 2.2's ``transformer_2``) gets its own warm-up; the last of them calibrates, unless no sparse
    step can follow. ``dense_last_steps`` and ``recalibrate_at`` are steps of the whole run, as the
    pipeline numbers them.

    Args:
        config: the user's configuration.
        total_steps: steps of the run; needed when ``dense_steps`` is a fraction or
            ``dense_last_steps`` is set (unless the pattern is ``"dense"``), optional otherwise.

    Example::

        >>> schedule = StepSchedule(SparseAttentionConfig(dense_steps=0.25, dense_layers=()), total_steps=8)
        >>> [schedule.phase(step, first_step=0, layer=0).value for step in range(4)]
        ['dense', 'calibrate', 'sparse', 'sparse']
    """

    def __init__(self, config: SparseAttentionConfig, total_steps: int | None) -> None:
        if total_steps is None and config.pattern != "dense":
            if isinstance(config.dense_steps, float):
                raise ValueError(
                    f"dense_steps={config.dense_steps} is a fraction of the run, but this call does not say how many "
                    "steps the run has: apply dit-sparse to the pipeline (not the bare transformer), call the "
                    "transformer inside cache_context(name, num_inference_steps=N), or give dense_steps as an int"
                )
            if config.dense_last_steps:
                raise ValueError(
                    "dense_last_steps needs the run's total steps, which this call does not carry: apply dit-sparse "
                    "to the pipeline or call the transformer inside cache_context(name, num_inference_steps=N)"
                )
        self.total_steps = total_steps
        self.dense_steps = config.dense_steps if total_steps is None else config.num_dense_steps(total_steps)
        self.sparse_until = None if total_steps is None else total_steps - config.dense_last_steps
        self.always_dense = config.pattern == "dense"
        self.dense_layers = frozenset(config.dense_layers)
        self.recalibrate_at = frozenset(config.recalibrate_at)

    def calibration_step(self, step: int, first_step: int) -> int:
        """The calibration step whose plans serve run step ``step`` of a transformer/context first
        called at ``first_step``: the latest ``recalibrate_at`` step reached, else the last warm-up
        step (the first step when there is no warm-up). A layer that did not run at that step (a step
        cache such as FirstBlockCache skipped it) calibrates at its next call instead.

        Example::

            >>> schedule = StepSchedule(SparseAttentionConfig(dense_steps=2, recalibrate_at=(5,)), total_steps=8)
            >>> [schedule.calibration_step(step, first_step=0) for step in (1, 4, 5, 7)]
            [1, 1, 5, 5]
        """
        warm_up_end = first_step + self.dense_steps
        warm_up = max(first_step, warm_up_end - 1)
        return max((s for s in self.recalibrate_at if warm_up_end <= s <= step), default=warm_up)

    def phase(self, step: int, first_step: int, layer: int) -> Phase:
        """What layer ``layer`` does at run step ``step`` of a transformer/context first called at ``first_step``."""
        if self.always_dense or layer in self.dense_layers:
            return Phase.DENSE
        if self.sparse_until is not None and step >= self.sparse_until:
            return Phase.DENSE
        warm_up_end = first_step + self.dense_steps
        if step >= warm_up_end:
            return Phase.CALIBRATE if step in self.recalibrate_at else Phase.SPARSE
        if step == warm_up_end - 1 and (self.sparse_until is None or warm_up_end < self.sparse_until):
            return Phase.CALIBRATE
        return Phase.DENSE
