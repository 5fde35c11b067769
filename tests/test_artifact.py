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


def _positions(n, stride=97):
    """Every stride-th byte, and every byte of the first and last 300 (the headers, the directory, the seal)."""
    return sorted(set(range(0, n, stride)) | set(range(min(300, n))) | set(range(max(0, n - 300), n)))


def test_flipped_byte_anywhere_in_the_file_is_refused(saved):
    # Not only bytes that change what torch loads: headers, alignment padding, torch's per-save id and the
    # directory too (the file seal). The file's layout moves with the length of paths torch records, so a
    # single fixed position is not a test of "any byte".
    _, path = saved
    raw = path.read_bytes()
    assert artifact.check_seal(path, raw) is True
    passed = []
    for pos in _positions(len(raw)):
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        try:
            artifact.verify_bytes(path, bytes(bad))
            passed.append(pos)
        except ModelError:
            pass
    assert passed == []
    bad = bytearray(raw)
    bad[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ModelError):
        artifact.load(path)


def test_appended_or_cut_seal_is_refused(saved):
    _, path = saved
    raw = path.read_bytes()
    for data, match in ((raw + b"\n", "end of the file is damaged"), (raw[:-1], "end of the file is damaged"),
                        (raw[:-10], "end of the file is damaged")):
        with pytest.raises(ModelError, match=match):
            artifact.verify_bytes(path, data)


def test_sealed_file_is_a_plain_torchscript_archive(saved):
    module, path = saved
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(torch.jit.load(str(path))(x), module(x))
    with zipfile.ZipFile(path) as zf:
        assert zf.comment.startswith(b"edge-agent-seal sha256:") and zf.testzip() is None


def _unsealed(raw):
    """The file as edge-agent wrote it before the seal: torch's bytes, ending in a comment-less end record."""
    seal = len(b"edge-agent-seal sha256:") + 64
    return raw[:-seal - 2] + b"\0\0"


def test_unsealed_file_from_an_older_export_still_loads(saved):
    module, path = saved
    old = _unsealed(path.read_bytes())
    assert artifact.check_seal(path, old) is False
    path.write_bytes(old)
    loaded, card = artifact.load(path)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), module(x))
    # rewriting the card (calibrate does) seals it
    artifact.update_card(path, lambda c: c)
    assert artifact.check_seal(path, path.read_bytes()) is True


def test_damaged_unsealed_file_is_one_model_error_never_a_traceback(saved):
    # Without the seal some bytes (padding, torch's save id) are not covered, but whatever is flipped,
    # the answer is a ModelError or a file that passes its checksum; never a raw zipfile exception.
    _, path = saved
    old = _unsealed(path.read_bytes())
    for pos in _positions(len(old), stride=31):
        bad = bytearray(old)
        bad[pos] ^= 0xFF
        try:
            artifact.verify_bytes(path, bytes(bad))
        except ModelError:
            pass


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
