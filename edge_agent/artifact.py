"""The model artifact: one TorchScript file with its model card (JSON) inside as an extra file.

The card's checksum covers every entry of the archive (code, weights) and the card itself, so a
truncated, corrupted or edited file is refused before torch reads it. The file seal (a SHA-256 of
every byte before it, kept as the zip's comment) covers the rest: headers, padding, the directory,
so any changed byte is refused, not only those that change what torch loads. Writes are atomic.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

from edge_agent.errors import ModelError

CARD_NAME = "model_card.json"
FORMAT = "edge-agent-model/1"
# Entries whose bytes say nothing about the model: the card (hashed separately, without its checksum)
# and torch's per-save id.
_UNHASHED = {f"extra/{CARD_NAME}", ".data/serialization_id"}
# What zipfile may raise on a damaged archive besides BadZipFile: a cut entry (EOFError), a bad deflate
# stream (zlib.error), a name that is not UTF-8 (UnicodeDecodeError, a ValueError), an unknown
# compression method (NotImplementedError), a short header (struct.error), a size past any int (OverflowError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib.error, struct.error,
               NotImplementedError, KeyError, OverflowError)
_EOCD = b"PK\x05\x06"  # end of central directory record: 22 bytes + comment; its last 2 bytes are the comment length
_SEAL = b"edge-agent-seal sha256:"
_SEAL_LEN = len(_SEAL) + 64


def _relname(name: str) -> str:
    # torch names the archive's top folder after the file, so hash names without it.
    return name.split("/", 1)[1] if "/" in name else name


def _canonical(card: dict[str, Any]) -> bytes:
    body = {k: v for k, v in card.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(zf: zipfile.ZipFile, card: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for info in sorted(zf.infolist(), key=lambda i: _relname(i.filename)):
        rel = _relname(info.filename)
        if rel in _UNHASHED or info.is_dir():
            continue
        h.update(rel.encode() + b"\0")
        h.update(zf.read(info))  # zipfile checks each entry's CRC here
    h.update(_canonical(card))
    return "sha256:" + h.hexdigest()


def _seal(data: bytes) -> bytes:
    """The archive with its file seal as the zip comment: sha256 of every byte before the seal, the comment
    length included. Zip readers (torch's miniz, Python's zipfile) skip the comment."""
    if data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise RuntimeError("torch wrote an archive that does not end in a comment-less end record; cannot seal it")
    body = data[:-2] + struct.pack("<H", _SEAL_LEN)
    return body + _SEAL + hashlib.sha256(body).hexdigest().encode()


def check_seal(path: Path, data: bytes) -> bool:
    """True when the file's seal holds; False for an unsealed file from an older edge-agent that ends as torch
    wrote it (its card checksum still covers the entries); ModelError when the seal fails or the end is damaged."""
    tail = data[-_SEAL_LEN:]
    if tail.startswith(_SEAL):
        body = data[:-_SEAL_LEN]
        if hashlib.sha256(body).hexdigest().encode() != tail[len(_SEAL):]:
            raise ModelError(f"{path} failed its file seal: some byte of the file changed since it was written "
                             "(disk or copy corruption, or an edit); restore it or re-export it")
        if body[-22:-18] != _EOCD:
            raise ModelError(f"{path} is sealed but not a model archive; restore it or re-export it")
        return True
    if data[-22:-18] == _EOCD and data[-2:] == b"\0\0":
        return False
    if _EOCD not in data[-(22 + 65535):]:
        raise ModelError(f"{path} is not a readable edge-agent model (no zip end record); the file is truncated or "
                         "not a model: re-export it")
    raise ModelError(f"{path}: the end of the file is damaged (truncated, cut or appended to); "
                     "restore it or re-export it")


def read_bytes(path: Path) -> bytes:
    """The model file's bytes, read once: verification and loading both use these, so an atomic
    replace of the file between the two cannot pair one file's checksum with another's weights."""
    try:
        if not path.exists():
            raise ModelError(f"model file {path} not found; train one with `edge-agent train` or fix the path")
        if path.is_dir():
            raise ModelError(f"model path {path} is a folder; give the .pt file")
        return path.read_bytes()
    except PermissionError:  # the file, or a folder on its path that this user may not enter
        raise ModelError(f"{path}: permission denied reading the model file; let this user read it "
                         f"(e.g. chgrp edge-agent {path} && chmod g+r {path}) or run as its owner") from None
    except OSError as e:
        raise ModelError(f"{path} cannot be read ({e.strerror}); check the disk and the path") from None


def _read_zip(path: Path, data: bytes) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise ModelError(
            f"{path} is not a readable edge-agent model ({e}); the file is truncated or not a model: re-export it"
        ) from None
    names = [n for n in zf.namelist() if _relname(n) == f"extra/{CARD_NAME}"]
    if not names:
        zf.close()
        raise ModelError(f"{path} has no model card; it was not exported by edge-agent: export it with `edge-agent train`")
    try:
        card = json.loads(zf.read(names[0]))
    except _ZIP_ERRORS as e:
        zf.close()
        raise ModelError(f"{path}: its model card is unreadable ({e}); the file is corrupted: re-export it") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        zf.close()
        got = card.get("format") if isinstance(card, dict) else None
        raise ModelError(f"{path}: model card format {got!r} is not {FORMAT!r}; re-export it with this edge-agent")
    return zf, card


def verify_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Check the seal and the checksum of a model file's bytes and return its card; ModelError with one line if
    either does not hold."""
    check_seal(path, data)
    zf, card = _read_zip(path, data)
    with zf:
        try:
            actual = _digest(zf, card)
        except _ZIP_ERRORS as e:
            raise ModelError(f"{path} is corrupted ({e}); restore it or re-export it") from None
    if actual != card.get("checksum"):
        raise ModelError(
            f"{path} failed its checksum (card says {card.get('checksum')}, file is {actual}): "
            "the file was modified or corrupted; restore it or re-export it"
        )
    return card


