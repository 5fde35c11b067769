"""The station's TOML configuration: pydantic models and load_config().

Every key has a description and a default; unknown keys are rejected. Errors name the key,
the offending value and the fix, one line each, and raise ConfigError (exit code 2).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StationConfig(Section):
    id: str = Field("station-1", description="Station id; the MQTT topic level under the prefix.")
    name: str = Field("", description="Human-readable station name, echoed in status messages.")

    @field_validator("id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        _check_topic_level(v)
        return v


class ModelConfig(Section):
    path: Path = Field(Path("models/demo-vae.pt"), description="The TorchScript model file (edge-agent artifact).")
    score: str | None = Field(None, description="Score name to use; default: the model card's default score.")
    threshold: float | None = Field(
        None, description="Override the model card's threshold for this score (prefer `edge-agent calibrate`)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Inference device; auto = CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="Inference precision; auto = bf16 on CPUs with AMX/AVX512-BF16 where a bf16 GEMM measures "
        ">= 1.2x fp32 at start, on GPUs of compute capability >= 8.0; fp16 on older GPUs; fp32 otherwise."
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Patches per forward pass; 64 keeps a CPU's activations "
                            "in cache; on a GPU take 256 (H200: 1.2x the patches/s of 64 in fp16, docs/PERFORMANCE.md).")
    ignore_mask: Path | None = Field(
        None, description="PNG whose black pixels mark areas where patches do not count (overrides the card's)."
    )


class SourceConfig(Section):
    kind: Literal["file", "device", "url", "gstreamer", "folder"] = Field(
        "file", description="Frame source: video file, V4L2 device, RTSP/HTTP URL, GStreamer pipeline, image folder."
    )
    uri: str = Field("", description="File/folder path, device index or path (/dev/video0), URL, or pipeline.")
    loop: bool = Field(False, description="Replay a file or folder from the start when it ends.")
    width: int | None = Field(None, ge=1, description="Requested capture width (devices that support it).")
    height: int | None = Field(None, ge=1, description="Requested capture height (devices that support it).")
    fps: float | None = Field(None, gt=0, description="Requested capture rate; for file/folder, the replay rate.")
    stall_timeout_s: float = Field(5.0, gt=0, description="No frame within this many seconds = stalled; reconnect.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles up to reconnect_max_s.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")

    @model_validator(mode="after")
    def _uri_needed(self) -> SourceConfig:
        if not self.uri:
            raise ValueError(f"source.uri is empty; set the {self.kind} to read (e.g. uri = \"parts.mp4\")")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("source.reconnect_max_s is below source.reconnect_min_s; raise reconnect_max_s")
        return self


class InspectionConfig(Section):
    mode: Literal["free-run", "triggered"] = Field(
        "free-run", description="free-run: inspect frames as they come; triggered: one frame per PLC trigger."
    )
    max_fps: float = Field(0.0, ge=0, description="Free-run rate cap in frames/s; 0 = every frame the scorer can take.")
    queue_size: int = Field(2, ge=1, le=64, description="Frames waiting for inference; the oldest is dropped when full.")
    default_recipe: str = Field(
        "", description="Recipe for free-run frames and triggers without a recipe; empty = the only one in [recipes]."
    )


class TriggerConfig(Section):
    deadline_s: float = Field(
        5.0, gt=0, description="A trigger with no frame within this many seconds gets an ERROR verdict and is never "
        "paired with a later frame."
    )
    remember: int = Field(
        1024, ge=1, le=1_000_000, description="Recent trigger_ids remembered, so a PLC retry is answered, not inspected twice."
    )
    cameras: list[str] = Field(
        default_factory=list, description="Camera ids one trigger captures from (one part, one verdict); empty = every camera."
    )


class RecipeConfig(Section):
    model: Path = Field(description="The TorchScript model file for this recipe; [model] gives device, precision etc.")
    threshold: float | None = Field(None, description="Override this model card's threshold.")
    ignore_mask: Path | None = Field(None, description="PNG whose black pixels mark areas that do not count.")


class CameraConfig(Section):
    id: str = Field(description="Camera id, unique in the station; the `camera` label and the heatmap/<camera> topic level.")
    source: SourceConfig = Field(description="Where this camera's frames come from (the keys of [source]).")
    model: Path | None = Field(
        None, description="This camera's model for every recipe it does not map in recipes; default: [model].path "
        "(or the recipe's model)."
    )
    threshold: float | None = Field(None, description="Override the threshold of this camera's model(s).")
    ignore_mask: Path | None = Field(None, description="PNG whose black pixels mark where this camera's patches do not count.")
    recipes: dict[str, Path] = Field(
        default_factory=dict, description="Recipe name -> this camera's model file for it; names come from [recipes]."
    )
    retain: bool | None = Field(None, description="Keep this camera's frames as [retention] says; default: retention.enabled.")
    retention_dir: Path | None = Field(None, description="Where this camera's retained frames go; default: <retention.dir>/<id>.")

    @field_validator("id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        _check_topic_level(v)
        return v


class QualityConfig(Section):
    enabled: bool = Field(True, description="Check every frame before it is judged; a frame that fails is ERROR, never OK.")
    min_std: float = Field(
        2.0, ge=0, description="Pixel standard deviation (0-255 scale) below which a frame is uniform (a grey frame "
        "from a broken stream)."
    )
    dark_level: int = Field(16, ge=0, le=255, description="Pixels at or below this level count as dark.")
    max_dark_fraction: float = Field(
        0.95, gt=0, le=1, description="More than this share of dark pixels = underexposed (lamp off, lens covered)."
    )
    bright_level: int = Field(240, ge=0, le=255, description="Pixels at or above this level count as saturated.")
    max_bright_fraction: float = Field(
        0.95, gt=0, le=1, description="More than this share of saturated pixels = overexposed."
    )
    frozen_frames: int = Field(
        10, ge=0, description="This many byte-identical frames in a row from a live source (device, url, gstreamer) = "
        "frozen; 0 = off. Stored files and folders are never judged frozen."
    )


class TlsConfig(Section):
    enabled: bool = Field(False, description="Connect with TLS; the server certificate is verified.")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate; default: system CAs.")
    cert_file: Path | None = Field(None, description="Client certificate for certificate authentication.")
    key_file: Path | None = Field(None, description="Client private key for certificate authentication.")
    insecure: bool = Field(False, description="Skip hostname verification (test benches only).")


class MqttConfig(Section):
    host: str = Field("", description="Broker host (the plant broker the PLC/MES reads); required unless embedded.")
    embedded: bool = Field(
        False, description="Start a private mosquitto on 127.0.0.1:port instead (demos, a PLC on this machine); "
        "host must then be empty."
    )
    port: int = Field(1883, ge=1, le=65535, description="Broker port (also the embedded broker's port).")
    prefix: str = Field("edge-agent", description="Topic prefix; topics are <prefix>/<station>/verdict etc.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    client_id: str = Field("", description="Client id; default edge-agent-<station>.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")
    username: str = Field("", description="Username for password authentication.")
    password_file: Path | None = Field(
        None,
        description="File holding the password; $VARIABLES expand when it is read, so a systemd credential is "
        '"${CREDENTIALS_DIRECTORY}/mqtt-password".',
    )
    password_env: str = Field("", description="Environment variable holding the password.")
    heatmap: Literal["ng", "all", "never"] = Field("ng", description="Which verdicts get a heatmap JPEG.")
    heatmap_quality: int = Field(80, ge=10, le=100, description="Heatmap JPEG quality.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")
    trigger_rate_per_s: float = Field(
        20.0, gt=0, description="PLC triggers accepted per second (burst of the same size); excess get an error reply."
    )

    @model_validator(mode="after")
    def _broker_chosen(self) -> MqttConfig:
        # An empty host once meant a silent private broker: verdicts that looked delivered, read by nobody.
        if self.embedded and self.host:
            raise ValueError(f"mqtt.host = {self.host!r} and mqtt.embedded = true contradict; "
                             "drop host to use the embedded broker, or embedded to use that broker")
        if not self.embedded and not self.host:
            raise ValueError("mqtt.host is empty; set the plant broker (host = \"broker.plant\") or "
                             "embedded = true for a private broker on 127.0.0.1")
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix_safe(cls, v: str) -> str:
        for level in v.split("/"):
            _check_topic_level(level)
        return v

    def password(self) -> str | None:
        """The password from password_file or password_env; never logged."""
        if self.password_file is not None:
            path = Path(os.path.expandvars(self.password_file))
            if "$" in str(path):
                # Expanded here, not at load: systemd sets $CREDENTIALS_DIRECTORY only for the service.
                raise ConfigError(f"mqtt.password_file {self.password_file}: a variable in it is not set; run it under "
                                  "systemd with LoadCredential=mqtt-password:... or give a plain path")
            try:
                return path.read_text().strip()
            except OSError as e:
                raise ConfigError(f"mqtt.password_file {path}: {e.strerror}; fix the path or permissions")
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env names {self.password_env!r}, which is not set; export it")
            return value
        return None


class OutboxConfig(Section):
    dir: Path = Field(Path("/var/lib/edge-agent/outbox"), description="Durable queue of unacknowledged messages.")
    max_mb: float = Field(256.0, gt=0, description="Outbox size limit; heatmaps are dropped first when full.")
    flush_timeout_s: float = Field(
        10.0, ge=0, description="At shutdown, wait this long for the broker to acknowledge queued messages; "
        "the rest stay in the outbox for the next start."
    )


class MetricsConfig(Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    bind: str = Field("127.0.0.1", description="Metrics bind address; loopback by default.")
    port: int = Field(9108, ge=0, le=65535, description="Metrics port (0 = pick a free one).")


class RetentionConfig(Section):
    enabled: bool = Field(False, description="Save NG frames with their verdict JSON for audit and retraining.")
    dir: Path = Field(Path("/var/lib/edge-agent/retention"), description="Where retained frames go.")
    max_mb: float = Field(1024.0, gt=0, description="Folder size bound; the oldest files are removed first.")
    ok_sample_rate: float = Field(0.0, ge=0, le=1, description="Fraction of OK frames to keep as well.")


class WebConfig(Section):
    enabled: bool = Field(True, description="Serve the station page and its read-only JSON API over HTTP.")
    host: str = Field(
        "127.0.0.1", description="Page bind address; loopback by default. Any other address needs web.auth_file."
    )
    port: int = Field(8108, ge=0, le=65535, description="Page port (0 = pick a free one).")
    auth_file: Path | None = Field(
        None,
        description="File holding the page's access token (sent as a Bearer token or as the password of HTTP basic "
        'auth); $VARIABLES expand when it is read, so a systemd credential is "${CREDENTIALS_DIRECTORY}/web-token".',
    )
    recent: int = Field(60, ge=1, le=1000, description="Recent verdicts the page keeps in memory (the strip, /api/verdicts).")

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> WebConfig:
        if self.enabled and self.auth_file is None and not is_loopback(self.host):
            raise ValueError(f"web.host = {self.host!r} is not a loopback address, so the page needs a token: set "
                             'web.auth_file (e.g. "${CREDENTIALS_DIRECTORY}/web-token") or web.host = "127.0.0.1"')
        return self

    def token(self) -> str | None:
        """The access token from auth_file; None when the page is open (loopback without auth_file)."""
        if self.auth_file is None:
            return None
        path = Path(os.path.expandvars(self.auth_file))
        if "$" in str(path):
            raise ConfigError(f"web.auth_file {self.auth_file}: a variable in it is not set; run it under systemd "
                              "with LoadCredential=web-token:... or give a plain path")
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"web.auth_file {path}: {e.strerror}; fix the path or permissions")
        if not token:
            raise ConfigError(f"web.auth_file {path} is empty; write a token into it (e.g. openssl rand -hex 16)")
        return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class Config(Section):
    station: StationConfig = Field(default_factory=StationConfig, description="Who this station is.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="What scores the frames.")
    source: SourceConfig = Field(description="Where frames come from (one camera; with [[cameras]], the first camera's).")
    cameras: list[CameraConfig] = Field(
        default_factory=list, description="Several cameras under this station, one [[cameras]] table each; empty = the "
        "one camera of [source]."
    )
    inspection: InspectionConfig = Field(default_factory=InspectionConfig, description="When to inspect.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Which frames can be judged at all.")
    trigger: TriggerConfig = Field(default_factory=TriggerConfig, description="PLC triggers.")
    recipes: dict[str, RecipeConfig] = Field(
        default_factory=dict,
        description="Recipe name -> model; a trigger's recipe picks the model. None: [model] judges every trigger.",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Where verdicts go.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable delivery.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="Audit copies of frames.")
    web: WebConfig = Field(default_factory=WebConfig, description="The station page.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")

    @model_validator(mode="before")
    @classmethod
    def _mqtt_section(cls, data: Any) -> Any:
        # A config without [mqtt] names no broker: validate an empty section so the error says what to set.
        if isinstance(data, dict) and "mqtt" not in data:
            data = {**data, "mqtt": {}}
        return data
    @model_validator(mode="before")
    @classmethod
    def _source_of_cameras(cls, data: Any) -> Any:
        # With [[cameras]] there is no [source]: config.source is the first camera's, so one-camera code reads it.
        if isinstance(data, dict) and data.get("cameras") and "source" not in data:
            first = data["cameras"][0]
            if isinstance(first, dict) and isinstance(first.get("source"), dict):
                data = {**data, "source": first["source"]}
        return data

    @model_validator(mode="after")
    def _cameras_consistent(self) -> Config:
        ids = [c.id for c in self.cameras]
        seen: set[str] = set()
        for cid in ids:
            if cid in seen:
                raise ValueError(f"cameras: id {cid!r} is used twice; give every [[cameras]] table its own id")
            seen.add(cid)
        for cid in self.trigger.cameras:
            if cid not in seen:
                known = f"one of {ids}" if ids else "a camera defined as [[cameras]] id = \"...\""
                raise ValueError(f"trigger.cameras names camera {cid!r}, which does not exist; use {known}")
        for cam in self.cameras:
            for name in cam.recipes:
                if name not in self.recipes:
                    raise ValueError(f"cameras {cam.id!r}: recipe {name!r} is not in [recipes] (known: "
                                     f"{sorted(self.recipes)}); add [recipes.{name}] or fix the name")
        return self

    @model_validator(mode="after")
    def _default_recipe_known(self) -> Config:
        default, names = self.inspection.default_recipe, sorted(self.recipes)
        if self.recipes and not default and len(names) > 1:
            raise ValueError(f"inspection.default_recipe is empty but there are {len(names)} recipes; set it to one "
                             f"of {names}")
        if default and default not in self.recipes:
            known = f"one of {names}" if names else "a recipe defined as [recipes.<name>] model = \"...\""
            raise ValueError(f"inspection.default_recipe = {default!r} is not a recipe; set it to {known}")
        return self

    def recipe_models(self) -> dict[str, ModelConfig]:
        """Recipe name -> its model settings; without [recipes], one recipe "" from [model]."""
        if not self.recipes:
            return {"": self.model}
        return {name: self.model.model_copy(update={"path": r.model, "threshold": r.threshold,
                                                    "ignore_mask": r.ignore_mask})
                for name, r in self.recipes.items()}

    def default_recipe_name(self) -> str:
        return self.inspection.default_recipe or (sorted(self.recipes)[0] if self.recipes else "")

    def trigger_cameras(self) -> list[str]:
        """The camera ids one trigger captures from."""
        return list(self.trigger.cameras) or [c.id for c in self.cameras]

    def for_camera(self, cam: CameraConfig) -> Config:
        """This station's config as one camera sees it: its source, its models per recipe, its retention.

        The camera's recipes replace the station's (same names); a camera without its own model uses the
        station's; its threshold and mask override the recipe's."""
        def model_of(name: str, path: Path, threshold: float | None, mask: Path | None) -> tuple[Path, float | None,
                                                                                             Path | None]:
            own = cam.recipes.get(name, cam.model)
            if cam.threshold is not None:
                threshold = cam.threshold
            elif own is not None:
                threshold = None  # the station's threshold belongs to the station's model: use the card's
            return own or path, threshold, cam.ignore_mask or mask

        path, threshold, mask = model_of("", self.model.path, self.model.threshold, self.model.ignore_mask)
        model = self.model.model_copy(update={"path": path, "threshold": threshold, "ignore_mask": mask})
        recipes = {}
        for name, r in self.recipes.items():
            path, threshold, mask = model_of(name, r.model, r.threshold, r.ignore_mask)
            recipes[name] = r.model_copy(update={"model": path, "threshold": threshold, "ignore_mask": mask})
        retain = self.retention.enabled if cam.retain is None else cam.retain
        retention = self.retention.model_copy(update={"enabled": retain,
                                                      "dir": cam.retention_dir or self.retention.dir / cam.id})
        return self.model_copy(update={"source": cam.source, "model": model, "recipes": recipes,
                                       "retention": retention, "cameras": [cam]})


def _check_topic_level(level: str) -> None:
    if not level or any(c in level for c in "+#/\0"):
        raise ValueError(f"{level!r} is not a valid MQTT topic level; use letters, digits, '-' or '_' without + # /")


def _parse_value(text: str) -> Any:
    """A --set value: TOML scalar syntax when it parses (1, 2.5, true, "x"), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (from --set) to raw TOML data."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value; write e.g. --set mqtt.port=1884")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section; check the key name")
        value = value.strip()
        parsed = _parse_value(value)
        # `--set mqtt.protocol=5` parses as the number 5; a text field (str, Path, a Literal of strings)
        # takes what was typed, so a value valid for its field as a string is accepted.
        node[leaf] = value if not isinstance(parsed, str) and _textual(key.strip().split(".")) else parsed
    return data


