"""One model behind Ray Serve: the requests of many clients batched into one forward.

Each request carries the image bytes; the batch goes through the project's one per-image path
(`stfpm.model.inference.Predictor`: prepare, one batched forward, calibrate, and the 8-bit map
`stfpm.model.heatmap` stores), so a served score is `predict`'s and the nightly table's for the
same bytes. A bad image is an error result of its own request (never of the batch, never a
dead replica); a model that cannot load fails the replica, and so the deployment, at start.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from ray import serve

REQUEST_NAME = "request body"  # how a bad image is named in its one-line error


@dataclass
class ScoreRequest:
    data: bytes
    threshold: float | None = None  # None: the model's
    want_map: bool = False          # also the 8-bit map PNG (base64), at the image's size


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class ModelScorer:
    """A Ray Serve deployment class (made one by `app.build`): the Predictor of one model
    directory, fetched to the node's cache when it is on s3://, on the device Ray assigned."""

    def __init__(self, category: str, uri: str, threads: int | None = None, max_pixels: int = 100_000_000,
                 max_batch_size: int = 16, batch_wait_s: float = 0.005):
        import paddle

        from stfpm.model.inference import Predictor
        from stfpm.runtime import ray_paddle_device
        from stfpm.storage import MODEL_CACHE, fetch_to_cache

        device, self.device = ray_paddle_device()
        paddle.set_device(device)
        self.category, self.max_pixels = category, max_pixels
        self.predictor = Predictor.open(fetch_to_cache(uri, MODEL_CACHE), threads=threads)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def predict(self, request: ScoreRequest) -> dict:
        return await self.score_batch(request)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score_batch(self, requests: list[ScoreRequest]) -> list[dict]:
        return self.score(requests)

    def score(self, requests: list[ScoreRequest]) -> list[dict]:
        """One result per request: the prediction, or {"error", "status"} for a bad image (413
        above max_pixels, 422 not an image / truncated / corrupt); the good ones in one forward."""
        from stfpm.data.images import ImageDecodeError, ImageTooLarge
        from stfpm.model.heatmap import encode_png, heat_at, to_heat

        t0 = time.perf_counter()
        p = self.predictor
        results: list[dict | None] = [None] * len(requests)
        prepared = []
        for i, request in enumerate(requests):
            try:
                prepared.append((i, p.prepare(request.data, REQUEST_NAME, self.max_pixels)))
            except ImageTooLarge as e:
                results[i] = {"error": _one_line(e), "status": 413}
            except (ImageDecodeError, ValueError) as e:
                results[i] = {"error": _one_line(e), "status": 422}
        if prepared:
            sizes = [(m.height, m.width) for _, m in prepared]
            try:
                maps, oods = p.image_maps([m.tiles for _, m in prepared], sizes)
            except Exception as e:  # noqa: BLE001 - the batch's requests fail, the replica lives
                for i, _ in prepared:
                    results[i] = {"error": f"model: {_one_line(e)}", "status": 500}
                return results
            forward_ms = (time.perf_counter() - t0) * 1000
            for (i, _), amap, ood, (h, w) in zip(prepared, maps, oods, sizes):
                request = requests[i]
                # calibrated at the map's own scale, as the nightly table's rows and maps are
                pred = p.calibrate([amap], [ood], [amap.shape], request.threshold)[0]
                result = {"category": self.category, "score": pred.score, "norm_score": pred.norm_score,
                          "is_anomaly": pred.is_anomaly, "decision": "anomaly" if pred.is_anomaly else "ok",
                          "threshold": pred.threshold, "ood": pred.ood, "ood_score": pred.ood_score,
                          "model_version": p.model_version, "height": h, "width": w,
                          "batch_size": len(prepared), "forward_ms": round(forward_ms, 3), "device": self.device}
                if request.want_map:
                    heat = to_heat(p.calibration.normalize(pred.anomaly_map, pred.threshold))
                    result["map_png"] = base64.b64encode(encode_png(heat_at(heat, h, w))).decode("ascii")
                results[i] = result
        return results
