"""Evaluation on a labelled test split: image AUROC, pixel AUROC, AUPRO (FPR <= 0.3),
F1-optimal threshold and per-defect-type image AUROC (docs/design.md §2: not mIoU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stfpm.model.artifact import LoadedModel
from stfpm.data import Dataset, read_mask
from stfpm.model.inference import Predictor
from stfpm.metrics import PixelMetrics, auroc, f1_max


def evaluate_model(model: LoadedModel, dataset: Dataset, batch_size: int = 32,
                   threshold: float | None = None, predictor: Predictor | None = None) -> dict:
    """`predictor`: one already built on `model` (e.g. the same network under another map
    variant, bench/accuracy.py); by default one is built here with `threshold`."""
    samples = dataset.test
    labels = np.array([s.label for s in samples])
    if len(samples) == 0 or labels.min() == labels.max():
        raise ValueError(f"{dataset.root}: evaluation needs good and defective test images; "
                         f"found {int((labels == 0).sum())} good and {int((labels == 1).sum())} defective")
    predictor = predictor or Predictor.from_model(model, threshold)
    has_masks = all(s.mask is not None for s in samples if s.label == 1)
    # STFPM maps lie in [0, 8], PatchCore's patch distances reach the hundreds: bins up to 1e4
    pixels = PixelMetrics(hi=1e4) if has_masks else None
    scores, records = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        inputs = [predictor.prepare(Path(s.image).read_bytes(), s.image) for s in chunk]
        for sample, prepared, pred in zip(chunk, inputs, predictor.run(inputs)):
            scores.append(pred.score)
            records.append({"image": sample.image, "defect_type": sample.defect_type, "label": sample.label,
                            "score": pred.score, "norm_score": pred.norm_score, "is_anomaly": pred.is_anomaly,
                            "ood": pred.ood, "ood_score": pred.ood_score})
            if pixels is not None:
                shape = (prepared.height, prepared.width)
                mask = read_mask(sample.mask, shape) if sample.mask else np.zeros(shape, dtype=bool)
                pixels.update(pred.anomaly_map, mask)
    scores = np.array(scores)
    f1, f1_thr = f1_max(labels, scores)
    decided = scores >= predictor.threshold
    per_type = {}
    for dtype in sorted({s.defect_type for s in samples if s.label == 1}):
        keep = np.array([s.label == 0 or s.defect_type == dtype for s in samples])
        per_type[dtype] = auroc(labels[keep], scores[keep])
    metrics = {
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": _or_none(pixels.pixel_auroc) if pixels else None,
        "aupro": _or_none(lambda: pixels.aupro(0.3)) if pixels else None,
        "image_f1_max": f1,
        "image_f1_threshold": f1_thr,
        "per_defect_type_image_auroc": per_type,
        "at_model_threshold": {
            "threshold": predictor.threshold,
            "precision": float((decided & (labels == 1)).sum() / max(decided.sum(), 1)),
            "recall": float((decided & (labels == 1)).sum() / max((labels == 1).sum(), 1)),
            "false_positive_rate": float((decided & (labels == 0)).sum() / max((labels == 0).sum(), 1)),
        },
        "n_good": int((labels == 0).sum()),
        "n_defective": int((labels == 1).sum()),
    }
    notes = [] if has_masks else ["some defective images have no mask: pixel metrics are unavailable"]
    return {"metrics": metrics, "notes": notes, "images": records,
            "model_version": model.card.model_version, "dataset": dataset.root}


def _or_none(metric):
    """Pixel metrics are undefined when the masks hold no defect pixel: report null."""
    try:
        return metric()
    except ValueError:
        return None


def write_evaluation(result: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "evaluate_result.json"
    path.write_text(json.dumps(result, indent=2))
    return path
