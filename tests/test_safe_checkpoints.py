"""The trainer's checkpoints are safe to load: damage gives a clear error before anything is
changed, an unfinished save is skipped with a warning, and no file can make loading run code.
Also: the local launcher keeps gloo's sockets on loopback."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import TinyLM, batches, lm_step
from torch.distributed.checkpoint.state_dict import get_state_dict

import torchdion
from torchdion.train import ckpt, launch

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.filterwarnings("ignore:Detected an existing checkpoint"),
]
RAN: list[str] = []  # what the hostile pickles below managed to call


def _boom(tag: str) -> None:
    RAN.append(tag)


class Hostile:
    """Unpickles into a call of _boom: a stand-in for os.system."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self):
        return _boom, (self.tag,)


def _setup(seed: int):
    model = TinyLM(seed=seed)
    opt = torchdion.Dion(torchdion.param_groups(model, head=model.head), lr=0.02,
                         rank_fraction=0.5, seed=seed)
    for x in batches(2, seed=seed):
        lm_step(model, opt, x)
    return model, opt


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in opt.state.items()})


def _same(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    return (wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
            and sa.keys() == sb.keys()
            and all(sa[p].keys() == sb[p].keys() and all(
                torch.equal(v, sb[p][k]) if torch.is_tensor(v) else v == sb[p][k]
                for k, v in sa[p].items()) for p in sa))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    model, opt = _setup(0)
    rng = np.random.RandomState(3)  # PowerSGD keeps one of these in its state
    ckpt.save(root, 1, model, [opt], {"world": 1},
              extra={"powersgd": {"rng": rng, "error_dict": {0: torch.ones(3)}, "iter": 7}})
    return root / "step_000001"


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, dst)
    return dst


def test_round_trip_restores_state_and_extras(saved, tmp_path):
    path = _copy(saved, tmp_path)
    original = _setup(0)
    model, opt = _setup(1)
    meta, extra = ckpt.load(path, model, [opt])
    assert meta["step"] == 1 and meta["world"] == 1
    assert set(meta["files"]) == {p.name for p in path.iterdir()} - {"meta.json"}
    assert torch.equal(extra["powersgd"]["error_dict"][0], torch.ones(3))
    assert extra["powersgd"]["iter"] == 7
    assert np.array_equal(extra["powersgd"]["rng"].randint(0, 1 << 30, 5),
                          np.random.RandomState(3).randint(0, 1 << 30, 5))
    for (k, v), w in zip(model.state_dict().items(), original[0].state_dict().values()):
        assert torch.equal(v, w), k


def test_groups_with_scheduler_keys_load(tmp_path):
    """torch's schedulers add initial_lr to every group; the trainer's LambdaLR saves it."""
    model, opt = _setup(0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    ckpt.save(tmp_path, 2, model, [opt], {"world": 1})
    model2, opt2 = _setup(1)
    ckpt.load(tmp_path / "step_000002", model2, [opt2])  # DCP loads the keys opt2's groups have
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    opt2.load_state_dict(opt.state_dict())  # a plain state dict carries initial_lr too
    assert [g["initial_lr"] for g in opt2.param_groups] == [2 * g["lr"] for g in opt.param_groups]


def _distcp(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # inside tensor data: DCP alone would load it silently
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated_distcp": (lambda p: _truncate(_distcp(p)), r"__0_0\.distcp does not match"),
    "flipped_bit_distcp": (lambda p: _flip_bit(_distcp(p)), r"__0_0\.distcp does not match"),
    "deleted_distcp": (lambda p: _distcp(p).unlink(), r"__0_0\.distcp is missing"),
    "deleted_metadata": (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
    "truncated_metadata": (lambda p: _truncate(p / ".metadata"), r"\.metadata does not match"),
    "truncated_extra": (lambda p: _truncate(p / "extra_rank0.pt"), r"extra_rank0\.pt does not"),
    "garbled_meta_json": (lambda p: (p / "meta.json").write_text("{\"step\": 1,"),
                          r"JSONDecodeError"),
    "deleted_meta_json": (lambda p: (p / "meta.json").unlink(), r"meta\.json"),
    # A flipped digit in meta.json resumed silently at the wrong step (or with wrong totals).
    "flipped_digit_meta_json": (lambda p: _edit_meta(p, step=7), r"does not match its meta_sha256"),
    "meta_json_unchecksummed": (lambda p: _edit_meta(p, meta_sha256=None),
                                r"has no meta_sha256"),
}


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_raises_and_changes_nothing(saved, tmp_path, damage):
    path = _copy(saved, tmp_path)
    do, pattern = DAMAGE[damage]
    do(path)
    model, opt = _setup(1)
    before = _snapshot(model, opt)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path)) + ".*" + pattern):
        ckpt.load(path, model, [opt])
    assert _same(before, _snapshot(model, opt))


