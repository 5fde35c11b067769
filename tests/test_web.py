"""The station page: read-only HTTP, the token off loopback, and the real daemon seen through a real headless chromium."""

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.broker import free_port
from edge_agent.config import ConfigError, RetentionConfig, WebConfig, is_loopback, load_config
from edge_agent.retention import Retention
from edge_agent.state import StationState
from edge_agent.web import StationPage, authorized
from tests.daemon_helpers import RunningAgent, wait_until
from tests.test_daemon import THRESHOLD, station_video, validate, write_config
from tests.test_state import frame, validate_api, verdict

BROWSER_TIMEOUT_S = 180  # chromium's first start on a loaded 2-core machine can take a minute


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    status, _, body = get(url, headers)
    assert status == 200, (url, status, body)
    return json.loads(body)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---- unit: auth, config


@pytest.mark.parametrize("header, token, ok", [
    (None, None, True),
    ("Bearer s3cret", None, True),
    (None, "s3cret", False),
    ("Bearer s3cret", "s3cret", True),
    ("bearer  s3cret ", "s3cret", True),
    ("Bearer s3cre", "s3cret", False),
    ("Bearer ", "s3cret", False),
    ("Basic " + base64.b64encode(b"operator:s3cret").decode(), "s3cret", True),
    ("Basic " + base64.b64encode(b"anyone:s3cret").decode(), "s3cret", True),
    ("Basic " + base64.b64encode(b"operator:wrong").decode(), "s3cret", False),
    ("Basic " + base64.b64encode(b"s3cret").decode(), "s3cret", False),
    ("Basic not-base64!", "s3cret", False),
    ("Token s3cret", "s3cret", False),
])
def test_authorized(header, token, ok):
    assert authorized(header, token) is ok


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("192.168.1.20", False), ("::", False), ("station-7.plant", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_off_loopback_without_a_token_file_is_a_config_error_naming_the_key(tmp_path):
    config = tmp_path / "station.toml"
    config.write_text('[source]\nuri = "parts.avi"\n[web]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert len(str(e.value).splitlines()) == 1
    assert "web" in str(e.value) and "'0.0.0.0'" in str(e.value) and "web.auth_file" in str(e.value)
    assert load_config(config, ["web.enabled=false"]).web.enabled is False
    assert load_config(config, [f'web.auth_file="{tmp_path / "token"}"']).web.host == "0.0.0.0"


def test_token_file_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    token = tmp_path / "web-token"
    token.write_text("  s3cret\n")
    assert WebConfig(auth_file=token).token() == "s3cret"
    assert WebConfig().token() is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert WebConfig(auth_file="${CREDENTIALS_DIRECTORY}/web-token").token() == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    for path, words in (("${CREDENTIALS_DIRECTORY}/web-token", "LoadCredential"), (tmp_path / "missing", "missing"),
                        (tmp_path / "empty", "is empty")):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ConfigError, match=re.escape(words)):
            WebConfig(auth_file=path).token()


# ---- real HTTP against StationPage with a hand-fed state


@pytest.fixture
def fed_state():
    state = StationState("st1", "Line 3")
    for seq, result in enumerate(["OK", "NG", "OK"], start=1):
        state.verdict(verdict(seq, result), b"\xff\xd8heatmap" if result == "NG" else None, frame())
    state.camera_up(True)
    state.broker_connected(False)
    state.outbox_depth(2)
    return state


def test_bound_off_loopback_every_request_needs_the_token(fed_state, caplog):
    caplog.set_level("INFO", logger="edge_agent.web")
    page = StationPage(fed_state, "0.0.0.0", free_port(), token="s3cret")
    port = page.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/api/state", "/api/verdicts?since=0", "/api/image/2.jpg", "/api/gallery"):
            status, headers, _ = get(base + path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic"), "a browser asks the operator for it"
            assert get(base + path, {"Authorization": "Bearer wrong"})[0] == 401
            assert get(base + path, {"Authorization": "Bearer s3cret"})[0] == 200, path
            assert get(base + path, basic("operator", "s3cret"))[0] == 200, path
        assert "needs the token" in caplog.text and f":{port}/" in caplog.text
    finally:
        page.stop()


def test_read_only_and_no_way_out_of_the_retention_folder(fed_state, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"not for the page")
    retention_dir = tmp_path / "retention"
    retention_dir.mkdir()
    page = StationPage(fed_state, "127.0.0.1", 0, retention_dir=retention_dir)
    port = page.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = get(base + "/api/state", method=method)
            assert status == 405 and headers["Allow"] == "GET"
        for path in ("/retained/../secret.png", "/retained/%2e%2e/secret.png", "/retained/secret.png",
                     "/api/image/../../secret.png", "/etc/passwd", "/api/image/1.png"):
            assert get(base + path)[0] == 404, path
        status, _, body = get(base + "/api/verdicts?since=-1")
        assert status == 400 and b"since" in body
        status, headers, body = get(base + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"http://" not in body and b"https://" not in body, "nothing fetched from the internet"
        assert "default-src 'self'" in headers["Content-Security-Policy"]
    finally:
        page.stop()


def test_api_answers_match_the_schema_and_images_come_back(fed_state):
    page = StationPage(fed_state, "127.0.0.1", 0)
    port = page.start()
    base = f"http://127.0.0.1:{port}"
    try:
        state = get_json(base + "/api/state")
        validate_api(state, "state")
        assert state["health"]["broker_connected"] is False and state["health"]["outbox_depth"] == 2
        since = get_json(base + "/api/verdicts?since=1")
        validate_api(since, "verdicts")
        assert [v["verdict"]["seq"] for v in since["verdicts"]] == [2, 3]
        status, headers, body = get(base + "/api/image/2.jpg")
        assert (status, headers["X-Image-Kind"], body) == (200, "heatmap", b"\xff\xd8heatmap")
        status, headers, body = get(base + "/api/image/3.jpg")
        assert status == 200 and headers["X-Image-Kind"] == "frame"
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (32, 48, 3)
        assert get(base + "/api/image/1.jpg")[0] == 404, "an old OK frame nobody looked at is not kept"
    finally:
        page.stop()


def test_gallery_lists_retained_ng_frames_newest_first(fed_state, tmp_path):
    retention = Retention(RetentionConfig(enabled=True, dir=tmp_path / "retention", ok_sample_rate=1.0))
    for seq, result in ((1, "NG"), (2, "OK"), (3, "NG")):
        retention.save(frame(40 * seq), verdict(seq, result, captured_at=1000.0 + seq))
    page = StationPage(fed_state, "127.0.0.1", 0, retention_dir=retention.dir)
    port = page.start()
    base = f"http://127.0.0.1:{port}"
    try:
        gallery = get_json(base + "/api/gallery")
        validate_api(gallery, "gallery")
        assert [item["seq"] for item in gallery["items"]] == [3, 1], "NG only, newest first"
        status, headers, body = get(base + gallery["items"][0]["image"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body == (retention.dir / f"{gallery['items'][0]['name']}.png").read_bytes()
        assert len(get_json(base + "/api/gallery?limit=1")["items"]) == 1
    finally:
        page.stop()
