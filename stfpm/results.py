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
from stfpm.storage import printable_path

# `score` is PaddleX's name for the raw score; `raw_score` (the same value) and `norm_score` are
# the names the score table uses (its `score` column is the normalised one: stfpm.scoring.TABLE_DOC).
SUMMARY_KEYS = ("input_path", "score", "raw_score", "norm_score", "is_anomaly", "threshold", "ood", "ood_score")


def defect_regions(mask: np.ndarray, anomaly_map: np.ndarray, limit: int = 20) -> list[dict]:
    """Connected regions of the predicted mask, largest first: bbox [x, y, w, h], area, peak score."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        regions.append({"bbox": [x, y, w, h], "area": area,
                        "max_score": float(anomaly_map[labels == i].max())})
    return sorted(regions, key=lambda r: -r["area"])[:limit]


def output_stem(input_path: str | None, index: int) -> str:
    """The file name (without suffix) a result is saved under: <folder>_<stem>
    (test/good/000.png -> good_000, test/crack/000.png -> crack_000), so same-named images of
    different folders do not overwrite each other; image_<index> for arrays."""
    if input_path is None:
        return f"image_{index:06d}"
    path = Path(input_path.split("?")[0]) if "://" in input_path else Path(input_path)
    return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem


class OutputNames:
    """Unique output stems within one predict call: `output_stem`, then _1, _2... when two
    inputs still share one (a/x/000.png and b/x/000.png)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, input_path: str | None, index: int) -> str:
        stem = base = output_stem(input_path, index)
        k = 1
        while stem in self.used:
            stem, k = f"{base}_{k}", k + 1
        self.used.add(stem)
        return stem


class AnomalyResult(dict):
    """One image's result: dict keys `input_path`, `score` (raw: the map's max; also as
    `raw_score`, the score table's name for it), `norm_score` (the table's `score`), `is_anomaly`,
    `threshold`, `ood` (the image is unlike the training images: its score is not to be
    trusted; None when the model has no in-distribution check), `ood_score` (> 1 is ood),
    `anomaly_map` (float32 HxW), `pred` (uint8 0/255 HxW)."""

    def __init__(self, input_path: str | None, image: np.ndarray, prediction: Prediction,
                 calibration: Calibration, index: int = 0, name: str | None = None):
        super().__init__(input_path=input_path, score=prediction.score, raw_score=prediction.score,
                         norm_score=prediction.norm_score,
                         is_anomaly=prediction.is_anomaly, threshold=prediction.threshold,
                         ood=prediction.ood, ood_score=prediction.ood_score,
                         anomaly_map=prediction.anomaly_map, pred=prediction.pred)
        self._image, self._prediction = image, prediction
        self._calibration = calibration
        self._index = index
        self.name = name or output_stem(input_path, index)  # what save_to_img / save_to_json call it in a folder

    @property
    def json(self) -> dict:
        amap, pred = self["anomaly_map"], self["pred"]
        res = {k: self[k] for k in SUMMARY_KEYS}
        if res["input_path"]:  # JSON is UTF-8: a file name that is not has its odd bytes written \xNN
            res["input_path"] = printable_path(res["input_path"])
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

    def _target(self, save_path: str | Path, suffix: str) -> Path:
        path = Path(save_path)
        if path.suffix.lower() != suffix and (path.is_dir() or not path.suffix):
            path = path / f"{self.name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def print(self, format_json: bool = True, indent: int = 4, ensure_ascii: bool = False) -> None:
        data = self.json
        print(json.dumps(data, indent=indent if format_json else None, ensure_ascii=ensure_ascii))

    def save_to_json(self, save_path: str | Path, indent: int = 4, ensure_ascii: bool = False) -> Path:
        """A directory save_path gets `<name>.json` (`<folder>_<stem>`, unique within one predict
        call: `OutputNames`); a .json path is used as given."""
        path = self._target(save_path, ".json")
        path.write_text(json.dumps(self.json, indent=indent, ensure_ascii=ensure_ascii))
        return path

    def save_to_img(self, save_path: str | Path, view: str = "overlay") -> Path:
        """A directory save_path gets `<name>.png` (as save_to_json); a file path is used as
        given. `view`: "overlay" (`img["res"]`) or "panel" (image | map | mask, `img["panel"]`)."""
        p = self._prediction
        picture = render(view, self._image, self._heat(), p.is_anomaly, p.norm_score, p.score)
        path = Path(save_path)
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            path = self._target(save_path, ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        # encoded here and written by Python: cv2.imwrite crashes the process (SIGSEGV) on a
        # path whose name is not UTF-8, as a file found in a folder may have
        encoded, data = cv2.imencode(path.suffix.lower(), picture)
        if not encoded:
            raise OSError(f"could not encode image {path}")
        path.write_bytes(data.tobytes())
        return path

    def __repr__(self) -> str:
        return json.dumps(self.json["res"])