def test_unfinished_save_is_skipped_with_a_warning(saved, tmp_path):
    older = _copy(saved, tmp_path)
    newer = older.with_name("step_000002")
    shutil.copytree(older, newer)
    (newer / "meta.json").unlink()  # a crash between the DCP files and meta.json
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000002: no meta\.json"):
        assert ckpt.latest(older.parent) == older
    model, opt = _setup(1)
    ckpt.load(older, model, [opt])


def _rewrite_checksums(path: Path) -> None:
    """What an attacker does after editing the files: meta.json's checksums match again."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {f.name: ckpt._sha256(f) for f in path.iterdir() if f.name != "meta.json"}
    del meta["meta_sha256"]
    meta["meta_sha256"] = ckpt._meta_sha256(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_step_must_match_the_directory_name(saved, tmp_path):
    """A whole, self-consistent checkpoint moved to another step's name is refused: resuming it
    would repeat or skip steps."""
    path = _copy(saved, tmp_path)
    moved = path.rename(path.with_name("step_000003"))
    assert ckpt.latest(moved.parent) == moved
    model, opt = _setup(1)
    before = _snapshot(model, opt)
    with pytest.raises(ckpt.CheckpointError, match="meta.json says step 1, the directory's name "
                       "says 3"):
        ckpt.load(moved, model, [opt])
    assert _same(before, _snapshot(model, opt))


def _hostile_metadata(path: Path) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(Hostile("metadata")))


def _hostile_extra(path: Path) -> None:
    torch.save({"powersgd": Hostile("extra")}, path / "extra_rank0.pt")


def _hostile_item(path: Path) -> None:
    """A whole DCP checkpoint of the right structure whose one non-tensor item (a param group's
    lr) unpickles into a call."""
    model, opt = _setup(0)
    model_sd, optim_sd = get_state_dict(model, [opt])
    optim_sd["param_groups"][0]["lr"] = Hostile("dcp item")
    for f in path.glob("*.distcp"):
        f.unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


@pytest.mark.parametrize("plant", [_hostile_metadata, _hostile_extra, _hostile_item],
                         ids=["metadata", "extra", "dcp_item"])
def test_tampered_checkpoint_cannot_run_code(saved, tmp_path, plant):
    path = _copy(saved, tmp_path)
    plant(path)
    _rewrite_checksums(path)
    RAN.clear()
    model, opt = _setup(1)
    before = _snapshot(model, opt)
    with pytest.raises(ckpt.CheckpointError, match="not allowed|Weights only load failed"):
        ckpt.load(path, model, [opt])
    assert RAN == []
    if plant is not _hostile_extra:  # the extras are read after the state is set
        assert _same(before, _snapshot(model, opt))


def test_the_hostile_pickles_do_run_under_plain_loaders(saved, tmp_path):
    """The attack in test_tampered_checkpoint_cannot_run_code is real: DCP's own reader and
    planner, or torch.load(weights_only=False), call the planted function."""
    RAN.clear()
    pickle.loads(pickle.dumps(Hostile("pickle")))
    buf = io.BytesIO()
    torch.save(Hostile("torch.load"), buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    path = _copy(saved, tmp_path)
    _hostile_item(path)
    model, opt = _setup(1)
    model_sd, optim_sd = get_state_dict(model, [opt])
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    assert RAN == ["pickle", "torch.load", "dcp item"]


def test_no_unsafe_torch_load_in_the_package():
    src = Path(torchdion.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
        assert "pickle.load(" not in text and "pickle.loads(" not in text, f


def _listening_addresses() -> list[str]:
    """Local addresses of this process's listening TCP sockets (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(
            f"/proc/self/fd/{fd}") else ""
        m = re.fullmatch(r"socket:\[(\d+)\]", with_target)
        if m:
            inodes.add(m.group(1))
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1].split(":")[0])
    return found


def _record_sockets(rank, world, device, out):
    out.update(ifname=os.environ.get("GLOO_SOCKET_IFNAME"), listening=_listening_addresses())


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="needs Linux /proc")
def test_local_launcher_keeps_gloo_on_loopback(monkeypatch):
    """The launcher meets at a file store (no port), and its workers' gloo listeners are bound
    to 127.0.0.1. One worker, in this process, is enough to see where gloo listens."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    out: dict = {}
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            launch._worker(0, 1, os.path.join(tmp, "store"), 1, _record_sockets, (out,))
    finally:
        torch.set_num_threads(threads)  # _worker sets the worker's share of the cores
    assert out["ifname"] in ("lo", "lo0")
    assert out["listening"] and set(out["listening"]) == {"0100007F"}, out  # 127.0.0.1
