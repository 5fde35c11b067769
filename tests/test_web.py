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
    config.write_text('[source]\nuri = "parts.avi"\n[mqtt]\nhost = "127.0.0.1"\n[web]\nhost = "0.0.0.0"\n')
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


def test_an_ipv6_loopback_bind_serves_the_page(fed_state):
    import socket

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    page = StationPage(fed_state, "::1", 0)
    port = page.start()
    try:
        assert get_json(f"http://[::1]:{port}/api/state")["last_seq"] == 3
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


# ---- the real daemon, a real mosquitto, a real headless chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


needs_chromium = pytest.mark.skipif(chromium() is None, reason="needs chromium (apt install chromium; "
                                    "scripts/install.sh installs it when run as root)")


def browse(url: str, tmp_path: Path, *args: str) -> str:
    """One headless chromium run (its own profile); the page's scripts get 8 s of virtual time first."""
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                           "--virtual-time-budget=8000", *args, url],
                          capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """Attributes and text of every element with an id, and the attributes of every .chip, from a DOM dump."""

    VOID = {"img", "br", "meta", "input", "link", "hr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.attrs: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self.chips: list[dict[str, str]] = []
        self.figures = 0
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if "chip" in a.get("class", "").split():
            self.chips.append(a)
        self.figures += tag == "figure"
        if tag == "body":
            self.attrs["body"] = a
        if "id" in a:
            self.attrs[a["id"]] = a
            self.text.setdefault(a["id"], "")
        if tag not in self.VOID:
            self._open.append((tag, a.get("id")))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, element_id in self._open:
            if element_id is not None:
                self.text[element_id] += data


@needs_chromium
@pytest.mark.integration
def test_a_real_browser_shows_the_defect_as_ng_with_its_overlay_and_the_broker_down(tmp_path, vae_model, mosquitto,
                                                                                    monkeypatch):
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # a hang at shutdown is answered with every thread's stack
    web_port = free_port()
    video = station_video(tmp_path / "parts.avi", 6, defective={3})
    config = write_config(tmp_path, vae_model, video, mosquitto.port, web_port=web_port, loop=True, fps=5)
    agent = RunningAgent(config, "--set", "web.recent=1000")  # the NG the browser is sent to stays kept
    base = f"http://127.0.0.1:{web_port}"
    screenshot = tmp_path / "station-page.png"
    try:
        agent.wait_printed(4)
        wait_until(lambda: any(r == "NG" for _, r, _ in agent.printed()), what="an NG verdict")
        assert f"station page on {base}/" in agent.stderr
        state = get_json(base + "/api/state")
        validate_api(state, "state")
        assert state["health"]["broker_connected"] is True and state["health"]["camera_up"] is True
        assert state["model"]["threshold"] == THRESHOLD and state["model"]["calibration"]["method"] == "config"
        page = get_json(base + "/api/verdicts?since=0")
        validate_api(page, "verdicts")
        ng = next(v for v in page["verdicts"] if v["verdict"]["result"] == "NG")
        validate(ng["verdict"])
        assert ng["image_kind"] == "heatmap" and ng["verdict"]["score"] > THRESHOLD
        seq = ng["verdict"]["seq"]
        status, headers, jpeg = get(base + ng["image"])
        assert status == 200 and headers["X-Image-Kind"] == "heatmap"
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (128, 128, 3)

        mosquitto.stop()
        wait_until(lambda: get_json(base + "/api/state")["health"]["broker_connected"] is False,
                   what="the page's health showing the broker down")
        wait_until(lambda: get_json(base + "/api/state")["health"]["outbox_depth"] > 0,
                   what="verdicts waiting in the outbox")
        dom = Dom(browse(f"{base}/?seq={seq}", tmp_path, "--dump-dom"))
        browse(f"{base}/?seq={seq}", tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1000")
    finally:
        try:
            rc, stop_s = agent.terminate()
            print(f"agent stopped {stop_s:.1f} s after SIGTERM")
        except subprocess.TimeoutExpired:
            agent.proc.send_signal(6)  # SIGABRT: PYTHONFAULTHANDLER dumps every thread's stack
            agent.proc.wait(30)
            time.sleep(0.5)
            raise AssertionError("the agent did not stop on SIGTERM:\n" + agent.stderr[-8000:])
    assert rc == 0, agent.stderr
    assert "Traceback" not in agent.stderr

    assert dom.attrs["body"].get("data-ready") == "1", "the page's first poll completed"
    assert dom.attrs["conn"]["data-ok"] == "true", dom.text["conn"]
    assert dom.attrs["verdict"]["data-result"] == "NG" and dom.text["verdict"] == "NG"
    img = dom.attrs["frame"]
    assert img["src"] == f"{base}/api/image/{seq}.jpg" and img["data-kind"] == "heatmap"
    assert img.get("data-loaded") == str(seq), "the browser decoded the overlay JPEG"
    assert "display: block" in dom.attrs["box"].get("style", ""), "the worst patch is boxed"
    assert ng["verdict"]["message_id"] in dom.text["json"]
    assert dom.attrs["h-broker"]["data-ok"] == "false" and "DISCONNECTED" in dom.text["h-broker"]
    assert dom.attrs["h-camera"]["data-ok"] == "true" and dom.text["h-camera"] == "up"
    assert dom.attrs["h-outbox"]["data-ok"] == "false"
    assert {c["data-result"] for c in dom.chips} >= {"OK", "NG"}
    assert dom.figures >= 1, "the NG gallery shows the retained defect"
    assert dom.text["m-calibration"] == "model.threshold in the station config"

    shot = cv2.imread(str(screenshot))
    assert shot is not None and shot.shape == (1000, 1280, 3)
    ng_red = np.all(np.abs(shot.astype(int) - (46, 34, 207)) < 12, axis=2)  # the NG banner, #cf222e
    assert ng_red.sum() > 1000, "the screenshot shows the NG banner"
    if os.environ.get("EDGE_AGENT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["EDGE_AGENT_SCREENSHOT"])
    print(f"station page screenshot: {screenshot}")


@needs_chromium
def test_a_browser_with_basic_auth_gets_the_live_page_off_loopback(fed_state, tmp_path):
    page = StationPage(fed_state, "0.0.0.0", free_port(), token="s3cret")
    port = page.start()
    try:
        refused = Dom(browse(f"http://127.0.0.1:{port}/", tmp_path, "--dump-dom"))
        # The credentials of the address are the browser's basic auth; its fetch() calls reuse them.
        dom = Dom(browse(f"http://operator:s3cret@127.0.0.1:{port}/", tmp_path, "--dump-dom"))
    finally:
        page.stop()
    assert "verdict" not in refused.attrs, "without the token the page is not served"
    assert dom.attrs["body"].get("data-ready") == "1" and dom.attrs["conn"]["data-ok"] == "true"
    assert dom.attrs["verdict"]["data-result"] == "OK" and dom.attrs["h-broker"]["data-ok"] == "false"
    assert [c["data-result"] for c in dom.chips] == ["OK", "NG", "OK"]


@pytest.mark.integration
def test_the_daemon_bound_off_loopback_asks_for_the_token_and_says_so(tmp_path, vae_model, mosquitto):
    from tests.test_daemon import agent as agent_cmd
    from tests.test_daemon import env

    web_port = free_port()
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 3), mosquitto.port,
                          web_port=web_port, loop=True, fps=5)
    open_off_loopback = subprocess.run(agent_cmd("check-config", str(config), "--set", "web.host=0.0.0.0"),
                                       env=env(), capture_output=True, text=True, timeout=60)
    assert open_off_loopback.returncode == 2
    assert len(open_off_loopback.stderr.strip().splitlines()) == 1 and "web.auth_file" in open_off_loopback.stderr

    token = tmp_path / "web-token"
    token.write_text("s3cret\n")
    agent = RunningAgent(config, "--set", "web.host=0.0.0.0", "--set", f'web.auth_file="{token}"')
    base = f"http://127.0.0.1:{web_port}"
    try:
        agent.wait_printed(1)
        wait_until(lambda: "station page on" in agent.stderr, what="the page's start line")
        assert "needs the token" in agent.stderr
        assert get(base + "/api/state")[0] == 401
        assert get(base + "/", basic("operator", "wrong"))[0] == 401
        assert get_json(base + "/api/state", {"Authorization": "Bearer s3cret"})["last_seq"] >= 1
        assert get(base + "/", basic("operator", "s3cret"))[0] == 200
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr


@pytest.mark.integration
def test_a_taken_page_port_stops_the_agent_with_one_line(tmp_path, vae_model):
    import socket

    from tests.test_daemon import agent as agent_cmd
    from tests.test_daemon import env

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 2), free_port(),
                              web_port=port)
        done = subprocess.run(agent_cmd("run", str(config)), env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("edge-agent: error")]
    assert len(errors) == 1 and f"station page 127.0.0.1:{port}" in errors[0] and "web.port" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@needs_chromium
