"""From a trained network to a calibrated model directory: the card, the map chosen by proxy
AUROC, the threshold and score scale fitted on held-out good images, the in-distribution check,
saving and, with a labelled test split, evaluation. Shared by every model kind and by Ray Train."""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stfpm.model.artifact import LoadedModel, save_model
from stfpm.model.card import Calibration, InputSpec, MapSpec, ModelCard, write_card
from stfpm.nn import STFPM, backbone_spec
from stfpm.nn.maps import view_scale
from stfpm.nn.stfpm import profile_layout
from stfpm.model.ood import InDistribution
from stfpm.model.score_scale import ScoreScale
from stfpm.storage import is_s3, upload_dir
from stfpm.training.config import TrainConfig, TrainResult, TrainSplit, fingerprint, load_images

logger = logging.getLogger(__name__)

UNCALIBRATED = Calibration(threshold=0.0, score_min=0.0, score_max=1.0)  # a card's until it is calibrated


def calibrate_threshold(holdout_scores: np.ndarray, quantile: float) -> Calibration:
    """Threshold = a high quantile of held-out good images' scores (docs/design.md §3); the
    normalised score's scale is fitted on the same scores (stfpm.model.score_scale)."""
    threshold = float(np.quantile(holdout_scores, quantile))
    return Calibration(threshold=threshold, score_min=float(holdout_scores.min()),
                       score_max=float(holdout_scores.max()), source="holdout_quantile",
                       details={"quantile": quantile, "n_images": int(len(holdout_scores))},
                       score_scale=ScoreScale.fit(holdout_scores, threshold))


