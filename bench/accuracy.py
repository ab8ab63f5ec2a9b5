"""Train and evaluate one recipe on several real categories; print a table, write bench/accuracy.json.

    python bench/accuracy.py                                        # the default recipe, the four dev sets
    python bench/accuracy.py --epochs 3 --train-subset 100          # quick iteration
    python bench/accuracy.py --layer-norm none --models /tmp/m      # keep the models ...
    python bench/accuracy.py --models /tmp/m --map layer_norm=median --map layer_norm=none --out /tmp/a.json
                                                                    # ... and re-score them with other maps
    python bench/accuracy.py --model patchcore                      # PatchCore: bench/accuracy_patchcore.json
    python bench/accuracy.py --model patchcore --bank-fraction 0.1 --map smooth_sigma=0 --out /tmp/p.json

Each model kind is a function that trains on a folder of good images and returns a model
directory (MODEL_KINDS); every kind is scored by the same path, the project's
`stfpm.evaluate.evaluate_model` on the category's full test split. `--train-subset N` trains on
a seeded random N of train/good (the held-out 20% is taken from those N). With `--models DIR`
a model already in DIR for the same category, seed and recipe is reused instead of retrained,
so map variants (`--map KEY=VALUE,...`, applied to model.json's "map") cost one evaluation.
The table's "proxy" is the label-free image AUROC on the model's held-out good images
against the same images with synthetic defects (stfpm.training.proxy). The JSON holds the first map
variant (the recipe's own when no --map is given), means over --seeds; the table shows every
variant and seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from stfpm.model.artifact import load_model  # noqa: E402
from stfpm.model.card import read_card  # noqa: E402
from stfpm.data import load_dataset  # noqa: E402
from stfpm.evaluate import evaluate_model  # noqa: E402
from stfpm.model.inference import Predictor  # noqa: E402
from stfpm.training.proxy import proxy_auroc, run_once, with_synthetic_defects  # noqa: E402

DEV_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV_SETS = ("mvtec_bottle_dev", "mvtec_screw_dev", "magnetic_tile_dev", "elpv_mono_dev")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
HARNESS_JSON = "harness.json"  # next to model.json in a kept model: the training time and recipe


def train_stfpm(train_dir: str, model_dir: str, recipe: dict, seed: int) -> str:
    """STFPM through stfpm.training.run.train with `recipe` as TrainConfig fields (unset ones: the backbone's defaults)."""
    from dataclasses import asdict

    from stfpm.training.config import TrainConfig
    from stfpm.training.run import train

    cfg = TrainConfig(**recipe, seed=seed)
    train(train_dir, model_dir, cfg, progress=True)
    recipe.update({k: v for k, v in asdict(cfg.resolved()).items() if k != "seed"})
    return model_dir


def train_patchcore(train_dir: str, model_dir: str, recipe: dict, seed: int) -> str:
    """PatchCore through the same entry point (TrainConfig model="patchcore"): the memory bank,
    no epochs; the recipe keeps only the settings PatchCore uses."""
    recipe["model"] = "patchcore"
    train_stfpm(train_dir, model_dir, recipe, seed)
    used = ("model", "backbone", "image_size", "holdout_fraction", "threshold_quantile", "teacher_weights",
            "bank_fraction", "bank_pool", "tile_size", "tile_overlap")
    for key in set(recipe) - set(used):
        del recipe[key]
    return model_dir


MODEL_KINDS = {"stfpm": train_stfpm, "patchcore": train_patchcore}


def training_images(data: Path, subset: int | None, seed: int) -> list[Path]:
    """train/good, or a seeded random `subset` of it."""
    goods = sorted(p for p in (data / "train" / "good").iterdir() if p.is_file())
    if subset and subset < len(goods):
        rng = np.random.default_rng(seed)
        goods = sorted(goods[i] for i in rng.choice(len(goods), subset, replace=False))
    return goods


def training_folder(data: Path, subset: int | None, seed: int, tmp: Path) -> Path:
    """A folder holding only train/good (symlinks to `training_images`), so training does not
    evaluate on its own and the images stay where they are."""
    goods = training_images(data, subset, seed)
    folder = tmp / data.name / "train" / "good"
    folder.mkdir(parents=True)
    for path in goods:
        os.symlink(path, folder / path.name)
    return tmp / data.name


def parse_map_variant(text: str) -> dict:
    """"layer_norm=median,combine=sum" -> {"layer_norm": "median", "combine": "sum"}."""
    variant = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--map {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
        variant[key.strip()] = value.strip()
    return variant


def recipe_key(kind: str, recipe: dict, subset: int | None, seed: int) -> str:
    text = json.dumps({"kind": kind, "recipe": recipe, "subset": subset, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def trained_model(kind: str, data: Path, recipe: dict, subset: int | None, seed: int,
                  models: Path) -> tuple[str, float, dict]:
    """(model dir under `models`, training seconds, the recipe as resolved): trained now, or
    reused when `models` already holds this category, kind, recipe, subset and seed."""
    keep = models / f"{data.name}-{kind}-s{seed}-{recipe_key(kind, recipe, subset, seed)}"
    if (keep / HARNESS_JSON).is_file():
        record = json.loads((keep / HARNESS_JSON).read_text())
        return str(keep), record["train_s"], record["recipe"]
    resolved = dict(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = training_folder(data, subset, seed, Path(tmp))
        t0 = time.time()
        MODEL_KINDS[kind](str(train_dir), str(keep), resolved, seed)
        train_s = time.time() - t0
    (keep / HARNESS_JSON).write_text(json.dumps({"train_s": train_s, "recipe": resolved}))
    return str(keep), train_s, resolved


def holdout_images(model_dir: str, data: Path, subset: int | None, seed: int) -> np.ndarray:
    """RGB uint8 held-out good images of a model the harness trained (the same subset and split)."""
    from stfpm.data import Sample, prepare_input, split_holdout

    card = read_card(model_dir)
    goods = [str(p) for p in training_images(data, subset, seed)]
    _, held = split_holdout([Sample(p, 0, "good", None) for p in goods], card.recipe["holdout_fraction"], seed)
    return np.stack([prepare_input(Path(s.image).read_bytes(), card.input.size, s.image).pixels for s in held])


def evaluate_variants(model_dir: str, data: Path, variants: list[dict], holdout: np.ndarray) -> list[dict]:
    """The project's evaluation of one model under each map variant (model.json's "map"
    updated), and the label-free proxy AUROC on `holdout` (good, and with synthetic defects);
    the network runs once per batch, whatever the number of variants."""
    dataset = load_dataset(data)
    model = load_model(model_dir)
    forward_once = run_once(Predictor.from_model(model).layer_forward)
    defective = with_synthetic_defects(holdout)
    out = []
    for variant in variants:
        card = dataclasses.replace(model.card, map=dataclasses.replace(model.card.map, **variant))
        predictor = Predictor(card, forward_once)
        t0 = time.perf_counter()  # the first variant runs the network: its time per image is the model's cost
        metrics = evaluate_model(model, dataset, predictor=predictor)["metrics"]
        seconds = time.perf_counter() - t0
        out.append({k: metrics[k] for k in METRICS} | {"per_type": metrics["per_defect_type_image_auroc"],
                                                        "eval_ms_per_image": round(1000 * seconds / len(dataset.test), 1),
                                                        "proxy": proxy_auroc(predictor, holdout, defective)})
    return out


def run_category(kind: str, data: Path, recipe: dict, subset: int | None, seeds: list[int],
                 variants: list[dict], models: Path | None) -> dict:
    """Per variant, the per-seed metrics; plus training time and epochs."""
    runs, times, resolved, augments, views = [], [], dict(recipe), [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            model_dir, train_s, resolved = trained_model(kind, data, recipe, subset, seed, models or Path(tmp))
            runs.append(evaluate_variants(model_dir, data, variants, holdout_images(model_dir, data, subset, seed)))
            times.append(train_s)
            augments.append(augmentation_chosen(model_dir))
            views.append(views_chosen(model_dir))
    return {"runs": runs, "train_s": float(np.mean(times)), "epochs": resolved.get("epochs"), "recipe": resolved,
            "augment": augments, "views": views}


def augmentation_chosen(model_dir: str) -> dict | None:
    """What the model trained with (model.json's recipe), and with --augment auto each
    transform's distance ratios, local and layout (stfpm.training.pose)."""
    recipe = read_card(model_dir).recipe or {}
    if "augment" not in recipe:
        return None
    evidence = recipe.get("augment_evidence") or {}
    return {"augment": recipe["augment"],
            "ratios": {name: [t["local"], t["layout"]] for name, t in evidence.get("transforms", {}).items()} or None}


def views_chosen(model_dir: str) -> dict:
    """How the model sees an image (model.json's input and recipe; stfpm.training.views): the
    views, the tile size, and with --views auto the sizes it decided from. A model from before
    views existed sees images whole, or in tiles when it has a tile size."""
    card = read_card(model_dir)
    recipe = card.recipe or {}
    views = recipe.get("views") or ("tiles" if card.input.tile_size else "whole")
    return {"views": views, "tile_size": card.input.tile_size, "evidence": recipe.get("views_evidence")}


def mean_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("categories", nargs="*", help=f"category folders (default: the four dev sets in {DEV_ROOT})")
    ap.add_argument("--model", default="stfpm", choices=sorted(MODEL_KINDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train-subset", type=int, default=None, help="train on a seeded random N of train/good")
    ap.add_argument("--map", action="append", default=[], help="map variant KEY=VALUE[,...] (repeatable)")
    ap.add_argument("--models", default=None, help="keep (and reuse) the trained models in this folder")
    ap.add_argument("--out", default=None, help="default bench/accuracy.json (stfpm), bench/accuracy_MODEL.json")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("image-size", int),
                       ("momentum", float), ("weight-decay", float), ("optimizer", str), ("augment", str),
                       ("layer-norm", str), ("combine", str), ("map-selection", str), ("bank-fraction", float),
                       ("bank-pool", int), ("tile-size", int), ("tile-overlap", int), ("student", str),
                       ("views", str)):
        ap.add_argument(f"--{name}", type=kind, default=None)
    args = ap.parse_args()
    categories = [Path(c) for c in args.categories] or [DEV_ROOT / name for name in DEV_SETS]
    for c in categories:
        if not (c / "train" / "good").is_dir():
            print(f"error: {c}: not an MVTec-layout category (no train/good)", file=sys.stderr)
            raise SystemExit(2)
    recipe = {"backbone": args.backbone}
    recipe.update({k: v for k, v in vars(args).items() if v is not None and k in (
        "epochs", "batch_size", "lr", "image_size", "momentum", "weight_decay", "optimizer", "augment", "layer_norm",
        "combine", "map_selection", "bank_fraction", "bank_pool", "tile_size", "tile_overlap", "student", "views")})
    args.out = args.out or str(Path(__file__).with_name(
        "accuracy.json" if args.model == "stfpm" else f"accuracy_{args.model}.json"))
    variants = [parse_map_variant(m) for m in args.map] or [{}]
    models = Path(args.models) if args.models else None
    if models:
        models.mkdir(parents=True, exist_ok=True)

    results, resolved = {}, dict(recipe)
    rows = []
    for data in categories:
        outcome = run_category(args.model, data, recipe, args.train_subset, args.seeds, variants, models)
        resolved = outcome["recipe"]
        for v, variant in enumerate(variants):
            per_seed = [run[v] for run in outcome["runs"]]
            means = {k: mean_or_none([r[k] for r in per_seed]) for k in METRICS + ("proxy",)}
            rows.append((data.name, variant, means, per_seed, outcome["train_s"]))
            if v == 0:
                results[data.name] = {**{k: means[k] for k in METRICS}, "train_s": round(outcome["train_s"], 1),
                                      "eval_ms_per_image": float(np.mean([r["eval_ms_per_image"] for r in per_seed])),
                                      "epochs": outcome["epochs"]}
                results[data.name]["views"] = outcome["views"] if len(args.seeds) > 1 else outcome["views"][0]
                if any(outcome["augment"]):
                    results[data.name]["augment"] = outcome["augment"] if len(args.seeds) > 1 else outcome["augment"][0]
        print_table(rows)
    record = {"recipe": {"model": args.model, **resolved, "map": variants[0] or None, "seeds": args.seeds,
                         "train_subset": args.train_subset}, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def print_table(rows) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"\n{'category':<20} {'map':<28} {'image':>6} {'pixel':>6} {'aupro':>6} {'proxy':>6} {'train_s':>8}  "
          "per seed image AUROC")
    for name, variant, means, per_seed, train_s in rows:
        label = ",".join(f"{k}={v}" for k, v in variant.items()) or "(recipe)"
        seeds = " ".join(fmt(r["image_auroc"]) for r in per_seed)
        print(f"{name:<20} {label:<28} {fmt(means['image_auroc']):>6} {fmt(means['pixel_auroc']):>6} "
              f"{fmt(means['aupro']):>6} {fmt(means['proxy']):>6} {train_s:>8.0f}  {seeds}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
