"""The issue's acceptance checks on a small synthetic benchmark (the full-size figures come from
``python -m dit_sparse.eval.studies.families``): at equal density, auto is as good as the best single
family on every head type and better than every single family on the mix; with the defaults (its
fallback on) it spends at most a tenth more for a lower error."""

import pytest
import torch.nn.functional as F

from dit_sparse import SparseAttentionConfig, sparse_attention
from dit_sparse.eval.synthetic import HEAD_TYPES, synthetic_attention
from dit_sparse.planner import FAMILIES, calibrate, plan_from_calibration

DENSITY = 0.15


@pytest.fixture(scope="module")
def errors():
    types = HEAD_TYPES * 2
    data = synthetic_attention((8, 24, 24), types, head_dim=32, seed=0)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (data.q, data.k, data.v))).transpose(1, 2)
    calibration = calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto", min_recall=0.0), v=data.v)

    def relative_error(out, kind):
        heads = [h for h, t in enumerate(types) if kind in ("mix", t)]
        return float((out[:, :, heads] - dense[:, :, heads]).norm() / dense[:, :, heads].norm())

    configs = {name: SparseAttentionConfig(pattern=name, density=DENSITY) for name in FAMILIES}
    configs["auto"] = SparseAttentionConfig(density=DENSITY, max_error=float("inf"))     # no fallback: equal density
    configs["auto (recall)"] = SparseAttentionConfig(density=DENSITY, min_recall=0.0)
    configs["auto (defaults)"] = SparseAttentionConfig(density=DENSITY)
    table = {}
    for name, config in configs.items():
        plan, _ = plan_from_calibration(calibration, config)
        out = sparse_attention(data.q, data.k, data.v, plan, backend="torch")
        table[name] = {kind: relative_error(out, kind) for kind in (*HEAD_TYPES, "mix")}
        table[name]["density"] = plan.density()
    return table


@pytest.mark.parametrize("kind", HEAD_TYPES)
def test_auto_is_as_good_as_the_best_family_on_each_head_type(errors, kind):
    best = min(errors[f][kind] for f in FAMILIES)
    assert errors["auto"][kind] <= 1.05 * best


def test_auto_beats_every_family_on_the_mix(errors):
    assert all(errors["auto"]["mix"] < errors[f]["mix"] for f in FAMILIES)
    assert errors["auto"]["mix"] <= errors["auto (recall)"]["mix"]
    assert errors["auto"]["mix"] < 0.2


def test_auto_defaults_spend_at_most_a_tenth_more_for_a_lower_error(errors):
    assert errors["auto"]["density"] <= DENSITY * 1.02
    assert errors["auto (defaults)"]["density"] <= 1.1 * errors["auto"]["density"] + 1e-6
    assert errors["auto (defaults)"]["mix"] <= errors["auto"]["mix"]