def _textual(path: list[str]) -> bool:
    """True when the Config field at path takes text only (no number or boolean would be valid)."""
    model: Any = Config
    for i, part in enumerate(path):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        ann = fields[part].annotation
        if i < len(path) - 1:
            model = ann
            continue
        kinds = set()
        for arg in get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,):
            if get_origin(arg) is Literal:
                kinds |= {type(v) for v in get_args(arg)}
            elif arg is not type(None):
                kinds.add(arg)
        return bool(kinds) and all(isinstance(k, type) and issubclass(k, (str, Path)) for k in kinds)
    return False


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}; remove it or check its spelling (deploy/config.example.toml lists every key)")
        elif e["type"] == "missing":
            lines.append(f"{source}: {key} is required; add it")
        elif isinstance(e.get("input"), dict):  # a check of a whole section names its keys itself
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {key} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a station config; ConfigError names every problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; copy deploy/config.example.toml there")
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}")
    data = apply_overrides(data, overrides or [])
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path)))
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in a config file are relative to the file, so a config works from any cwd."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    src = config.source
    if src.kind in ("file", "folder") and not Path(src.uri).is_absolute():
        src = src.model_copy(update={"uri": str(base / src.uri)})
    recipes = {name: r.model_copy(update={"model": fix(r.model), "ignore_mask": fix(r.ignore_mask)})
               for name, r in config.recipes.items()}

    def fix_source(s: SourceConfig) -> SourceConfig:
        if s.kind in ("file", "folder") and not Path(s.uri).is_absolute():
            return s.model_copy(update={"uri": str(base / s.uri)})
        return s

    cameras = [c.model_copy(update={"source": fix_source(c.source), "model": fix(c.model),
                                    "ignore_mask": fix(c.ignore_mask), "retention_dir": fix(c.retention_dir),
                                    "recipes": {n: fix(p) for n, p in c.recipes.items()}})
               for c in config.cameras]
    return config.model_copy(
        update={
            "cameras": cameras,
            "recipes": recipes,
            "model": config.model.model_copy(
                update={"path": fix(config.model.path), "ignore_mask": fix(config.model.ignore_mask)}
            ),
            "source": src,
            "outbox": config.outbox.model_copy(update={"dir": fix(config.outbox.dir)}),
            "retention": config.retention.model_copy(update={"dir": fix(config.retention.dir)}),
        }
    )
