"""Label-free validation: held-out good images against the same images with a synthetic
defect pasted in (stfpm.data.synth.add_defect). The image AUROC of telling them apart ranks
map variants (and could rank checkpoints) without a single real anomaly."""
from __future__ import annotations

import hashlib
from itertools import product

import numpy as np

from stfpm.data import DEFECT_KINDS, add_defect, normalize_batch
from stfpm.metrics import auroc
from stfpm.nn.map_options import COMBINES, LAYER_NORMS

# every map anomaly_map can form, as model.json "map" entries
MAP_VARIANTS = tuple({"layer_norm": norm, "combine": combine} for norm, combine in product(LAYER_NORMS, COMBINES)
                     if norm != "views" or combine == "product")  # "views" combines by product only


def variant_name(variant) -> str:
    """A map variant (a dict or a card.MapSpec) as "layer_norm/combine"."""
    get = variant.get if isinstance(variant, dict) else lambda key: getattr(variant, key)
    return f"{get('layer_norm')}/{get('combine')}"


def with_synthetic_defects(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """RGB uint8 (N, S, S, 3) -> the same images, each with one defect (the kinds in turn)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([seed, 7, i])
        out[i] = add_defect(image, DEFECT_KINDS[i % len(DEFECT_KINDS)], rng)[0]
    return out


def to_rgb_uint8(batch: np.ndarray, mean, std) -> np.ndarray:
    """The inverse of normalize_batch: float32 (N, 3, S, S) -> RGB uint8 (N, S, S, 3)."""
    rgb = batch.transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def run_once(layer_forward):
    """`layer_forward` that runs the network once per distinct batch (map variants of one
    model then cost no further forward)."""
    seen = {}

    def forward(batch: np.ndarray):
        key = hashlib.sha1(np.ascontiguousarray(batch).tobytes()).hexdigest()
        if key not in seen:
            seen[key] = layer_forward(batch)
        return seen[key]

    return forward


def proxy_auroc(predictor, good: np.ndarray, defective: np.ndarray) -> float:
    """Image AUROC of `predictor` (stfpm.model.inference.Predictor) on RGB uint8 good images
    against `with_synthetic_defects` of them."""
    scores = [predictor.forward(normalize_batch(batch, predictor.mean, predictor.std))[0].reshape(len(batch), -1).max(1)
              for batch in (good, defective)]
    return auroc(np.r_[np.zeros(len(good)), np.ones(len(defective))], np.concatenate(scores))


def map_variant_proxies(card, layer_forward, good: np.ndarray) -> dict[str, float]:
    """Proxy AUROC of every map variant of one network (`card`: its card.ModelCard, with
    the map's layer_scale), e.g. {"median/product": 0.91, ...}."""
    import dataclasses

    from stfpm.model.inference import Predictor

    forward, defective = run_once(layer_forward), with_synthetic_defects(good)
    return {variant_name(v): proxy_auroc(Predictor(dataclasses.replace(card, map=dataclasses.replace(card.map, **v)),
                                                   forward), good, defective)
            for v in MAP_VARIANTS}