def verify(path: Path | str) -> dict[str, Any]:
    """Check the file's checksum and return its card; ModelError with one line if it does not hold."""
    path = Path(path)
    return verify_bytes(path, read_bytes(path))


def _extras(path: Path, data: bytes) -> dict[str, bytes]:
    """The archive's extra entries other than the card (e.g. anomaly_map's place.npz), by name; the checksum
    (verify_bytes) covers them."""
    zf, _ = _read_zip(path, data)
    with zf:
        out = {}
        try:
            for name in zf.namelist():
                rel = _relname(name)
                if rel.startswith("extra/") and rel != f"extra/{CARD_NAME}":
                    out[rel.removeprefix("extra/")] = zf.read(name)
        except _ZIP_ERRORS as e:
            raise ModelError(f"{path} is corrupted ({e}); restore it or re-export it") from None
        return out


def load(path: Path | str, map_location: str = "cpu"):
    """Read the file once, verify those bytes, load the same bytes: (TorchScript module in eval mode, card)."""
    module, card, _ = load_with_extras(path, map_location)
    return module, card


def load_with_extras(path: Path | str, map_location: str = "cpu"):
    """As load, and the archive's extra entries: (module, card, {name: bytes})."""
    import torch

    path = Path(path)
    data = read_bytes(path)
    card = verify_bytes(path, data)
    extras = _extras(path, data)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location=map_location)
    except Exception as e:  # torch raises RuntimeError subclasses with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} passed its checksum but torch cannot load it: {first}") from None
    module.eval()
    return module, card, extras


def _save_bytes(module, card: dict[str, Any], extras: dict[str, bytes]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={**extras, CARD_NAME: json.dumps(card, indent=2, sort_keys=True)})
    return buf.getvalue()


def save(module, card: dict[str, Any], path: Path | str, extras: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Write module + card (+ extra archive entries, e.g. the place statistics) atomically (temp file, fsync,
    rename); returns the card with its checksum, which covers the extras too."""
    card = copy.deepcopy(card)
    card["format"] = FORMAT
    card.pop("checksum", None)
    extras = dict(extras or {})
    if CARD_NAME in extras:
        raise ValueError(f"{CARD_NAME} is the card's own entry")
    with zipfile.ZipFile(io.BytesIO(_save_bytes(module, card, extras))) as zf:
        card["checksum"] = _digest(zf, card)
    data = _seal(_save_bytes(module, card, extras))
    write_atomic(Path(path), data)
    return card


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path with data so that a crash at any moment leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; keep the mode of the file replaced (or 0644 less the umask), so
    # a model written by an engineer stays readable by the station's service user.
    # The owner and group too: a model owned root:edge-agent 0640 must stay readable by the service
    # after calibrate rewrites it; when they cannot be kept, nothing is replaced.
    owner: tuple[int, int] | None = None
    try:
        st = path.stat()
        mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o644 & ~umask
    try:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            try:
                os.chown(tmp, *owner)
            except PermissionError:
                raise PermissionError(f"permission denied keeping owner {owner[0]} and group {owner[1]} of {path}; "
                                      "run as root or as its owner") from None
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_card(path: Path | str, change, extras: dict[str, bytes | None] | None = None) -> dict[str, Any]:
    """Load, apply change(card) -> card, and rewrite atomically with a new checksum; the archive's extra entries
    are kept, those in `extras` replaced (None: removed). Returns the new card."""
    module, card, kept = load_with_extras(path)
    for name, data in (extras or {}).items():
        if data is None:
            kept.pop(name, None)
        else:
            kept[name] = data
    return save(module, change(copy.deepcopy(card)), path, kept)
