import pytest

from dit_sparse import SparseAttentionConfig
from dit_sparse.schedule import Phase, StepClock, StepSchedule

D, C, S = Phase.DENSE, Phase.CALIBRATE, Phase.SPARSE


def phases(config: SparseAttentionConfig, total: int | None, steps, first_step: int = 0, layer: int = 1):
    schedule = StepSchedule(config, total)
    return [schedule.phase(step, first_step, layer) for step in steps]


def test_clock_counts_distinct_timesteps_and_repeats_for_cfg():
    clock = StepClock()
    seen = []
    for t in (999.0, 999.0, 900.0, 900.0, 500.0, 1.0):  # cond + uncond at the first two steps
        clock.advance(None, t)
        seen.append(clock.step)
    assert seen == [0, 0, 1, 1, 2, 3]


def test_clock_larger_timestep_starts_a_new_generation():
    clock = StepClock()
    assert clock.advance(None, 999.0)
    assert not clock.advance(None, 500.0)
    assert clock.advance(None, 999.0) and clock.step == 0


def test_clock_takes_step_index_at_its_word():
    clock = StepClock()
    assert clock.advance(0, 999.0)
    assert not clock.advance(3, 10.0) and clock.step == 3  # indices may jump (a second expert starts late)
    assert clock.advance(0, 999.0)  # back to the start: a new generation
    clock.reset()
    assert clock.step is None and clock.advance(2, None)


def test_clock_needs_a_step_index_or_a_timestep():
    with pytest.raises(ValueError, match="neither a step_index"):
        StepClock().advance(None, None)


def test_warm_up_calibrates_at_its_last_step_then_runs_sparse():
    config = SparseAttentionConfig(dense_steps=3)
    assert phases(config, 8, range(8)) == [D, D, C, S, S, S, S, S]


def test_fraction_of_the_run_and_last_steps():
    config = SparseAttentionConfig(dense_steps=0.25, dense_last_steps=2)
    assert phases(config, 8, range(8)) == [D, C, S, S, S, S, D, D]


def test_warm_up_counts_from_the_first_call_of_a_transformer():
    config = SparseAttentionConfig(dense_steps=2)
    assert phases(config, 10, range(4, 10), first_step=4) == [D, C, S, S, S, S]


def test_no_calibration_when_no_sparse_step_follows():
    assert phases(SparseAttentionConfig(dense_steps=4), 4, range(4)) == [D] * 4
    assert phases(SparseAttentionConfig(dense_steps=2, dense_last_steps=2), 4, range(4)) == [D] * 4


def test_dense_layers_dense_pattern_and_recalibration():
    config = SparseAttentionConfig(dense_steps=1, dense_layers=(0, 2), recalibrate_at=(3,))
    assert phases(config, 5, range(5), layer=1) == [C, S, S, C, S]
    assert phases(config, 5, range(5), layer=2) == [D] * 5
    assert phases(SparseAttentionConfig(pattern="dense", dense_steps=0), 5, range(5)) == [D] * 5


def test_zero_dense_steps_runs_sparse_from_the_start():
    assert phases(SparseAttentionConfig(dense_steps=0), 3, range(3)) == [S, S, S]


def test_unknown_run_length():
    assert phases(SparseAttentionConfig(dense_steps=2), None, range(4)) == [D, C, S, S]
    with pytest.raises(ValueError, match="fraction of the run.*num_inference_steps"):
        StepSchedule(SparseAttentionConfig(dense_steps=0.25), None)
    with pytest.raises(ValueError, match="dense_last_steps needs the run's total steps"):
        StepSchedule(SparseAttentionConfig(dense_steps=2, dense_last_steps=1), None)
    assert phases(SparseAttentionConfig(pattern="dense", dense_steps=0.25), None, range(2)) == [D, D]
