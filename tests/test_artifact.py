import io
import json
import shutil
import zipfile

import pytest
import torch

from edge_agent import artifact
from edge_agent.errors import ModelError
from edge_agent.train.nets import VAE


@pytest.fixture
def saved(tmp_path):
    module = torch.jit.script(VAE(1, 16, 4, 3).eval())
    card = {"model_id": "t", "family": "vae", "scores": {"names": ["m"], "default": "m"}, "thresholds": {}}
    path = tmp_path / "m.pt"
    artifact.save(module, card, path)
    return module, path


def test_round_trip_same_scores_and_card(saved):
    module, path = saved
    loaded, card = artifact.load(path)
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(loaded(x), module(x))
    assert card["format"] == artifact.FORMAT and card["checksum"].startswith("sha256:")
    assert artifact.verify(path) == card


def _rewrite(path, edit):
    """Rewrite the zip with edit(relname, bytes) -> bytes applied to every entry."""
    src = path.read_bytes()
    tmp = path.with_suffix(".new")
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename.split("/", 1)[1], zin.read(info)))
    shutil.move(tmp, path)


def test_tampered_threshold_is_refused(saved):
    _, path = saved

    def edit(name, data):
        if name.endswith("model_card.json"):
            card = json.loads(data)
            card["thresholds"] = {"m": {"value": 1e9}}
            return json.dumps(card).encode()
        return data

    _rewrite(path, edit)
    with pytest.raises(ModelError, match="failed its checksum"):
        artifact.load(path)


def test_tampered_weights_are_refused(saved):
    _, path = saved

    def edit(name, data):
        if name.startswith("data/") and len(data) > 8:
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    _rewrite(path, edit)
    with pytest.raises(ModelError, match="failed its checksum"):
        artifact.verify(path)


def test_flipped_byte_in_file_is_refused(saved):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelError):
        artifact.load(path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused(saved, cut):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(ModelError, match="truncated|corrupted|not a readable"):
        artifact.load(path)


def test_not_a_model(tmp_path):
    p = tmp_path / "x.pt"
    p.write_text("hello")
    with pytest.raises(ModelError, match="not a readable edge-agent model"):
        artifact.load(p)
    with pytest.raises(ModelError, match="not found"):
        artifact.load(tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="folder"):
        artifact.load(tmp_path)


def test_torchscript_without_card_is_refused(tmp_path):
    p = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p))
    with pytest.raises(ModelError, match="no model card"):
        artifact.load(p)


def test_update_card_is_atomic_and_rechecksummed(saved, monkeypatch):
    _, path = saved
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        artifact.update_card(path, lambda c: {**c, "note": "x"})
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".m.pt.*"))  # no temp file left behind
    monkeypatch.undo()
    card = artifact.update_card(path, lambda c: {**c, "note": "x"})
    assert artifact.verify(path)["note"] == "x" == card["note"]


def test_written_model_is_readable_by_the_service_user(saved):
    _, path = saved
    assert path.stat().st_mode & 0o044 == 0o044  # group/other can read (the station runs as its own user)
    path.chmod(0o640)
    artifact.update_card(path, lambda c: {**c, "note": "y"})
    assert path.stat().st_mode & 0o777 == 0o640  # a rewrite keeps the mode the operator chose


def test_load_reads_the_file_once_and_torch_loads_the_verified_bytes(saved, monkeypatch):
    import builtins
    import io as io_module

    import torch

    _, path = saved
    opened = []
    real_open = builtins.open

    def counting(file, *a, **kw):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io_module, "open", lambda file, *a, **kw: counting(file, *a, **kw))
    given = []
    real_jit_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda f, *a, **kw: given.append(f) or real_jit_load(f, *a, **kw))
    artifact.load(path)
    assert len(opened) == 1, "one read: an atomic replace between verify and load cannot pair two files"
    assert len(given) == 1 and isinstance(given[0], io.BytesIO), "torch loads the verified bytes, not the path"
