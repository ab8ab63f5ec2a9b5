"""The one batched forward + post-processing used by predict, evaluate and batch scoring.

A batch of decoded images goes through ONE forward pass; each map is then resized back to
its own image's size, scored (max of the map), normalised (0.5 at the threshold, DESIGN §7)
and thresholded into a 0/255 mask.

The forward runs on one of two engines that give the same maps (within 1e-6): on CPU the
network compiled into Paddle Inference with oneDNN (`stfpm.export.compile_network`, 3.6-5x
faster than the dynamic graph); on GPU, or where Paddle lacks oneDNN, the dynamic graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import paddle

from stfpm.artifact import Calibration, LoadedModel, ModelCard
from stfpm.data.images import normalize_batch, preprocess
from stfpm.nn import anomaly_map

ENGINES = ("auto", "onednn", "dygraph")


@dataclass
class Prediction:
    score: float            # raw: max of the anomaly map
    norm_score: float       # clip((score - threshold) / (max - min) + 0.5, 0, 1)
    is_anomaly: bool
    threshold: float
    anomaly_map: np.ndarray  # float32 (H, W) at the input image's own size
    pred: np.ndarray         # uint8 (H, W) 0/255 mask, map >= threshold


def normalize_score(raw, threshold: float, score_min: float, score_max: float):
    """`Calibration.normalize` for a bare threshold and score range."""
    return Calibration(float(threshold), float(score_min), float(score_max)).normalize(raw)


class Predictor:
    """Post-processing around a layer-map forward: a model directory's network compiled into
    Paddle Inference (CPU) or run on the dynamic graph (GPU), or an exported model's program;
    all give the same maps."""

    def __init__(self, card: ModelCard, layer_forward: Callable[[np.ndarray], list], threshold: float | None = None):
        self.card = card
        self.layer_forward = layer_forward  # (N, 3, S, S) normalised input -> per-layer (N, h, w) maps
        self.size = card.input.size
        self.mean, self.std = card.input.mean, card.input.std
        self.calibration = card.calibration
        self.threshold = card.calibration.threshold if threshold is None else float(threshold)
        self.score_min, self.score_max = card.calibration.score_min, card.calibration.score_max
        self.layer_norm = card.map.layer_norm

    @classmethod
    def from_model(cls, model: LoadedModel, threshold: float | None = None, engine: str = "auto",
                   threads: int | None = None) -> "Predictor":
        """`engine`: "onednn" (Paddle Inference on CPU), "dygraph", or "auto": oneDNN unless the
        process runs on a GPU or Paddle was built without oneDNN. `threads`: CPU intra-op
        threads (default `stfpm.runtime.cpu_threads()`)."""
        from stfpm.runtime import configure_threads

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        threads = configure_threads(threads)
        network = model.network
        if engine == "auto":
            on_gpu = paddle.device.get_device().startswith("gpu")
            engine = "dygraph" if on_gpu or not paddle.base.core.is_compiled_with_mkldnn() else "onednn"
        if engine == "onednn":
            from stfpm.export import compile_network

            return cls(model.card, compile_network(network, model.card.input.size, threads), threshold)
        network.eval()

        def layer_forward(batch: np.ndarray) -> list:
            with paddle.no_grad():
                return [d.numpy() for d in network.layer_maps(paddle.to_tensor(batch))]

        return cls(model.card, layer_forward, threshold)

    @classmethod
    def open(cls, model_dir, threshold: float | None = None, threads: int | None = None) -> "Predictor":
        """A model directory from `stfpm train`, or an exported one from `stfpm export`."""
        from stfpm.export import is_exported, load_exported

        if is_exported(model_dir):
            card, forward = load_exported(model_dir, threads)
            return cls(card, forward, threshold)
        from stfpm.artifact import load_model

        return cls.from_model(load_model(model_dir), threshold, threads=threads)

    @property
    def model_version(self) -> str:
        return self.card.model_version

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 normalised input -> (N, S, S) float32 anomaly maps."""
        return anomaly_map(self.layer_forward(batch), (batch.shape[2], batch.shape[3]), self.layer_norm)

    def predict(self, images: list[np.ndarray], threshold: float | None = None) -> list[Prediction]:
        """BGR uint8 images of any sizes -> one Prediction each, from a single forward pass."""
        if not images:
            return []
        maps = self.forward(preprocess(images, self.size, self.mean, self.std))
        return self.postprocess(maps, [image.shape[:2] for image in images], threshold)

    def predict_resized(self, batch: np.ndarray, sizes: list[tuple[int, int]],
                        threshold: float | None = None) -> list[Prediction]:
        """For pipelines that decode and resize elsewhere (Ray Data CPU tasks): `batch` is
        uint8 (N, S, S, 3) RGB from `resize_for_model`, `sizes` the (h, w) to return maps at."""
        return self.postprocess(self.forward(normalize_batch(batch, self.mean, self.std)), sizes, threshold)

    def postprocess(self, maps: np.ndarray, sizes: list[tuple[int, int]],
                    threshold: float | None = None) -> list[Prediction]:
        """(N, S, S) maps -> Predictions with maps and masks resized to each (h, w)."""
        thr = self.threshold if threshold is None else float(threshold)
        scores = maps.reshape(len(maps), -1).max(axis=1)
        norm = self.calibration.normalize(scores, thr)
        out = []
        for (h, w), amap, score, ns in zip(sizes, maps, scores, norm):
            full = amap if (h, w) == amap.shape else cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
            out.append(Prediction(score=float(score), norm_score=float(ns), is_anomaly=bool(score >= thr),
                                  threshold=thr, anomaly_map=full,
                                  pred=np.where(full >= thr, 255, 0).astype(np.uint8)))
        return out
