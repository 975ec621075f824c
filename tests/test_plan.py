"""The index plan: which index a collection gets from its size and a memory budget (pure)."""

from __future__ import annotations

import pytest

from harma.errors import ConfigError
from harma.retrieval import EXACT_BELOW, IndexPlan, plan_index
from harma.retrieval.plan import TRAIN_MAX


def test_small_collections_are_searched_exactly():
    assert plan_index(EXACT_BELOW - 1, 512).kind == "exact"
    assert plan_index(0, 512).kind == "exact"
    assert plan_index(EXACT_BELOW, 512).kind == "ivf_flat"


def test_one_million_in_8_gb_is_ivf_flat():
    p = plan_index(1_000_000, 512, 8.0)
    assert (p.kind, p.nlist, p.pq_m, p.refine) == ("ivf_flat", 4096, 0, "")
    assert p.memory_bytes == 1_000_000 * (4 * 512 + 8) + 4096 * 4 * 512
    assert p.factory_string() == "IVF4096_HNSW32,Flat"


def test_ten_million_in_8_gb_is_ivf_pq_with_sq8_refine():
    p = plan_index(10_000_000, 512, 8.0)
    assert (p.kind, p.nlist, p.pq_m, p.refine) == ("ivf_pq", 16384, 64, "sq8")
    assert p.memory_bytes <= 8e9 < 10_000_000 * (4 * 512 + 8)
    assert p.rerank > 0 and p.nprobe > 0
    assert p.train_size == TRAIN_MAX
    assert p.factory_string() == "IVF16384_HNSW32,PQ64 + SQ8 re-rank"
    assert "8 GB" in p.reason


def test_a_tighter_budget_gets_a_smaller_code():
    assert plan_index(1_000_000, 512, 1.0).kind == "ivf_pq"  # 2.06 GB of vectors
    assert plan_index(10_000_000, 512, 0.5).pq_m == 32  # (32 + 8) bytes x 10^7 = 0.4 GB
    tiny = plan_index(10_000_000, 512, 0.1)  # not even PQ16 fits: the smallest, said so
    assert tiny.pq_m == 16 and "over the budget" in tiny.reason


def test_code_size_divides_the_dimension_and_opq_is_named():
    assert plan_index(10_000_000, 96, 0.5).pq_m == 32
    assert plan_index(10_000_000, 100, 1.0).pq_m == 50  # no power of two divides 100: its largest divisor <= 64
    p = plan_index(10_000_000, 512, 8.0, opq=True)
    assert p.opq and p.factory_string().startswith("OPQ64,IVF16384")


def test_training_sample_is_bounded():
    for n in (150_000, 1_000_000, 50_000_000):
        p = plan_index(n, 512)
        assert min(n, 10_000) <= p.train_size <= min(n, TRAIN_MAX, max(10_000, 64 * p.nlist))
    assert plan_index(1_000_000, 512).train_size == 64 * 4096


def test_plan_round_trips_and_refuses_nonsense():
    p = plan_index(10_000_000, 512)
    assert IndexPlan.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match="unknown field"):
        IndexPlan.from_dict({**p.to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="kind"):
        IndexPlan("hnsw")
    with pytest.raises(ConfigError, match="nlist"):
        IndexPlan("ivf_flat", nlist=0)
    with pytest.raises(ConfigError, match="budget"):
        plan_index(10, 512, 0)
