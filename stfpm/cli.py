"""The `stfpm` command line: thin wrappers over the library."""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time noise

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="STFPM unsupervised image anomaly detection on PaddlePaddle.")

# The errors a user can cause: reported as one line naming what is wrong, never a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("STFPM_DEBUG"):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    return wrapper


@app.command()
@_user_errors
def synth(out: Path = typer.Argument(..., help="Folder to write the MVTec-layout dataset to"),
          n_train: int = typer.Option(64, help="Good training images"),
          n_test: int = typer.Option(32, help="Test images, about half defective"),
          size: int = typer.Option(128, help="Image side in pixels"),
          seed: int = typer.Option(0)):
    """Write a synthetic textured dataset with masked defects (for demos and tests)."""
    from stfpm.data import make_synthetic_dataset

    ds = make_synthetic_dataset(out, n_train=n_train, n_test=n_test, size=size, seed=seed)
    typer.echo(f"wrote {len(ds.train)} train and {len(ds.test)} test images to {out}")


@app.command("check-dataset")
@_user_errors
def check_dataset(data: Path = typer.Argument(..., help="Dataset root (MVTec category, PaddleX lists or a folder)"),
                  out: Path = typer.Option(Path("output/check_dataset"), help="Where to write the report")):
    """Validate a dataset and write check_dataset_result.json, sample images and a histogram."""
    from stfpm.data import check_dataset as run_check

    result = run_check(data, out)
    typer.echo(json.dumps(result["attributes"], indent=2, default=str)[:2000])
    typer.echo(f"Check dataset passed ! Report: {out / 'check_dataset_result.json'}")


@app.command()
@_user_errors
def train(data: str = typer.Argument(..., help="Dataset root"),
          out: Path = typer.Option(..., help="Model directory to write"),
          backbone: str = typer.Option("resnet18", help="resnet18 | efficientnet_lite0"),
          epochs: Optional[int] = typer.Option(None, help="Default: the backbone's recipe (100)"),
          batch_size: Optional[int] = typer.Option(None, help="Default: 32"),
          lr: Optional[float] = typer.Option(None, help="Default: 0.4 (SGD)"),
          momentum: Optional[float] = typer.Option(None, help="Default: 0.9"),
          weight_decay: Optional[float] = typer.Option(None, help="Default: 1e-4"),
          optimizer: Optional[str] = typer.Option(None, help="sgd | adam; default sgd"),
          image_size: Optional[int] = typer.Option(None, help="Default: 256"),
          holdout: Optional[float] = typer.Option(None, help="Fraction of train/good held out (default 0.2)"),
          seed: int = typer.Option(0),
          threshold_quantile: float = typer.Option(0.99, help="Threshold = this quantile of held-out good scores"),
          teacher_weights: Optional[str] = typer.Option(None, help="Teacher weights: PATH or s3:// URI "
                                                        "(.pdparams, .safetensors or a legacy .pth)")):
    """Train an STFPM model on the good images of DATA."""
    from stfpm.train import TrainConfig, train as run_train

    cfg = TrainConfig(backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, optimizer=optimizer, image_size=image_size,
                      holdout_fraction=holdout, seed=seed, threshold_quantile=threshold_quantile,
                      teacher_weights=teacher_weights)
    result = run_train(data, str(out), cfg)
    typer.echo(f"model written to {out} (best epoch {result.best_epoch}, "
               f"threshold {result.threshold['value']:.6g})")
    if result.metrics:
        typer.echo(json.dumps(_headline(result.metrics), indent=2))


@app.command()
@_user_errors
def evaluate(model_dir: Path = typer.Argument(..., help="Model directory"),
             data: str = typer.Argument(..., help="Dataset root with a labelled test split"),
             out: Path = typer.Option(Path("output/evaluate"), help="Where to write evaluate_result.json"),
             batch_size: int = typer.Option(16),
             threshold: Optional[float] = typer.Option(None, help="Override the stored threshold"),
             set_threshold: bool = typer.Option(False, "--set-threshold",
                                                help="Store the F1-optimal threshold in the model")):
    """Evaluate a model: image/pixel AUROC, AUPRO, F1-optimal threshold."""
    from stfpm.artifact import load_model, write_meta
    from stfpm.data import load_dataset
    from stfpm.evaluate import evaluate_model, write_evaluation

    model = load_model(model_dir)
    result = evaluate_model(model, load_dataset(data), batch_size=batch_size, threshold=threshold)
    path = write_evaluation(result, out)
    typer.echo(json.dumps(_headline(result["metrics"]), indent=2))
    typer.echo(f"written to {path}")
    if set_threshold:
        scores = [r["score"] for r in result["images"]]
        model.meta["threshold"] = {"value": result["metrics"]["image_f1_threshold"], "source": "f1_test",
                                   "score_min": min(scores), "score_max": max(scores),
                                   "n_images": len(scores), "data": str(data)}
        write_meta(model_dir, model.meta)
        typer.echo(f"stored threshold {result['metrics']['image_f1_threshold']:.6g} in {model_dir}")


