"""The HTTP ingress of the scoring service.

    POST /v1/{category}/predict   the image as the body (any content type), or multipart with
                                  one file field; query `threshold=T` (this request's
                                  threshold), `map=1` (also the 8-bit map PNG, base64)
    GET  /healthz                 {"status": "ok", "categories": [...]}
    GET  /v1/models               each category's model: version, kind, backbone, input size,
                                  threshold

Every answer is JSON. Bad input is a 4xx with one line, {"error": "..."}: 400 a bad parameter
or form, 404 an unknown category or path, 405 a wrong method, 413 a body above max_bytes or an
image above max_pixels, 422 a body that is not a readable image (empty, not an image,
truncated, corrupt). Nothing a client sends can make a 500 or stop a replica.
"""
from __future__ import annotations

import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from stfpm.serving.scorer import ScoreRequest

TRUE = ("1", "true", "yes", "on")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


class Counters:
    """Our own Prometheus counters, per category (Ray Serve exports them beside its own, as
    ray_stfpm_serve_*): requests by status code, anomalies and ood inputs among the scored."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("stfpm_serve_requests", "scoring requests, by category and HTTP status",
                                        tag_keys=("category", "status"))
        self.anomalies = metrics.Counter("stfpm_serve_anomalies", "requests decided anomalous, by category",
                                         tag_keys=("category",))
        self.ood = metrics.Counter("stfpm_serve_ood", "requests unlike the model's training images, by category",
                                   tag_keys=("category",))

    def count(self, category: str, status: int, result: dict | None = None) -> None:
        self.requests.inc(tags={"category": category, "status": str(status)})
        if result is not None:
            if result["is_anomaly"]:
                self.anomalies.inc(tags={"category": category})
            if result["ood"]:
                self.ood.inc(tags={"category": category})


class Router:
    """A Ray Serve deployment class (made one by `app.build`): routes each request to its
    category's ModelScorer. `models` holds what /v1/models answers (read from the model cards
    when the app was built)."""

    def __init__(self, scorers: dict, models: dict[str, dict], max_bytes: int):
        self.scorers, self.models, self.max_bytes = scorers, models, max_bytes
        self.counters = Counters()

    async def __call__(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        parts = [p for p in request.url.path.split("/") if p]
        try:
            if parts == ["healthz"]:
                self._method(request, "GET")
                return JSONResponse({"status": "ok", "categories": sorted(self.models)})
            if parts == ["v1", "models"]:
                self._method(request, "GET")
                return JSONResponse({"models": self.models})
            if len(parts) == 3 and parts[0] == "v1" and parts[2] == "predict":
                return await self._predict(request, parts[1], t0)
            raise BadRequest(404, f"no such path {request.url.path!r}: POST /v1/{{category}}/predict, "
                                  "GET /v1/models, GET /healthz")
        except BadRequest as e:
            return error(e.status, e.message)
        except Exception as e:  # noqa: BLE001 - a fault of ours answers 500 and the replica lives on
            return error(500, f"internal error: {type(e).__name__}: {e}")

    @staticmethod
    def _method(request: Request, method: str) -> None:
        if request.method != method:
            raise BadRequest(405, f"{request.url.path} takes {method}, not {request.method}")

    async def _predict(self, request: Request, category: str, t0: float) -> JSONResponse:
        known = category in self.scorers
        try:
            self._method(request, "POST")
            if not known:
                raise BadRequest(404, f"unknown category {category!r}; served: {', '.join(sorted(self.scorers))} "
                                      "(GET /v1/models)")
            data, form = await self._body(request)
            threshold = self._threshold(request.query_params.get("threshold", form.get("threshold")))
            want_map = str(request.query_params.get("map", form.get("map", ""))).lower() in TRUE
            result = await self.scorers[category].predict.remote(ScoreRequest(data, threshold, want_map))
        except BadRequest as e:
            self.counters.count(category if known else "unknown", e.status)
            raise
        if "error" in result:
            self.counters.count(category, result["status"])
            return error(result["status"], result["error"])
        self.counters.count(category, 200, result)
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return JSONResponse(result)

    async def _body(self, request: Request) -> tuple[bytes, dict]:
        """The image bytes (the body, or a multipart form's one file) and the form's other fields;
        a body above max_bytes is refused from its Content-Length, or once that many bytes came."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise BadRequest(413, f"request body is {int(length):,} bytes, above the limit of {self.max_bytes:,}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self._form(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                raise BadRequest(413, f"request body is above the limit of {self.max_bytes:,} bytes")
        return bytes(body), {}

    async def _form(self, request: Request) -> tuple[bytes, dict]:
        try:
            form = await request.form(max_files=2, max_fields=10)
        except Exception as e:  # noqa: BLE001 - starlette/multipart's own errors for a malformed form
            raise BadRequest(400, f"malformed multipart form (it takes exactly one file field, the image): {e}") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if len(files) != 1:
            raise BadRequest(400, f"a multipart request needs exactly one file field (the image), got {len(files)}")
        data = await files[0].read()
        if len(data) > self.max_bytes:
            raise BadRequest(413, f"image is {len(data):,} bytes, above the limit of {self.max_bytes:,}")
        return data, {k: v for k, v in form.items() if isinstance(v, str)}

    @staticmethod
    def _threshold(value) -> float | None:
        if value is None or value == "":
            return None
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise BadRequest(400, f"threshold must be a number, got {str(value)[:40]!r}")
        return threshold
