"""The scoring service as a Ray Serve application: its options, its models and its builder.

`build(ServeOptions)` gives the application: one ModelScorer deployment per category (one for
a single model directory, named after it) behind one Router. `build_app(args)` is the same for
Ray Serve's own tools (`serve run stfpm.serving.app:build_app model=models/synth`, a `serve
deploy` config, KubeRay's RayService), `run` starts it for `stfpm serve`.

Every model's card and weights are checked before anything is deployed, so a model that cannot
load fails the start with the ModelCard's one-line message (a replica that still fails to load,
on another node, fails its deployment).
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from dataclasses import dataclass

APP_NAME = "stfpm"


def parse_replicas(text: str | int) -> tuple[int, int]:
    """"N" -> (N, N) fixed replicas; "MIN..MAX" -> autoscaled between them on queue length."""
    text = str(text).strip()
    m = re.fullmatch(r"(\d+)(?:\.\.(\d+))?", text)
    low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not m or high < 1 or low > high:
        raise ValueError(f"replicas must be N or MIN..MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


@dataclass(frozen=True)
class ServeOptions:
    """What `stfpm serve` and `build_app`'s args set (the args as strings, as `serve run` gives them)."""
    model: str                        # model directory (local or s3://) or registry YAML
    replicas: str = "1"               # per model: N, or MIN..MAX autoscaled on queue length
    max_batch_size: int = 16          # requests batched into one forward
    batch_wait_ms: float = 5.0        # how long a batch waits to fill
    cpus_per_replica: float = 1.0     # Ray CPUs per model replica
    gpus_per_replica: float = 0.0     # GPUs per model replica (a GPU node's replica runs on its GPU)
    threads_per_replica: int | None = None  # Paddle CPU threads (default: its CPUs)
    max_bytes: int = 32 << 20         # request body limit (413 above)
    max_pixels: int = 100_000_000     # decoded image limit (413 above)

    @classmethod
    def from_args(cls, args: dict) -> "ServeOptions":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)}; expected some of {', '.join(fields)}")
        if "model" not in args:
            raise ValueError("the argument 'model' is required: a model directory or a registry YAML")
        values = {}
        for name, value in args.items():
            kind = {"max_batch_size": int, "max_bytes": int, "max_pixels": int, "threads_per_replica": int,
                    "batch_wait_ms": float, "cpus_per_replica": float, "gpus_per_replica": float}.get(name, str)
            try:
                values[name] = None if value is None else kind(value)
            except ValueError:
                raise ValueError(f"argument {name} must be {kind.__name__}, got {value!r}") from None
        return cls(**values).checked()

    def checked(self) -> "ServeOptions":
        parse_replicas(self.replicas)
        for name in ("max_batch_size", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "cpus_per_replica", "gpus_per_replica"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


def model_uris(model: str) -> dict[str, str]:
    """{category: model directory}: a registry's entries, or one directory under its base name."""
    from stfpm.model.registry import is_registry, read_registry
    from stfpm.storage import filesystem_for, is_s3

    if is_registry(model):
        return read_registry(model)
    uri = model.rstrip("/") if is_s3(model) else filesystem_for(model)[1]
    return {posixpath.basename(uri.rstrip("/")): uri}


def check_models(uris: dict[str, str]) -> dict[str, dict]:
    """Each model's card, its weights checked against it (fetched to this node's cache if on
    s3://), as /v1/models shows it; ModelDirError (one line) for the first that cannot load."""
    from stfpm.model.artifact import verify_weights
    from stfpm.model.card import read_card
    from stfpm.storage import MODEL_CACHE, fetch_to_cache

    models = {}
    for category, uri in uris.items():
        local = fetch_to_cache(uri, MODEL_CACHE)
        card = read_card(local)
        verify_weights(local, card)
        models[category] = {"model_version": card.model_version, "model_name": card.model_name,
                            "backbone": card.backbone, "input_size": card.input.size,
                            "threshold": card.calibration.threshold, "uri": uri}
    return models


def deployment_name(category: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "_", category)


def build(options: ServeOptions, uris: dict[str, str] | None = None, models: dict[str, dict] | None = None):
    """The Ray Serve application of `options` (nothing runs until it is deployed); `uris` and
    `models` as `model_uris` and `check_models` give them, when the caller has them."""
    from ray import serve

    from stfpm.serving.router import Router
    from stfpm.serving.scorer import ModelScorer

    options.checked()
    uris = uris or model_uris(options.model)
    models = models or check_models(uris)
    low, high = parse_replicas(options.replicas)
    scaling = ({"num_replicas": low} if low == high else
               {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                       # queue length per replica that triggers another: a full batch
                                       "target_ongoing_requests": options.max_batch_size}})
    scorer = serve.deployment(ModelScorer)
    scorers = {
        category: scorer.options(
            name=deployment_name(category), **scaling,
            ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
            # room for the batch being computed and the next one filling
            max_ongoing_requests=2 * options.max_batch_size, max_constructor_retry_count=1,
        ).bind(category, uri, options.threads_per_replica, options.max_pixels, options.max_batch_size,
               options.batch_wait_ms / 1000)
        for category, uri in uris.items()}
    router = serve.deployment(Router).options(name="router", num_replicas=1, max_ongoing_requests=1000,
                                              ray_actor_options={"num_cpus": 0})
    return router.bind(scorers, models, options.max_bytes)


def build_app(args: dict):
    """The import path for Ray Serve's tools: `serve run stfpm.serving.app:build_app model=...`,
    and `import_path` in a `serve deploy` config or a RayService. `args` are ServeOptions' fields."""
    return build(ServeOptions.from_args(args))


def run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
        blocking: bool = True, on_ready=None) -> dict[str, dict]:
    """Deploy the app on the Ray at `ray_address` (default: RAY_ADDRESS's, else a local Ray of
    this process) with HTTP on host:port; with `blocking`, serve until interrupted (Ctrl-C,
    SIGTERM), then shut Serve down. `on_ready(models)` is called once it answers. Returns
    the models served (as /v1/models shows them)."""
    import os
    import signal
    import threading

    import ray
    from ray import serve

    from stfpm.noise import init_ray

    uris = model_uris(options.model)
    models = check_models(uris)
    app = build(options, uris, models)
    own_ray = not ray.is_initialized()
    try:
        if own_ray:
            address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
            init_ray(address=address, pin_workers=False, include_dashboard=False if address == "local" else None,
                     log_to_driver=False)
        if blocking:  # after ray.init, which sets its own: SIGTERM (a service manager's stop) is Ctrl-C
            signal.signal(signal.SIGTERM, _interrupt)
        serve.start(http_options={"host": host, "port": port})
        # no access-log line per request: at line rates it costs more than the request (Serve's
        # metrics and our counters count them)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
        except RuntimeError as e:  # a replica that could not start (e.g. its node cannot read the model)
            serve.shutdown()
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RuntimeError(f"the service did not start: {lines[-1] if lines else e}") from None
        if on_ready:
            on_ready(models)
        if not blocking:
            return models
        threading.Event().wait()  # until interrupted
    except KeyboardInterrupt:
        pass
    if blocking:
        serve.shutdown()
        if own_ray:
            ray.shutdown()
    return models


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
