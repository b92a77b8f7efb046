"""The planner: Dion bytes equal the ledger's, exactly; the cost model; the command and plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from torchdion.plan import (
    PRESETS,
    Cluster,
    DionConfig,
    Parallelism,
    Param,
    adamw_collectives,
    default_parallelism,
    dion_collectives,
    ledger,
    params_from_module,
    params_from_shapes,
    predict,
    predict_comm_time,
)
from torchdion.plan.cli import main
from torchdion.plan.collectives import fsdp_collectives
from torchdion.plan.report import plot

WORKER = Path(__file__).with_name("plan_worker.py")


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    """Every rank of every layout over the fake process group, and a real 2-process gloo run,
    launched together."""
    tmp = tmp_path_factory.mktemp("plan")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [[str(WORKER), "fake", str(tmp / "fake.json")]] + [
        [str(WORKER), "gloo", str(r), "2", str(tmp / "store"), str(tmp / f"gloo{r}.json")]
        for r in range(2)]
    procs = [subprocess.Popen([sys.executable, *c], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    for p, c in zip(procs, commands):
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"{c} failed:\n{log[-4000:]}"
    results = []
    for name in ("fake.json", "gloo0.json", "gloo1.json"):
        for r in json.loads((tmp / name).read_text()):
            results.append({**r, "source": name.split(".")[0].rstrip("01")})
    return results


def test_every_layout_and_rank_is_covered(measured):
    seen = {(r["source"], r["world"], r["name"]) for r in measured}
    for world, names in ((2, ("ddp", "ddp_full", "fsdp", "tp", "moe_fsdp")),
                         (4, ("ddp", "fsdp", "hsdp", "fsdp_tp", "moe_fsdp", "moe_hsdp",
                              "moe_fsdp_tp")), (8, ("hsdp_tp",))):
        for name in names:
            assert ("fake", world, name) in seen
    assert {("gloo", 2, n) for n in ("ddp", "fsdp", "tp")} <= seen
    ranks = {(r["world"], r["rank"]) for r in measured if r["source"] == "fake"}
    assert ranks == {(w, r) for w in (2, 4, 8) for r in range(w)}
    # Dion2 and torchdion's Muon too, with their Newton-Schulz Grams over sharded rows
    fake = [r for r in measured if r["source"] == "fake"]
    assert {r["algorithm"] for r in fake} == {"dion", "dion2", "muon"}
    assert any("gram" in r["measured"]["by_kind"] for r in fake if r["algorithm"] == "dion2")


def test_predicted_ledger_equals_measured(measured):
    for r in measured:
        # bytes, number of collectives, and bytes / collectives / elements of every kind
        assert r["predicted"] == r["measured"], r


def test_predicted_elements_equal_design_formulas(measured):
    # dist_worker.expected_elements (docs/design.md section 2); it counts a Gram for "qr", which
    # orthonormalizes locally and sends none, so "qr" is checked against the ledger alone.
    for r in measured:
        if r["method"] != "qr":
            elements = {k: v["elements"] for k, v in r["predicted"]["by_kind"].items()}
            assert elements == r["formula"], r


def test_gloo_run_is_float32_and_compressed(measured):
    gloo = [r for r in measured if r["source"] == "gloo"]
    assert len(gloo) == 6
    ddp = next(r for r in gloo if r["name"] == "ddp")
    assert ddp["measured"]["by_kind"]["P"]["bytes"] == 4 * ddp["measured"]["by_kind"]["P"][
        "elements"]


def test_chunks_follow_torch_chunk():
    # Over FSDP 4: 70 rows split 18, 18, 18, 16; 3 rows split 1, 1, 1, 0 (an empty shard).
    params = [Param("w", (70, 30), True), Param("h", (3, 30), True)]
    par = Parallelism(dp=2, fsdp=4)
    cfg = DionConfig(0.25, method="cholesky")  # r = 8 for w, 1 for h
    ps = [ledger(dion_collectives(params, par, cfg, rank))["by_kind"] for rank in range(4)]
    # w: rows over FSDP, P over replicas (a_loc r), R over rows (2 b r: with the Nesterov
    # lookahead, Dion's default, B^T P travels beside C^T P) and replicas (b r);
    # h (canonical 30 x 3): columns over FSDP, P over columns and replicas, R over replicas
    assert [p["P"]["elements"] for p in ps] == [18 * 8 + 60] * 3 + [16 * 8 + 60]
    assert [p["R"]["elements"] for p in ps] == [3 * 30 * 8 + 1] * 3 + [3 * 30 * 8]
    plain = [ledger(dion_collectives(params, par, replace(cfg, nesterov=False), rank))["by_kind"]
             for rank in range(4)]
    assert [p["R"]["elements"] for p in plain] == [2 * 30 * 8 + 1] * 3 + [2 * 30 * 8]
    assert [p["norms"]["elements"] for p in ps] == [1] * 4


def test_ring_all_reduce_time_is_the_alpha_beta_formula():
    params = params_from_shapes([(1000,)])  # one element-wise tensor: a gradient all-reduce
    p, n, bw, lat = 8, 4000, 1e9, 1e-5
    t = predict_comm_time(params, p, bw, lat, optimizer="adamw")
    assert t == pytest.approx(2 * (p - 1) * lat + 2 * (p - 1) / p * n / bw)
    tree = Cluster(gpus_per_node=8, intra_bw=bw, intra_lat=lat, allreduce="tree")
    c = adamw_collectives(params, Parallelism(dp=p))[0]
    from torchdion.plan import collective_time
    assert collective_time(c, Parallelism(dp=p), tree) == pytest.approx(
        2 * math.log2(p) * lat + 2 * (p - 1) / p * n / bw)


def test_groups_beyond_a_node_use_the_inter_node_link():
    params = params_from_shapes([(1 << 20,)])
    cluster = Cluster(gpus_per_node=8, intra_bw=100e9, inter_bw=10e9, intra_lat=0, inter_lat=0)
    within = predict(params, Parallelism(dp=8), cluster, "adamw").comm_time
    across = predict(params, Parallelism(dp=16), cluster, "adamw").comm_time
    assert across / within == pytest.approx(10 * (15 / 16) / (7 / 8))


def test_dion_compressed_ddp_sends_p_and_r_and_falls_back_where_it_saves_nothing():
    params = params_from_shapes([(768, 768), (2, 2)])
    out = ledger(dion_collectives(params, Parallelism(dp=4), DionConfig(0.25)))
    r = 192
    assert out["by_kind"]["P"]["elements"] == 768 * r
    assert out["by_kind"]["R"]["elements"] == 768 * r
    assert out["by_kind"]["grad"]["elements"] == 4  # (2 + 2) * 1 >= 2 * 2: the gradient instead


def test_presets_and_default_layouts():
    counts = {name: sum(p.numel for p in cfg.params()) for name, cfg in PRESETS.items()}
    assert counts["gpt2-small"] == 124_439_808
    assert 2.8e9 < counts["gpt-3b"] < 3.0e9
    assert 405e9 < counts["llama3-405b"] < 406e9
    assert 46.6e9 < counts["mixtral-8x7b"] < 46.8e9  # 8 experts of 3 stacked (E, ., .) weights
    experts = [p for p in PRESETS["mixtral-8x7b"].params() if p.stacked]
    assert len(experts) == 3 * 32 and experts[0].shape == (8, 14336, 4096)
    cluster = Cluster()
    assert default_parallelism(PRESETS["gpt2-small"].params(), 64, cluster) == Parallelism(dp=64)
    big = default_parallelism(PRESETS["llama3-405b"].params(), 16384, cluster)
    assert big.tp == 8 and big.world == 16384 and big.fsdp > 1


def test_params_from_module_sorts_like_param_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6),
                                torch.nn.LayerNorm(6))
    params = {p.name: p for p in params_from_module(model, tp_dims={"1.weight": 0})}
    assert not params["0.weight"].matrix and params["1.weight"].matrix
    assert params["1.weight"].tp_dim == 0 and not params["1.bias"].matrix
    with pytest.raises(ValueError, match="no parameter"):
        params_from_module(model, tp_dims={"nope": 0})


def test_cli_prints_a_table(capsys):
    assert main(["--model", "gpt2-small", "--gpus", "8", "64", "--rank-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | GPUs | layout | optimizer |")
    rows = [line for line in out.splitlines() if line.startswith("| gpt2-small")]
    assert len(rows) == 2 * 4  # AdamW, Muon, Dion r=1/4, Dion2 1/4 (the default)
    assert any("Dion r=1/4" in row for row in rows)
    assert any("Dion2 1/4" in row for row in rows)
    assert "average the whole gradient" in out


def test_cli_takes_shapes_and_a_layout(capsys):
    assert main(["--shapes", "512x256,256x512,256", "--layout", "2x2x2"]) == 0
    out = capsys.readouterr().out
    assert "DP2 x FSDP2 x TP2" in out


def test_plot_is_written(tmp_path):
    path = tmp_path / "scaling.png"
    plot({"gpt2-small": PRESETS["gpt2-small"].params()}, Cluster(), [DionConfig(0.25)],
         str(path), gpus=(8, 64))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fsdp_row_counts_its_own_gathers_and_reduce_scatter():
    params = params_from_shapes([(70, 30)])
    par = Parallelism(fsdp=4)
    fsdp = predict(params, par, Cluster(), "fsdp")
    # two all-gathers of the 18 x 30 shard and one reduce-scatter of the whole 70 x 30 gradient
    assert fsdp.collectives == 3
    assert fsdp.payload_bytes == 4 * (2 * 18 * 30 + 70 * 30)
    assert fsdp.wire_bytes == pytest.approx(4 * (2 * 3 * 18 * 30 + 3 / 4 * 70 * 30))


def test_moe_preset_experts_split_over_fsdp_need_no_dion_collective():
    params = PRESETS["mixtral-8x7b"].params()
    experts = [p for p in params if p.stacked]
    # 8 experts over FSDP 8: each rank steps whole experts, and Dion sends nothing for them
    assert dion_collectives(experts, Parallelism(fsdp=8), DionConfig(0.25), rank=3) == []
    # under TP the hidden dim (the long side) is split: its row sums travel over TP, one
    # bucket per kind for all experts and layers
    tp = ledger(dion_collectives(experts, Parallelism(fsdp=8, tp=2), DionConfig(0.25)))
    assert set(tp["by_kind"]) == {"sketch", "gram", "R"} and tp["collectives"] == 3
    assert fsdp_collectives(experts, Parallelism(fsdp=8)) == []  # not gathered: EP
