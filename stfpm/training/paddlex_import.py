"""Import an STFPM model trained by PaddleX / PaddleSeg (`.pdparams`) into a model directory.

PaddleSeg's STFPM (`paddleseg/models/stfpm.py`, which PaddleX's anomaly-detection module
trains) holds a `teacher` and a `student` `ResNet_MS3`: `paddle.vision` ResNet18's children up
to layer4 wrapped in `nn.Sequential`, so its parameters are `{teacher,student}.model.<i>.<rest>`
with i = 0 conv1, 1 bn1, 4-7 layer1-4 (2 relu and 3 maxpool hold none). The features come
from layer1-3, as ours; layer4 is computed and thrown away there, and dropped here. The file
is read by the restricted unpickler of `stfpm.model.weights` (arrays and dicts only), and the
threshold is calibrated on good images exactly as training calibrates it on held-out ones.

PaddleSeg's map sums the squared distance without our factor 0.5, so its raw scores are 8x
ours (three layers); the threshold calibrated here is on our scale.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from stfpm.nn import STFPM, backbone_spec
from stfpm.model.weights import UNUSED_KEYS, WeightsError, apply_state, read_pdparams

BACKBONE = "resnet18"
# ResNet_MS3's Sequential index -> paddle.vision ResNet's (and our) attribute name
SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_KEY = re.compile(r"^(teacher|student)\.model\.(\d+)\.(.+)$")

CHECKPOINT_HINT = ("give the training checkpoint instead: PaddleX writes it as "
                   "OUTPUT/best_model/best_model.pdparams, PaddleSeg as output/best_model/model.pdparams")


def paddlex_to_parts(state: dict[str, np.ndarray], source) -> dict[str, dict[str, np.ndarray]]:
    """PaddleSeg STFPM parameter names -> {"teacher": {...}, "student": {...}} under our
    ResNet18 names, without layer4; any other key is an error naming it."""
    parts: dict[str, dict[str, np.ndarray]] = {"teacher": {}, "student": {}}
    unknown = []
    for name, array in state.items():
        match = _KEY.match(name)
        if not match or match.group(2) not in SEQUENTIAL_NAMES:
            unknown.append(name)
            continue
        part, index, rest = match.groups()
        ours = f"{SEQUENTIAL_NAMES[index]}.{rest}"
        if not UNUSED_KEYS[BACKBONE].match(ours):
            parts[part][ours] = np.ascontiguousarray(array, dtype=np.float32)
    if unknown:
        raise WeightsError(f"{source}: not a PaddleX/PaddleSeg STFPM ResNet18 state ({len(unknown)} keys outside "
                           f"teacher.model.N / student.model.N, e.g. {', '.join(unknown[:3])})")
    for part, arrays in parts.items():
        if not arrays:
            raise WeightsError(f"{source}: no {part}.model.* parameters; an STFPM checkpoint holds both the "
                               f"teacher and the student")
    return parts


def find_checkpoint(path: str | Path) -> Path:
    """The .pdparams file PATH names: the file itself, or the single .pdparams in a folder.
    Inference directories are refused: their program names parameters by generated ids
    (conv2d_12.w_0) that do not say which network or layer they belong to."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".pdiparams":
            raise WeightsError(f"{path} is a Paddle inference model's parameters; {CHECKPOINT_HINT}")
        if path.suffix != ".pdparams":
            raise WeightsError(f"{path}: expected a .pdparams training checkpoint")
        return path
    if not path.is_dir():
        raise WeightsError(f"{path} does not exist; {CHECKPOINT_HINT}")
    candidates = sorted(path.glob("*.pdparams"))
    if len(candidates) == 1:
        return candidates[0]
    if any(path.glob("*.pdiparams")):
        raise WeightsError(f"{path} is a Paddle inference directory: its parameters carry generated names "
                           f"that cannot be mapped to the teacher and student safely; {CHECKPOINT_HINT}")
    found = f"{len(candidates)} .pdparams files" if candidates else "no .pdparams file"
    raise WeightsError(f"{path} holds {found}; pass the checkpoint file itself ({CHECKPOINT_HINT.split(': ', 1)[1]})")


def import_paddlex(path: str | Path, out_dir: str | Path, good: str | Path, image_size: int = 256,
                   threshold_quantile: float = 0.99) -> dict:
    """Convert the checkpoint at PATH into the model directory OUT_DIR, its threshold calibrated
    on the good images of GOOD (a folder of good images or an MVTec category's train/good);
    returns the threshold record. Use images the model was not trained on, as training's
    hold-out is."""
    from stfpm.model.artifact import save_model
    from stfpm.model.card import InputSpec, MapSpec, ModelCard
    from stfpm.data import load_dataset
    from stfpm.training.calibration import UNCALIBRATED, calibrate_on_good_images
    from stfpm.training.config import fingerprint

    checkpoint = find_checkpoint(path)
    parts = paddlex_to_parts(read_pdparams(checkpoint), checkpoint)
    network = STFPM(BACKBONE)
    for part, state in parts.items():
        apply_state(getattr(network, part), state)
    network.eval()
    good_paths = [s.image for s in load_dataset(good).train]
    spec = backbone_spec(BACKBONE)
    card = ModelCard(model_name="STFPM", backbone=BACKBONE, input=InputSpec.for_backbone(BACKBONE, image_size),
                     calibration=UNCALIBRATED, map=MapSpec(layer_norm="none"), taps=list(spec.channels),
                     training={"imported_from": str(checkpoint), "format": "paddlex_stfpm_pdparams"})
    # the same good images give the in-distribution statistics and their limit (none to spare for a split)
    calibration = calibrate_on_good_images(network, card, good_paths, threshold_quantile, good_paths).calibration
    calibration = dataclasses.replace(calibration, source="imported_good_quantile", details={
        **calibration.details, "data": str(good), "data_fingerprint": fingerprint(good_paths)})
    card = save_model(network, out_dir, dataclasses.replace(card, calibration=calibration))
    return card.calibration.to_dict()
