"""plan_matrix: the one place a Dion matrix's step is decided, from shapes alone."""

import pytest
import torch

import torchdion
from torchdion.matrix_plan import DimShard, chunk, plan_matrix


def test_orientation_rank_and_sketch():
    plan = plan_matrix((64, 256), rank_fraction=0.25, rank_multiple_of=8)
    assert (plan.a, plan.b, plan.transposed) == (256, 64, True)
    assert plan.rank == 16 and plan.q_shape == (64, 16)
    assert plan.sketch_rows == 128  # 1.25 r rounded up to 128, at most a
    assert plan_matrix((64, 256), orthonormalize="qr").sketch_rows == 0
    assert plan_matrix((300, 100), rank_fraction=0.07, rank_multiple_of=1).rank == 7


def test_shards_pick_the_block_and_axis():
    # X (64, 256) is transposed: its dim 1 holds A's rows, its dim 0 A's columns
    plan = plan_matrix((64, 256), (DimShard(1, 3, 2, "tp"), DimShard(0, 2, 1, "fsdp")))
    assert plan.rows == chunk(256, 3, 2) == (172, 256)
    assert plan.cols == (32, 64)
    assert plan.groups == {"row": "tp", "col": "fsdp"}
    with pytest.raises(ValueError, match="not supported"):
        plan_matrix((64, 256), (DimShard(0, 2, 0), DimShard(0, 2, 1)))
    with pytest.raises(ValueError, match="rows sharded"):
        plan_matrix((64, 256), (DimShard(1, 2, 0),), orthonormalize="qr")


def test_replicas_get_factors_only_when_smaller():
    thin = plan_matrix((256, 64), rank_fraction=0.25, replicas="dp", replicas_size=2)
    assert thin.replica_sync == "factors" and thin.groups["replica"] == "dp"
    full = plan_matrix((256, 64), rank_fraction=1.0, replicas="dp", replicas_size=2)
    assert full.replica_sync == "gradient" and "replica" not in full.groups
    assert plan_matrix((256, 64), replicas="dp", replicas_size=1).replica_sync == "none"


def test_optimizer_caches_one_plan_per_parameter():
    ws = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))]
    opt = torchdion.Dion(ws, rank_fraction=0.5)
    plans = [opt.plan(w, opt.param_groups[0]) for w in ws]
    assert plans[0] == plans[1] and plans[0].rank == 4
    assert opt.plan(ws[0], opt.param_groups[0]) is plans[0]
