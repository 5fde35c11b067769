"""Verdicts out to the PLC/MES over MQTT, PLC triggers in. The last stage of the flow:
publish_verdict() writes to the durable outbox and returns; the `publish` thread delivers
from the outbox in order and deletes a message only after the broker's PUBACK.

Topics, all under <prefix>/<station>/ (docs/MQTT.md has payload examples):
- verdict            out, QoS 1, not retained. Verdict JSON (deploy/verdict.schema.json). Its
                     `message_id` (<station>:<boot_id>:<seq>) de-duplicates QoS 1 redeliveries;
                     `heatmap: true` announces a heatmap for it.
- heatmap            out, QoS 1, not retained. JPEG bytes, published right after its verdict
                     (same client, same QoS, so the broker keeps the order). MQTT 5 adds user
                     properties `message_id` and `seq` and content type image/jpeg; on 3.1.1 a
                     heatmap belongs to the last verdict with `heatmap: true` before it.
- heatmap/<camera>   out, QoS 1, not retained (stations with [[cameras]]). That camera's heatmap JPEG, right
                     after the version 2 verdict whose `cameras` entry for it says `heatmap: true`
                     (MQTT 5: user properties message_id, seq and camera).
- status             out, QoS 1, retained. `online` once the broker acknowledged the trigger
                     subscription (SUBACK) after a connect; `offline` on a clean stop and as the
                     Last Will when the agent dies or loses the network.
- status/info        out, QoS 1, retained. JSON: what the agent runs (boot id, mode, recipes with
                     model ids and checksums, camera up/down); renewed on connect and on changes.
- trigger            in, QoS 1. PLC trigger JSON
                     {"part_id": "...", "trigger_id": "...", "recipe": "...", "job_id": "..."};
                     only part_id is required; a trigger_id is generated when absent.
- trigger/response   out, QoS 1, not retained. {"ok": true, "trigger_id", "part_id"} for an
                     accepted trigger (plus "duplicate" for a repeated trigger_id), {"ok": false,
                     "reason", "error", "input", and "trigger_id"/"part_id" where readable} for a
                     rejected one. triggers.py holds the contract.
"""

from __future__ import annotations

import json
import logging
import ssl
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError
from edge_agent.frames import Trigger
from edge_agent.triggers import TriggerDesk
from edge_agent.outbox import Message, Outbox

logger = logging.getLogger(__name__)

# Messages handed to paho and not yet acknowledged. Bounds paho's in-memory queue (it resends
# these itself after a reconnect) and stays under paho's default max_inflight of 20.
INFLIGHT_WINDOW = 16
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
CONTENT_TYPES = {"verdict": "application/json", "heatmap": "image/jpeg"}


def _not_noise(record: logging.LogRecord) -> bool:
    # paho logs this at ERROR whenever its loop spins without a socket (during an outage, at
    # stop); our own broker up/down lines already say it once.
    return not str(record.msg).startswith("Client is not connected")


_paho_logger = logging.getLogger(__name__ + ".paho")
_paho_logger.addFilter(_not_noise)


