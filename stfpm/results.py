"""PaddleX-style result objects: presentation kept out of the predictor.

A result is a dict with PaddleX's keys (`input_path`, `pred`) plus the image-level score,
decision and full-resolution anomaly map PaddleX lacks. Arrays are never dumped into JSON:
they are summarised (shape, range, defect regions)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from stfpm.model.card import Calibration
from stfpm.model.heatmap import overlay, panel, render, to_heat
from stfpm.model.inference import Prediction

SUMMARY_KEYS = ("input_path", "score", "norm_score", "is_anomaly", "threshold", "ood", "ood_score")


def defect_regions(mask: np.ndarray, anomaly_map: np.ndarray, limit: int = 20) -> list[dict]:
    """Connected regions of the predicted mask, largest first: bbox [x, y, w, h], area, peak score."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        regions.append({"bbox": [x, y, w, h], "area": area,
                        "max_score": float(anomaly_map[labels == i].max())})
    return sorted(regions, key=lambda r: -r["area"])[:limit]


class AnomalyResult(dict):
    """One image's result: dict keys `input_path`, `score`, `norm_score`, `is_anomaly`,
    `threshold`, `ood` (the image is unlike the training images: its score is not to be
    trusted; None when the model has no in-distribution check), `ood_score` (> 1 is ood),
    `anomaly_map` (float32 HxW), `pred` (uint8 0/255 HxW)."""

    def __init__(self, input_path: str | None, image: np.ndarray, prediction: Prediction,
                 calibration: Calibration, index: int = 0):
        super().__init__(input_path=input_path, score=prediction.score, norm_score=prediction.norm_score,
                         is_anomaly=prediction.is_anomaly, threshold=prediction.threshold,
                         ood=prediction.ood, ood_score=prediction.ood_score,
                         anomaly_map=prediction.anomaly_map, pred=prediction.pred)
        self._image, self._prediction = image, prediction
        self._calibration = calibration
        self._index = index

    @property
    def json(self) -> dict:
        amap, pred = self["anomaly_map"], self["pred"]
        res = {k: self[k] for k in SUMMARY_KEYS}
        res["anomaly_map"] = {"shape": list(amap.shape), "dtype": "float32", "min": float(amap.min()),
                              "max": float(amap.max()), "mean": float(amap.mean())}
        res["pred"] = {"shape": list(pred.shape), "dtype": "uint8",
                       "defect_fraction": float((pred > 0).mean()),
                       "regions": defect_regions(pred, amap)}
        return {"res": res}

    def _heat(self) -> np.ndarray:
        p = self._prediction
        return to_heat(self._calibration.normalize(p.anomaly_map, p.threshold))

    @property
    def img(self) -> dict:
        """The pictures (stfpm.model.heatmap): "res" the overlay (the image in its own colours,
        tinted only above the normal level), "panel" image | map | mask side by side."""
        p, heat = self._prediction, self._heat()
        return {"res": overlay(self._image, heat, p.is_anomaly, p.norm_score, p.score),
                "panel": panel(self._image, heat, p.is_anomaly, p.norm_score, p.score)}

    def _default_name(self) -> str:
        return Path(self["input_path"]).stem if self["input_path"] else f"image_{self._index:06d}"

    def _target(self, save_path: str | Path, suffix: str) -> Path:
        path = Path(save_path)
        if path.suffix.lower() != suffix and (path.is_dir() or not path.suffix):
            path = path / f"{self._default_name()}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def print(self, format_json: bool = True, indent: int = 4, ensure_ascii: bool = False) -> None:
        data = self.json
        print(json.dumps(data, indent=indent if format_json else None, ensure_ascii=ensure_ascii))

    def save_to_json(self, save_path: str | Path, indent: int = 4, ensure_ascii: bool = False) -> Path:
        """A directory save_path gets `<input stem>.json`; a .json path is used as given."""
        path = self._target(save_path, ".json")
        path.write_text(json.dumps(self.json, indent=indent, ensure_ascii=ensure_ascii))
        return path

    def save_to_img(self, save_path: str | Path, view: str = "overlay") -> Path:
        """A directory save_path gets `<input stem>.png`; a file path is used as given. `view`:
        "overlay" (`img["res"]`) or "panel" (image | map | mask, `img["panel"]`)."""
        p = self._prediction
        picture = render(view, self._image, self._heat(), p.is_anomaly, p.norm_score, p.score)
        path = Path(save_path)
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            path = self._target(save_path, ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), picture):
            raise OSError(f"could not write image {path}")
        return path

    def __repr__(self) -> str:
        return json.dumps(self.json["res"])
