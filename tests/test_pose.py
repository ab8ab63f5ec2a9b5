"""`--augment auto` (stfpm.training.pose) on synthetic good images with the real Lite0 teacher:
a part with a fixed pose must get no flips or turns, a texture and a disc must get all of d4,
and training records the decision and its evidence in model.json."""
import json

import cv2
import numpy as np
import pytest

from stfpm.data import normalize_batch
from stfpm.nn import backbone_spec
from stfpm.training.config import TrainConfig
from stfpm.training.loop import augment_batch, build_network
from stfpm.training.pose import D4_TRANSFORMS, SAFE_RATIO, decide_augmentation, parse_augment

SIZE = 128


def fixed_pose_part(rng: np.random.Generator) -> np.ndarray:
    """An "F" with a foot and a rivet, always upright, lit from the top left with its shadow falling
    to the right, on a noisy background; shifted a few pixels from image to image. Every flip
    and turn of it is a part in a pose no good image has."""
    img = (200 + rng.normal(0, 4, (SIZE, SIZE))).clip(0, 255).astype(np.uint8)
    shift = rng.integers(-4, 5, 2)
    outline = np.array([(40, 24), (56, 24), (56, 44), (96, 44), (96, 58), (56, 58), (56, 70), (84, 70), (84, 82),
                        (56, 82), (56, 108), (28, 108), (28, 96), (40, 96)]) + shift
    cv2.fillPoly(img, [outline + (8, 0)], 130)  # the shadow
    cv2.fillPoly(img, [outline], int(rng.integers(40, 70)))
    cv2.circle(img, (100 + int(shift[0]), 100 + int(shift[1])), 6, 120, -1)
    img = (img + np.linspace(30, -30, SIZE)[:, None] + np.linspace(20, -20, SIZE)[None, :]).clip(0, 255)
    img = img.astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def isotropic_texture(rng: np.random.Generator) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), 2.0)
    img = (128 + 40 * noise / noise.std()).clip(0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def textured_disc(rng: np.random.Generator) -> np.ndarray:
    """A round part seen from above (a bottle's mouth): a textured disc with a bright rim."""
    img = isotropic_texture(rng)[..., 0].copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - SIZE / 2 + 0.5, xx - SIZE / 2 + 0.5)
    img[r > 50] = 30
    img[(r > 44) & (r <= 50)] = 220
    return np.repeat(img[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def teacher():
    return build_network("efficientnet_lite0").teacher


def decide(teacher, render) -> tuple[str, dict]:
    spec = backbone_spec("efficientnet_lite0")
    rng = np.random.default_rng(1)
    images = normalize_batch(np.stack([render(rng) for _ in range(48)]), spec.mean, spec.std)
    return decide_augmentation(teacher, images[:24], images[24:])


def test_auto_keeps_no_flip_or_turn_of_a_fixed_pose_part(teacher):
    kind, evidence = decide(teacher, fixed_pose_part)
    local = {name: t["local"] for name, t in evidence["transforms"].items()}
    assert kind == "none", local
    assert set(local) == set(D4_TRANSFORMS) and min(local.values()) > SAFE_RATIO
    assert not any(t["kept"] for t in evidence["transforms"].values())
    # turning the part also moves where things are: the layout ratio (recorded) sees it clearly
    assert min(t["layout"] for t in evidence["transforms"].values()) > 1.3


@pytest.mark.parametrize("render", [isotropic_texture, textured_disc])
def test_auto_keeps_all_of_d4_for_a_texture_and_a_round_part(teacher, render):
    kind, evidence = decide(teacher, render)
    assert kind == "d4", {name: t["local"] for name, t in evidence["transforms"].items()}
    assert all(abs(t["local"] - 1) < 0.05 for t in evidence["transforms"].values())
    assert evidence["n_probe"] == 24 and evidence["n_bank_images"] == 24 and evidence["seconds"] > 0


def test_named_transforms_augment_with_exactly_those():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 8, 8)).astype(np.float32)
    out = augment_batch(np.repeat(image[None], 200, axis=0), "hflip,vflip,rot180", rng)
    allowed = [image] + [D4_TRANSFORMS[n](image) for n in ("hflip", "vflip", "rot180")]
    drawn = {next(i for i, a in enumerate(allowed) if np.array_equal(x, a)) for x in out}
    assert drawn == {0, 1, 2, 3}  # the identity and each kept transform, and nothing else
    assert parse_augment("none") == [] and parse_augment("flip") == ["hflip"] and len(parse_augment("d4")) == 7
    assert parse_augment("hflip,spin") is None and parse_augment("auto") is None
    assert TrainConfig(backbone="efficientnet_lite0").resolved().augment == "auto"
    assert TrainConfig(backbone="efficientnet_lite0", augment="rot180,hflip").resolved().augment == "rot180,hflip"
    with pytest.raises(ValueError, match="augment must be one of auto, none, flip, d4 or comma-separated"):
        TrainConfig(backbone="efficientnet_lite0", augment="hflip,spin").resolved()


def test_training_records_the_decision_and_its_evidence(tmp_path):
    """A fixed-pose part trained with the default (auto): model.json says none, with the
    ratios per transform; an explicit --augment is kept as given, with no evidence."""
    from stfpm.training.run import train

    good = tmp_path / "part" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        cv2.imwrite(str(good / f"{i:03d}.png"), fixed_pose_part(rng))
    train(str(tmp_path / "part"), str(tmp_path / "auto"), TrainConfig(epochs=1, image_size=SIZE), progress=False)
    recipe = json.loads((tmp_path / "auto" / "model.json").read_text())["recipe"]
    assert recipe["augment"] == "none"
    evidence = recipe["augment_evidence"]
    assert set(evidence["transforms"]) == set(D4_TRANSFORMS) and evidence["n_bank_images"] == 8
    assert all(t["local"] > evidence["safe_ratio"] and not t["kept"] for t in evidence["transforms"].values())
    train(str(tmp_path / "part"), str(tmp_path / "d4"), TrainConfig(epochs=1, image_size=SIZE, augment="d4"),
          progress=False)
    recipe = json.loads((tmp_path / "d4" / "model.json").read_text())["recipe"]
    assert recipe["augment"] == "d4" and recipe["augment_evidence"] is None