class MqttMetrics(Protocol):
    """Hooks metrics.py implements; each is optional (looked up by name)."""

    def broker_connected(self, connected: bool) -> None: ...
    def outbox_depth(self, depth: int) -> None: ...
    def outbox_bytes(self, n_bytes: int) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def trigger_rejected(self, reason: str) -> None: ...
    def published(self, kind: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Topics:
    verdict: str
    heatmap: str
    status: str
    status_info: str
    trigger: str
    trigger_response: str

    @classmethod
    def for_station(cls, prefix: str, station: str) -> Topics:
        base = f"{prefix}/{station}"
        return cls(f"{base}/verdict", f"{base}/heatmap", f"{base}/status", f"{base}/status/info",
                   f"{base}/trigger", f"{base}/trigger/response")


class MqttPublisher:
    """Owns the paho client and the `publish` thread. publish_verdict() never waits for the broker.

    on_trigger runs on paho's network thread: it must only hand the trigger on (e.g. a queue);
    it returns extra answer fields or None and raises TriggerError to refuse (triggers.TriggerDesk).
    on_delivered(message, latency_s) runs after each PUBACK, latency_s since publish_verdict().
    info() returns the status/info document; publish_info() renews it.
    """

    def __init__(
        self,
        config: MqttConfig,
        station: str,
        outbox: Outbox,
        on_trigger: Callable[[Trigger], dict[str, Any] | None] | None = None,
        on_delivered: Callable[[Message, float], None] | None = None,
        metrics: MqttMetrics | None = None,
        info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.station = station
        self.outbox = outbox
        self.topics = Topics.for_station(config.prefix, station)
        self.host = config.host or "127.0.0.1"
        self._on_delivered = on_delivered
        self._metrics = metrics
        self._info = info
        self._desk = TriggerDesk(config.trigger_rate_per_s, on_trigger, self._metric)
        self._subscribe_mid: int | None = None
        self.online = threading.Event()  # set once `online` is published after the SUBACK
        self._v5 = config.protocol == "5"
        self._lock = threading.Lock()
        self._inflight: dict[int, Message] = {}  # paho mid -> outbox message
        # PUBACKs, handed from paho's thread to `publish`, which registers a mid before it reads
        # this queue: a PUBACK can arrive before publish() returns, and taking our lock inside
        # on_publish could deadlock against paho's own lock held around it.
        self._acks: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._drained = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._connected = False
        self._up = threading.Event()
        self._reported_down = False
        self._thread: threading.Thread | None = None
        self._dropped_seen = dict(outbox.dropped)
        self._drops_lock = threading.Lock()
        self.client = self._make_client()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def outbox_depth(self) -> int:
        return self.outbox.depth()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty; gives up early when the broker is not connected."""
        deadline = time.monotonic() + timeout_s
        with self._drained:
            while self.outbox.depth():
                remaining = deadline - time.monotonic()
                if not self._connected or remaining <= 0:
                    return False
                self._drained.wait(remaining)
        return True

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected to the broker; for startup checks and tests, not for publishing."""
        return self._up.wait(timeout_s)

    def start(self) -> None:
        """Connect in the background: a broker that is down now is retried every 1..30 s."""
        kwargs: dict[str, Any] = {"clean_start": True} if self._v5 else {}
        self.client.connect_async(self.host, self.config.port, self.config.keepalive_s, **kwargs)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)
        self._thread.start()
        self._outbox_gauges()
        logger.info("MQTT %s:%d (protocol %s) topics %s/%s/...; %d messages waiting in the outbox",
                    self.host, self.config.port, self.config.protocol, self.config.prefix, self.station,
                    self.outbox.depth())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within timeout_s, announce offline, disconnect.

        Whatever is still unacknowledged stays in the outbox for the next start.
        """
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._connected:
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # lost the connection meanwhile: the Last Will says offline instead
        if self.client.is_connected():
            self.client.disconnect()  # clean DISCONNECT: the broker discards the Last Will
        self.client.loop_stop()
        self._set_connected(False, quiet=True)
        logger.info("MQTT stopped; %d messages left in the outbox", self.outbox.depth())

    def publish_verdict(self, verdict: dict[str, Any], heatmap_jpeg: bytes | None = None,
                        camera_heatmaps: dict[str, bytes] | None = None) -> None:
        """Queue a verdict (and its heatmap, or its cameras' heatmaps on heatmap/<camera>) for delivery;
        returns without waiting for the broker."""
        verdict = dict(verdict) if camera_heatmaps is not None else dict(verdict, heatmap=heatmap_jpeg is not None)
        verdict.setdefault("published_at", time.time())
        props = {"message_id": str(verdict.get("message_id", "")), "seq": str(verdict.get("seq", ""))}
        try:
            payload = json.dumps(verdict, separators=(",", ":"), allow_nan=False).encode()
            self.outbox.put("verdict", self.topics.verdict, payload, qos=1, retain=False, properties=props)
            if heatmap_jpeg is not None:
                self.outbox.put("heatmap", self.topics.heatmap, heatmap_jpeg, qos=1, retain=False, properties=props)
            for camera, jpeg in (camera_heatmaps or {}).items():
                self.outbox.put("heatmap", f"{self.topics.heatmap}/{camera}", jpeg, qos=1, retain=False,
                                properties={**props, "camera": camera})
        except Exception:
            # A full disk or a verdict that is not JSON must not stop the pipeline; it is logged and counted.
            logger.exception("could not queue verdict seq=%s in the outbox", verdict.get("seq"))
            self._metric("dropped", "outbox_error")
            return
        self._count_outbox_drops()
        self._outbox_gauges()
        self._wake.set()

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"edge-agent-{self.station}",
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            # Our outbox is the session: subscriptions are renewed on each connect.
            clean_session=None if self._v5 else True,
        )
        client.enable_logger(_paho_logger)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls.enabled:
            tls = cfg.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"mqtt.tls: cannot load the CA/client certificate: {e}; "
                                  "check mqtt.tls.ca_file, cert_file and key_file") from None
            if tls.insecure:
                logger.warning("mqtt.tls.insecure = true: the broker's hostname is not verified")
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.message_callback_add(self.topics.trigger, self._on_trigger_message)
        return client

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        threading.current_thread().name = "mqtt"  # paho's loop thread, so its log lines say so
        if reason_code.is_failure:
            # Unlike Frigate's handler we stop here: a refused connection is not connected.
            if not self._reported_down:
                logger.error("broker %s:%d refused the connection: %s; check mqtt.username/password and ACLs",
                             self.host, self.config.port, reason_code)
                self._reported_down = True
            return
        self.publish_info()
        # `online` waits for the SUBACK: a PLC that sees it may trigger at once and be heard.
        _rc, self._subscribe_mid = client.subscribe(self.topics.trigger, qos=1)
        self._set_connected(True)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        if refused:
            logger.error("broker refused the subscription to %s (%s); triggers cannot arrive, so `online` is not "
                         "published; allow this client to read that topic in the broker's ACL", self.topics.trigger,
                         refused[0])
            self._metric("trigger_rejected", "subscribe_refused")
            return
        client.publish(self.topics.status, "online", qos=1, retain=True)
        self.online.set()
        logger.info("subscribed to %s; announced online", self.topics.trigger)

    def publish_info(self) -> None:
        """Publish (retained) what the agent runs on status/info; a no-op without info or a connection."""
        if self._info is None:
            return
        try:
            body = json.dumps(self._info(), separators=(",", ":"), allow_nan=False)
        except Exception:
            logger.exception("status/info document could not be built")
            return
        self.client.publish(self.topics.status_info, body, qos=1, retain=True)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        threading.current_thread().name = "mqtt"
        if not self._reported_down:
            hint = " or its certificate did not verify (mqtt.tls)" if self.config.tls.enabled else ""
            logger.warning("broker %s:%d unreachable%s; retrying every %d..%d s, verdicts wait in the outbox",
                           self.host, self.config.port, hint, RECONNECT_MIN_S, RECONNECT_MAX_S)
            self._reported_down = True

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected and not self._stop.is_set():
            logger.warning("broker %s:%d disconnected (%s); reconnecting", self.host, self.config.port, reason_code)
            self._reported_down = True
        self.online.clear()
        self._set_connected(False, quiet=True)

    def _set_connected(self, up: bool, quiet: bool = False) -> None:
        with self._lock:
            changed = self._connected != up
            self._connected = up
            if up:
                self._up.set()
            else:
                self._up.clear()
            self._drained.notify_all()
        if changed:
            if up:
                logger.info("broker %s:%d connected", self.host, self.config.port)
                self._reported_down = False
            self._metric("broker_connected", up)
            self._wake.set()

    def _run(self) -> None:
        last_id = 0  # highest outbox id handed to paho by this instance; paho resends those itself
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                last_id = self._publish_some(last_id)
            except Exception:
                # A disk error must not end delivery for good: log, back off, try again.
                logger.exception("publishing from the outbox failed; retrying")
                self._stop.wait(1.0)

    def _publish_some(self, last_id: int) -> int:
        self._process_acks()
        if not self._connected:
            return last_id
        with self._lock:
            room = INFLIGHT_WINDOW - len(self._inflight)
        if room <= 0:
            return last_id
        batch = self.outbox.peek(room, after_id=last_id)
        for msg in batch:
            if self._stop.is_set():
                return last_id
            info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain,
                                       properties=self._properties(msg))
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                logger.warning("paho refused to queue outbox message %d: %s; retrying", msg.id, info.rc)
                self._stop.wait(0.1)
                self._wake.set()
                return last_id  # keep the order: this one goes before any later message
            with self._lock:
                self._inflight[info.mid] = msg
            last_id = msg.id
        if len(batch) == room:
            self._wake.set()  # there may be more behind this window
        return last_id

    def _properties(self, msg: Message) -> Properties | None:
        if not self._v5 or not msg.properties:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = CONTENT_TYPES.get(msg.kind, "application/octet-stream")
        props.UserProperty = list(msg.properties.items())
        return props

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._acks.put((mid, reason_code))
        self._wake.set()

    def _process_acks(self) -> None:
        while True:
            try:
                mid, reason_code = self._acks.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                msg = self._inflight.pop(mid, None)
            if msg is not None:  # None: a status or trigger-response publish
                self._delivered(msg, reason_code)

    def _delivered(self, msg: Message, reason_code: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # MQTT 5 broker refused it (e.g. ACL); resending would block every later verdict forever.
            logger.error("broker refused %s on %s: %s; dropping it", msg.kind, msg.topic, reason_code)
            self._metric("dropped", "broker_refused")
        else:
            self._metric("published", msg.kind)
            if self._on_delivered is not None:
                try:
                    self._on_delivered(msg, time.time() - msg.created_at)
                except Exception:
                    logger.exception("on_delivered callback failed")
        self.outbox.ack(msg.id)
        self._outbox_gauges()
        with self._lock:
            self._drained.notify_all()

    def _on_trigger_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._respond(self._desk.receive(message.payload))

    def _respond(self, body: dict[str, Any]) -> None:
        self.client.publish(self.topics.trigger_response, json.dumps(body), qos=1, retain=False)

    def _count_outbox_drops(self) -> None:
        with self._drops_lock:
            now = self.outbox.dropped
            new = {kind: count - self._dropped_seen.get(kind, 0) for kind, count in now.items()}
            self._dropped_seen = now
        for kind, n in new.items():
            for _ in range(n):
                self._metric("dropped", f"{kind}_outbox_full")

    def _outbox_gauges(self) -> None:
        self._metric("outbox_depth", self.outbox.depth())
        self._metric("outbox_bytes", self.outbox.bytes())

    def _metric(self, hook: str, *args: Any) -> None:
        fn = getattr(self._metrics, hook, None) if self._metrics is not None else None
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            # Most hooks run on paho's thread, where an exception would end the network loop.
            logger.exception("metrics hook %s failed", hook)
