"""DDP on CPU: the real CLI under torchrun with 2 gloo processes and a tiny model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_agent import artifact
from edge_agent.train import distributed

TINY = ["--patch-size", "32", "--stride", "16", "--nc", "4", "--nz", "4", "--batch-size", "16", "--epochs", "1",
        "--min-steps", "1", "--seed", "0", "--device", "cpu", "--precision", "fp32", "--quiet"]


def _torchrun(station: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "edge-agent"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(cli), "train", str(station / "train/good"), "--out", str(out), *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    module, _ = artifact.load(path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_torchrun_two_processes_same_card_fields_and_reproducible(station, vae_model, tmp_path):
    runs = []
    for name in ("a.pt", "b.pt"):
        result = _torchrun(station, tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("wrote ") == 1  # rank 0 reports; rank 1 stays quiet
        runs.append(tmp_path / name)
    a, b = (artifact.verify(p) for p in runs)
    single = artifact.verify(vae_model)  # the same options in one process
    assert set(a) == set(single)
    assert set(a["training"]) == set(single["training"])
    name = single["scores"]["default"]
    assert a["scores"]["default"] == name
    assert set(a["thresholds"][name]) == set(single["thresholds"][name])
    assert a["training"]["processes"] == 2 and single["training"]["processes"] == 1
    assert a["training"]["steps"] == single["training"]["steps"]  # the global batch keeps the step count
    wa, wb = _weights(runs[0]), _weights(runs[1])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # same seed, same processes: bit-identical weights
    assert a["thresholds"][name]["value"] == b["thresholds"][name]["value"]
    differs = [k for k in wa if not torch.equal(wa[k], _weights(vae_model)[k])]
    assert differs  # and it did train differently from one process (other crops), not copy a file


def test_torchrun_refuses_a_batch_that_does_not_split(station, tmp_path):
    result = _torchrun(station, tmp_path / "m.pt", "--batch-size", "15")
    assert result.returncode != 0  # torchrun reports a failed worker as 1, with its own launcher traceback
    assert "edge-agent: error: --batch-size 15 does not split evenly across 2 processes" in result.stderr
    assert "edge_agent/" not in result.stderr  # no traceback from our code: one line per worker


@pytest.mark.parametrize("size, rank, want", [(1, 0, 7), (2, 0, 7), (2, 1, 7 + distributed.RANK_SEED_STRIDE)])
def test_rank_seeds(size, rank, want):
    assert distributed.rank_seed(7, distributed.World(rank, size)) == want


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") is distributed.SINGLE
    assert distributed.any_rank(distributed.SINGLE, True) is True
