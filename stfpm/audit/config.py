"""The nightly audit's configuration (AUDIT.yaml): dataclasses, loading and checking it."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

import yaml

from stfpm.scoring.dates import DateTemplate, has_date
from stfpm.scoring.table import reserved_names
from stfpm.errors import UserError
from stfpm.storage import filesystem_for, is_s3, read_bytes, refuse_credentials


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


# (test, expected form) per kind of value; a config value of the wrong kind is refused by name
KINDS = {
    "rate": (lambda v: _number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "positive int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    ">= 0": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "minutes": (lambda v: _number(v) and 0 <= v <= 7 * 24 * 60, "a number >= 0 and at most 10080 (a week)"),
    "> 0": (lambda v: _number(v) and v > 0, "a number > 0"),
    "hours": (lambda v: _number(v) and 0 < v <= 168, "a number of hours above 0, at most 168 (S3's limit)"),
    "number or null": (lambda v: v is None or _number(v), "a number, or left out"),
    "threshold or null": (lambda v: v is None or (_number(v) and math.isfinite(v) and v >= 0),
                          "a number, finite and >= 0, or left out"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "text": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "text or null": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a non-empty string, or left out"),
    "names or null": (lambda v: v is None or _names(v), "a list of names, e.g. [category, line]"),
    "folders or null": (lambda v: v is None or _names(v), "a list of folders, e.g. [/data/images]"),
    "extensions or null": (lambda v: v is None or (_names(v) and all(x.startswith(".") for x in v)),
                           'a list of file name endings, e.g. [".png", ".jpg"]'),
    "actors": (lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
               or (isinstance(v, str) and re.fullmatch(r"[1-9][0-9]*(\.\.[1-9][0-9]*)?", v) is not None
                   and int(v.partition("..")[0]) <= int(v.partition("..")[2] or v)),
               'N or "MIN..MAX" with 1 <= MIN <= MAX, e.g. 2 or "1..8"'),
    "actors or null": (lambda v: v is None or KINDS["actors"][0](v),
                       'N or "MIN..MAX" with 1 <= MIN <= MAX, e.g. 2 or "1..8", or left out'),
    "rates by name": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) and 0 <= x <= 1
                                                            for k, x in v.items()),
                      "a mapping of category names to numbers between 0 and 1"),
    "s3": (lambda v: isinstance(v, dict) and set(v) <= {"endpoint", "region"}
           and all(isinstance(x, str) and x for x in v.values()),
           "a mapping with endpoint and/or region strings, e.g. {region: us-east-1}"),
    "time or null": (lambda v: v is None or isinstance(v, datetime) or (isinstance(v, str) and _is_time(v)),
                     "an ISO time, e.g. 2026-11-01T00:00:00Z"),
}


def _is_time(text: str) -> bool:
    try:
        parse_time(text)
    except ValueError:
        return False
    return True


def _check(config, kinds: dict[str, str]) -> None:
    for name, kind in kinds.items():
        test, expected = KINDS[kind]
        value = getattr(config, name)
        if not test(value):
            raise UserError(f"{name} must be {expected}, got {value!r}")


@dataclass
class AlertConfig:
    anomaly_rate: float = 0.05          # alert when anomalous / ok images is above this
    min_images: int = 1                 # categories with fewer ok images never alert
    error_rate: float = 0.0             # exit 4 when transient errors (not bad files) / inputs is above this
    categories: dict = field(default_factory=dict)   # per-category anomaly_rate overrides
    ood_rate: float = 0.02              # alert when ood (unlike the training images) / ok is above this

    def __post_init__(self):
        _check(self, {"anomaly_rate": "rate", "min_images": "count", "error_rate": "rate", "ood_rate": "rate",
                      "categories": "rates by name"})

    def level(self, category: str) -> float:
        return float(self.categories.get(category, self.anomaly_rate))


@dataclass
class ReportConfig:
    top_k: int = 12                     # most anomalous images shown per category
    overlays: bool = True               # let the scorer draw overlays of anomalous inputs
    link_expiry_hours: float = 168      # presigned URLs, when images or output are on S3

    def __post_init__(self):
        _check(self, {"top_k": "count", "overlays": "bool", "link_expiry_hours": "hours"})


@dataclass
class ScoringConfig:
    """Passed to stfpm.scoring.score (see its docstring)."""
    batch_size: int = 32
    actors: str | None = None           # N or MIN..MAX (autoscaling pool); default: score's (choose_layout)
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    threshold: float | None = None
    wait_for_actors_s: float = 600
    extensions: list | None = None      # listed from `source`; default: every type the decoder reads
    allow_roots: list | None = None     # local inputs only from under these folders; default: anywhere

    def __post_init__(self):
        _check(self, {"batch_size": "positive int", "actors": "actors or null", "gpus_per_actor": ">= 0",
                      "cpus_per_actor": "> 0", "threshold": "threshold or null", "wait_for_actors_s": "> 0",
                      "extensions": "extensions or null", "allow_roots": "folders or null"})


@dataclass
class AuditConfig:
    output: str
    models: str                         # model directory or registry YAML (category -> model)
    source: str | None = None           # folder or s3:// prefix of images
    manifests: str | None = None        # or: a manifest, or a folder/prefix of manifests
    root: str | None = None             # manifests: the folder partitions are counted from
    partitions: list | None = None      # folder levels under source/root, e.g. [category, line]
    settle_minutes: float = 15
    first_run_since: str | None = None  # inputs that arrived before it are never taken
    lookback_days: int = 1              # a {date} source: days before the last run's also listed (late arrivals)
    ray_address: str | None = None      # default: the job's cluster, else a local Ray
    s3: dict = field(default_factory=dict)   # endpoint, region (credentials: the AWS chain)
    alert: AlertConfig = field(default_factory=AlertConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        _check(self, {"output": "text", "models": "text", "source": "text or null", "manifests": "text or null",
                      "root": "text or null", "partitions": "names or null", "settle_minutes": "minutes",
                      "first_run_since": "time or null", "ray_address": "text or null", "s3": "s3",
                      "lookback_days": "count"})
        for name, nested in (("alert", AlertConfig), ("report", ReportConfig), ("scoring", ScoringConfig)):
            if not isinstance(getattr(self, name), nested):
                raise UserError(f"{name} must be a mapping of its settings, got {getattr(self, name)!r}")
        for name in ("output", "models", "source", "manifests", "root"):  # before anything is written or logged
            refuse_credentials(getattr(self, name) or "", name)
        for name in ("source", "manifests"):  # a {date} template is checked now (exit 2), not at night
            if has_date(getattr(self, name)):
                try:
                    DateTemplate.parse(getattr(self, name))
                except UserError as e:
                    raise UserError(f"{name}: {e}") from None
        self.source = self.source.rstrip("/") if self.source else self.source
        self.manifests = self.manifests.rstrip("/") if self.manifests else self.manifests
        if (self.source is None) == (self.manifests is None):
            raise UserError("the audit config needs exactly one of `source` (images) and `manifests`")
        reserved = reserved_names() | {"arrived_at"}
        if clash := reserved.intersection(self.partitions or []):
            raise UserError(f"partitions {sorted(clash)} are columns of the score table; choose other names")
        if self.partitions and len(set(self.partitions)) != len(self.partitions):
            raise UserError(f"partitions {self.partitions} name a level twice; each name once")
        if isinstance(self.first_run_since, datetime):  # YAML reads an unquoted time as one
            self.first_run_since = iso(parse_time(self.first_run_since.isoformat()))
        self.output = self.output.rstrip("/")

    def check_paths(self) -> None:
        """The models and the input exist (local paths; s3:// ones are found when read)."""
        for name in ("models", "source", "manifests", "root"):
            value = getattr(self, name)
            value = DateTemplate.parse(value).root if has_date(value) and name != "models" else value
            if value and not is_s3(value) and not os.path.exists(filesystem_for(value)[1]):
                raise UserError(f"{name}: {value} does not exist")
        if not is_s3(self.output) and os.path.exists(filesystem_for(self.output)[1]) \
                and not os.path.isdir(filesystem_for(self.output)[1]):
            raise UserError(f"output: {self.output} is a file; the audit writes a folder there")

    @property
    def input(self) -> str:
        return self.source if self.source is not None else self.manifests


def _build(cls, doc, uri: str, prefix: str = ""):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(doc, dict):
        raise UserError(f"{uri}: {where} must be a mapping, got {doc!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise UserError(f"{uri}: {where}: unknown keys {unknown}; known: {sorted(known)}")
    nested = {"alert": AlertConfig, "report": ReportConfig, "scoring": ScoringConfig}
    values = {k: _build(nested[k], v or {}, uri, f"{prefix}{k}.") if k in nested else v for k, v in doc.items()}
    try:
        return cls(**values)
    except UserError as e:
        raise UserError(f"{uri}: {prefix}{e}") from None
    except TypeError as e:  # a required key missing
        raise UserError(f"{uri}: {where}: {e}") from None


def load_config(uri: str) -> AuditConfig:
    """The audit config from a YAML file (local or s3://), every key checked (type, range,
    and that local paths exist) before anything is written; a bad one is a UserError
    naming the key and the expected form."""
    try:
        doc = yaml.safe_load(read_bytes(uri))
    except yaml.YAMLError as e:
        raise UserError(f"{uri}: not valid YAML ({e})") from None
    cfg = _build(AuditConfig, doc, uri)
    try:
        cfg.check_paths()
    except UserError as e:
        raise UserError(f"{uri}: {e}") from None
    return cfg



def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat() if t else None