@pytest.mark.integration
def test_a_real_browser_shows_each_cameras_latest_verdict_and_which_camera_is_down(tmp_path, vae_model, mosquitto):
    from tests.live_camera import LiveCamera
    from tests.test_cameras import camera_toml, station_config

    web_port = free_port()
    live = LiveCamera(free_port(), fps=10).start()
    side = station_video(tmp_path / "side.avi", 2, defective={0, 1})
    config = station_config(tmp_path, vae_model, camera_toml("top", live.url, "url") +
                            camera_toml("side", str(side)).replace("loop = true", "loop = true\nfps = 5"),
                            mosquitto.port, mode="free-run")
    config.write_text(config.read_text().replace("[web]\nenabled = false", f"[web]\nport = {web_port}"))
    base = f"http://127.0.0.1:{web_port}"
    agent = RunningAgent(config)
    try:
        wait_until(lambda: f"station page on {base}/" in agent.stderr or agent.proc.poll() is not None,
                   what="the page's start line")
        cams = lambda: get_json(base + "/api/state").get("cameras", {})  # noqa: E731
        wait_until(lambda: all(c["latest"] for c in cams().values()), what="a verdict from each camera")
        live.stop()  # top unplugged: it is retried, side goes on
        wait_until(lambda: cams()["top"]["up"] is False, what="top shown down")
        state = get_json(base + "/api/state")
        dom = Dom(browse(base + "/", tmp_path, "--dump-dom"))
    finally:
        live.stop()
        rc, _ = agent.terminate()
    assert rc == 0 and "Traceback" not in agent.stderr, agent.stderr
    validate_api(state, "state")
    assert list(state["cameras"]) == ["top", "side"] and state["health"]["camera_up"] is False
    assert state["cameras"]["side"]["up"] is True
    assert state["cameras"]["side"]["latest"]["camera"] == "side"
    assert state["cameras"]["top"]["latest"]["camera"] == "top", "a down camera's last verdict stays on the page"

    assert dom.attrs["body"].get("data-ready") == "1" and "hidden" not in dom.attrs["cams"]
    assert dom.attrs["cam-top-up"]["data-ok"] == "false" and dom.text["cam-top-up"] == "DOWN"
    assert dom.attrs["cam-side-up"]["data-ok"] == "true" and dom.text["cam-side-up"] == "up"
    assert dom.text["cam-side-result"] == "NG" and dom.attrs["cam-side-result"]["data-result"] == "NG"
    side_img = dom.attrs["cam-side-img"]
    assert side_img["data-kind"] == "heatmap" and side_img["src"].startswith(f"{base}/api/image/")
    assert side_img.get("data-loaded") == side_img["data-seq"], "the browser decoded side's overlay"
    assert dom.text["cam-top-result"] in ("OK", "NG", "ERROR")
    assert "frame" in dom.text["cam-top-facts"] and "score" in dom.text["cam-top-facts"]
    assert dom.text["camera"] in ("top", "side") and "hidden" not in dom.attrs["camera"], "the main verdict names its camera"