def holdout_scores(predictor, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The image scores of the good images at `paths`, scored by predict's own path
    (`Predictor.prepare`, `tile_forward`, `stitch`), and their inputs' feature profiles: (N, 1)
    the stitched map's max, or with the whole+tiles views (N, 2) each view's own, whole first
    (`Tiling.views`), which `combine_views` turns into the map's max by the views' scales."""
    tiling = predictor.tiling
    scores, profiles = [], []
    for i in range(0, len(paths), 64):
        inputs = [predictor.prepare(Path(p).read_bytes(), p) for p in paths[i:i + 64]]
        counts = [len(x.tiles) for x in inputs]
        maps, chunk_profiles = predictor.tile_forward(np.concatenate([x.tiles for x in inputs]),
                                                      predictor.view_rows(counts))
        if tiling is not None and tiling.whole:
            starts = np.cumsum([0, *counts])
            scores += [[float(m.max()) for m in tiling.views(maps[a:b], x.height, x.width)]
                       for a, b, x in zip(starts[:-1], starts[1:], inputs)]
        else:
            scores += [[float(m.max())] for m in predictor.stitch(maps, counts, [(x.height, x.width) for x in inputs])]
        profiles.append(chunk_profiles)
    return np.array(scores, np.float64), None if profiles[0] is None else np.concatenate(profiles)


def calibrate_on_good_images(network: STFPM, card: ModelCard, holdout_paths: list[str], quantile: float,
                             reference_paths: list[str]) -> ModelCard:
    """`card` calibrated for `network` (its input and map settings are used, its calibration is
    not), from one pass over the good images at `holdout_paths` it was not trained on
    (`holdout_scores`): the threshold and score scale from their scores and, for the
    whole+tiles views, first map.tile_view_scale, the median of each view's scores
    (stfpm.data.tiling.combine_views divides each view's map by its own); the
    in-distribution check's statistics from the good images at `reference_paths` (the
    training split) with its cell level and limit from the held-out ones (tiles, for a tiled
    model; stfpm.model.ood). Training's calibration, also used on import."""
    from stfpm.model.inference import Predictor

    predictor = Predictor.from_model(LoadedModel(network=network, card=card, path=""))
    scores, profiles = holdout_scores(predictor, holdout_paths)
    if scores.shape[1] == 2:  # the max of the combined map is the larger of the views' scaled maxima
        scale = tuple(max(float(v), 1e-12) for v in np.median(scores, axis=0))
        logger.info(f"whole+tiles views: median held-out score {scale[0]:.4g} whole, {scale[1]:.4g} in tiles")
        card = dataclasses.replace(card, map=dataclasses.replace(card.map, tile_view_scale=scale))
        scores = scores / np.asarray(scale, np.float64)
    calibration = calibrate_threshold(scores.max(axis=1), quantile)
    reference = feature_profiles(predictor, reference_paths)
    check = InDistribution.fit(reference, profiles, *profile_layout(card.backbone))
    return dataclasses.replace(card, calibration=dataclasses.replace(
        calibration, ood=check, details={**calibration.details, "n_ood_reference": len(reference)}))


def feature_profiles(predictor, paths: list[str], chunk: int = 64) -> np.ndarray:
    """The forward's feature profiles of the images (tiles) at `paths`, `chunk` images at a time."""
    return np.concatenate([predictor.forward(load_images(paths[i:i + chunk], predictor.size, predictor.mean,
                                                         predictor.std, predictor.tiling)[0])[1]
                           for i in range(0, len(paths), chunk)])


def finalize(network: STFPM, cfg: TrainConfig, split: TrainSplit, holdout_images: np.ndarray,
             out_dir: str, history: list[dict]) -> TrainResult:
    """Shared by single-process and Ray Train training: the STFPM model's card, then
    `calibrate_and_save`."""
    from stfpm.model.inference import Predictor
    from stfpm.training.proxy import map_variant_proxies, to_rgb_uint8, variant_name

    network.eval()
    best = min(history, key=lambda r: r["holdout_loss"])
    dataset = split.dataset
    spec = backbone_spec(cfg.backbone)
    card = ModelCard(
        model_name="STFPM", backbone=cfg.backbone, student=cfg.student, input=InputSpec.for_backbone(
            cfg.backbone, cfg.image_size, cfg.tiling),
        calibration=UNCALIBRATED,
        map=MapSpec(layer_norm=cfg.layer_norm, combine=cfg.combine), taps=list(spec.channels), recipe=asdict(cfg),
        training={"data": str(dataset.root), "layout": dataset.layout,
                  "n_train": len(split.train), "n_holdout": len(split.holdout),
                  "data_fingerprint": fingerprint([s.image for s in dataset.train]),
                  "best_epoch": best["epoch"], "best_holdout_loss": best["holdout_loss"],
                  "final_loss": history[-1]["loss"]})
    layer_forward = Predictor.from_model(LoadedModel(network=network, card=card, path="")).layer_forward
    layers, _ = layer_forward(holdout_images)
    card = dataclasses.replace(card, map=dataclasses.replace(  # for layer_norm "holdout" and "views"
        card.map, layer_scale=tuple(float(np.mean(layer)) for layer in layers),
        view_scale=view_scale(layers, (cfg.image_size, cfg.image_size))))
    proxies = map_variant_proxies(card, layer_forward, to_rgb_uint8(holdout_images, spec.mean, spec.std))
    if cfg.map_selection == "proxy":  # the best proxy AUROC; a tie keeps the recipe's own map
        own = variant_name(card.map)
        chosen = max(proxies, key=lambda name: (proxies[name], name == own))
        card = dataclasses.replace(card, map=dataclasses.replace(
            card.map, **dict(zip(("layer_norm", "combine"), chosen.split("/")))))
    card = dataclasses.replace(card, validation={
        "method": "held-out good images vs the same with synthetic defects (stfpm.training.proxy)",
        "n_images": len(split.holdout), "n_rows": len(holdout_images), "proxy_auroc": proxies, "map_selection": cfg.map_selection,
        "map": variant_name(card.map)})
    card, metrics = calibrate_and_save(network, card, split, out_dir, cfg, history)
    return TrainResult(str(out_dir), best["epoch"], best["holdout_loss"], card.calibration, history, metrics)


def calibrate_and_save(network, card: ModelCard, split: TrainSplit, out_dir: str,
                       cfg: TrainConfig, log: list[dict]) -> tuple[ModelCard, dict | None]:
    """For every model kind: calibrate on the held-out images (and the training split, for the
    in-distribution check), write the model directory (`log` as train_log.jsonl) and, when the
    dataset has a labelled test split, evaluate on it and store the metrics. Returns the card
    as written and the metrics."""
    from stfpm.evaluate import evaluate_model

    network.eval()
    dataset = split.dataset
    logger.info(f"calibrating the threshold on {len(split.holdout)} held-out good images")
    card = calibrate_on_good_images(network, card, [s.image for s in split.holdout], cfg.threshold_quantile,
                                    [s.image for s in split.train])
    with tempfile.TemporaryDirectory() as tmp:
        local_dir = Path(tmp) if is_s3(str(out_dir)) else Path(out_dir)
        card = save_model(network, local_dir, card)
        (local_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        metrics = None
        if any(s.label == 1 for s in dataset.test) and any(s.label == 0 for s in dataset.test):
            logger.info(f"evaluating on the {len(dataset.test)} test images")
            model = LoadedModel(network=network, card=card, path=str(local_dir))
            metrics = evaluate_model(model, dataset, batch_size=cfg.batch_size)["metrics"]
            card = dataclasses.replace(card, metrics=metrics)
            write_card(local_dir, card)
        if local_dir != Path(out_dir):
            upload_dir(local_dir, str(out_dir))
    return card, metrics