@app.command()
@_user_errors
def predict(model_dir: Path = typer.Argument(..., help="Model directory or exported model"),
            inputs: list[str] = typer.Argument(..., help="Images, folders, http(s):// or s3:// URLs"),
            out: Path = typer.Option(Path("output/predict"), help="Folder for overlays and JSON"),
            batch_size: int = typer.Option(8, help="Images per forward pass"),
            threshold: Optional[float] = typer.Option(None, help="Override the stored threshold")):
    """Score images; save an overlay PNG and a JSON per input and print a table."""
    from stfpm.api import create_model

    model = create_model(model_dir=model_dir)
    typer.echo(f"{'image':<48} {'score':>10} {'norm':>6}  decision")
    n = n_anomalous = 0
    for res in model.predict(inputs, batch_size=batch_size, threshold=threshold):
        res.save_to_img(out)
        res.save_to_json(out)
        name = res["input_path"] or f"image_{n:06d}"
        name = name if len(name) <= 48 else "..." + name[-45:]
        typer.echo(f"{name:<48} {res['score']:>10.4g} {res['norm_score']:>6.3f}  "
                   f"{'ANOMALY' if res['is_anomaly'] else 'ok'}")
        n += 1
        n_anomalous += res["is_anomaly"]
    typer.echo(f"{n} images, {n_anomalous} anomalous at threshold {model.threshold if threshold is None else threshold:.6g}; "
               f"overlays and JSON in {out}")


@app.command()
@_user_errors
def export(model_dir: Path = typer.Argument(..., help="Model directory from `stfpm train`"),
           out: Path = typer.Option(..., help="Folder for the Paddle inference model")):
    """Export a Paddle static inference model (inference.json/.pdiparams + inference.yml)."""
    from stfpm.export import export_model

    export_model(model_dir, out)
    typer.echo(f"exported to {out}; load it with create_model(model_dir={str(out)!r})")


@app.command()
@_user_errors
def demo(out: Path = typer.Option(Path("demo"), help="Folder for the demo's data, model and outputs"),
         epochs: int = typer.Option(20), size: int = typer.Option(128), seed: int = typer.Option(0)):
    """End to end on generated data: synth -> check-dataset -> train -> evaluate -> predict."""
    from stfpm.api import create_model
    from stfpm.data import check_dataset as run_check, load_dataset, make_synthetic_dataset
    from stfpm.evaluate import evaluate_model, write_evaluation
    from stfpm.artifact import load_model
    from stfpm.train import TrainConfig, train as run_train

    data, model_dir = out / "data", out / "model"
    make_synthetic_dataset(data, n_train=64, n_test=32, size=size, seed=seed)
    run_check(data, out / "check")
    typer.echo(f"[1/4] dataset written to {data} and checked ({out / 'check'})")
    run_train(str(data), str(model_dir), TrainConfig(backbone="efficientnet_lite0", epochs=epochs,
                                                     image_size=size, seed=seed))
    typer.echo(f"[2/4] model trained: {model_dir}")
    result = evaluate_model(load_model(model_dir), load_dataset(data))
    write_evaluation(result, out / "evaluate")
    typer.echo(f"[3/4] evaluation: {json.dumps(_headline(result['metrics']))}")
    for res in create_model(model_dir=model_dir).predict(str(data / "test"), batch_size=8):
        res.save_to_img(out / "predict")
        res.save_to_json(out / "predict")
    typer.echo(f"[4/4] overlays and JSON per test image in {out / 'predict'}")


def _headline(metrics: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold")
    return {k: metrics.get(k) for k in keys}


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
