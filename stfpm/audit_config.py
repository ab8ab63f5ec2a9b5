"""The nightly audit's configuration (AUDIT.yaml): dataclasses, loading and checking it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

import yaml

from stfpm.storage import read_bytes


@dataclass
class AlertConfig:
    anomaly_rate: float = 0.05          # alert when anomalous / ok images is above this
    min_images: int = 1                 # categories with fewer ok images never alert
    categories: dict = field(default_factory=dict)   # per-category anomaly_rate overrides

    def level(self, category: str) -> float:
        return float(self.categories.get(category, self.anomaly_rate))


@dataclass
class ReportConfig:
    top_k: int = 12                     # most anomalous images shown per category
    overlays: bool = True               # let the scorer draw overlays of anomalous inputs
    link_expiry_hours: float = 168      # presigned URLs, when images or output are on S3


@dataclass
class ScoringConfig:
    """Passed to stfpm.distributed.score (see its docstring)."""
    batch_size: int = 32
    actors: str = "1"                   # N or MIN..MAX (autoscaling pool)
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    threshold: float | None = None
    wait_for_actors_s: float = 600
    extensions: list | None = None      # listed from `source`; default: every type the decoder reads


@dataclass
class AuditConfig:
    output: str
    models: str                         # model directory or registry YAML (category -> model)
    source: str | None = None           # folder or s3:// prefix of images
    manifests: str | None = None        # or: a manifest, or a folder/prefix of manifests
    root: str | None = None             # manifests: the folder partitions are counted from
    partitions: list | None = None      # folder levels under source/root, e.g. [category, line]
    settle_minutes: float = 15
    first_run_since: str | None = None  # first run only: ignore inputs that arrived before
    ray_address: str | None = None      # default: the job's cluster, else a local Ray
    s3: dict = field(default_factory=dict)   # endpoint, region (credentials: the AWS chain)
    alert: AlertConfig = field(default_factory=AlertConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        self.source = self.source.rstrip("/") if self.source else self.source
        self.manifests = self.manifests.rstrip("/") if self.manifests else self.manifests
        if (self.source is None) == (self.manifests is None):
            raise ValueError("the audit config needs exactly one of `source` (images) and `manifests`")
        if self.partitions is not None and not (isinstance(self.partitions, list)
                                                and all(isinstance(p, str) for p in self.partitions)):
            raise ValueError(f"partitions must be a list of names, got {self.partitions!r}")
        if self.settle_minutes < 0 or self.report.top_k < 0 or self.alert.min_images < 0:
            raise ValueError("settle_minutes, report.top_k and alert.min_images must be >= 0")
        for name, level in {"anomaly_rate": self.alert.anomaly_rate, **self.alert.categories}.items():
            if not 0 <= float(level) <= 1:
                raise ValueError(f"alert level {name}: {level} is not a rate between 0 and 1")
        if isinstance(self.first_run_since, datetime):  # YAML reads an unquoted time as one
            self.first_run_since = iso(parse_time(self.first_run_since.isoformat()))
        if self.first_run_since:
            parse_time(str(self.first_run_since))
        unknown = set(self.s3) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"s3: unknown keys {sorted(unknown)}; known: endpoint, region")
        self.output = self.output.rstrip("/")

    @property
    def input(self) -> str:
        return self.source if self.source is not None else self.manifests


def _build(cls, doc, where: str):
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be a mapping, got {doc!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    nested = {"alert": AlertConfig, "report": ReportConfig, "scoring": ScoringConfig}
    values = {k: _build(nested[k], v or {}, f"{where}.{k}") if k in nested else v for k, v in doc.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(uri: str) -> AuditConfig:
    """The audit config from a YAML file (local or s3://); unknown keys are errors."""
    try:
        doc = yaml.safe_load(read_bytes(uri))
    except yaml.YAMLError as e:
        raise ValueError(f"{uri}: not valid YAML ({e})") from None
    return _build(AuditConfig, doc, uri)



def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat() if t else None
