"""The `stfpm` command line: thin wrappers over the library."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from stfpm.errors import UserError
from stfpm.training.options import training_options

# Plain (click) help: Typer's rich help labels every flag, --help included, "<bool>" as if it took a value.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="STFPM unsupervised image anomaly detection on PaddlePaddle.")

@app.callback()
def _configure() -> None:
    """Progress and summaries of the library (its module loggers) go to stderr as plain lines;
    the commands' own results are printed to stdout."""
    from stfpm.runtime import configure_logging

    configure_logging()


# The errors a user can cause (stfpm.errors.UserError, and the ValueErrors, FileNotFoundErrors and
# RuntimeErrors of bad arguments): reported as one line naming what is wrong, never a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)  # UserError is a ValueError


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):  # click's Exit is a RuntimeError: a command's own exit code stands
            raise
        except USER_ERRORS as e:
            if os.environ.get("STFPM_DEBUG"):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # storage or network down: one line, exit 1 (STFPM_DEBUG=1 shows the traceback)
            if os.environ.get("STFPM_DEBUG"):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    return wrapper


@app.command()
@_user_errors
def synth(out: Path = typer.Argument(..., help="Folder to write the MVTec-layout dataset to"),
          n_train: int = typer.Option(64, help="Good training images"),
          n_test: int = typer.Option(32, help="Test images, about half defective"),
          size: int = typer.Option(128, help="Image side in pixels"),
          seed: int = typer.Option(0),
          defect_scale: float = typer.Option(1.0, help="Defect size relative to the usual (0.125 at 1024 px: "
                                                       "defects as small as at 128 px, for --tile)")):
    """Write a synthetic textured dataset with masked defects (for demos and tests)."""
    from stfpm.data import make_synthetic_dataset

    ds = make_synthetic_dataset(out, n_train=n_train, n_test=n_test, size=size, seed=seed, defect_scale=defect_scale)
    typer.echo(f"wrote {len(ds.train)} train and {len(ds.test)} test images to {out}")


@app.command("check-dataset")
@_user_errors
def check_dataset(data: Path = typer.Argument(..., help="Dataset root (MVTec category, PaddleX lists or a folder)"),
                  out: Path = typer.Option(Path("output/check_dataset"), help="Where to write the report")):
    """Validate a dataset and write check_dataset_result.json, sample images and a histogram."""
    from stfpm.data import check_dataset as run_check

    result = run_check(data, out)
    typer.echo(json.dumps(result["attributes"], indent=2, default=str)[:2000])
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"Check dataset passed ! Report: {out / 'check_dataset_result.json'}")


@app.command()
@_user_errors
@training_options
def train(data: str = typer.Argument(..., help="Dataset root: local or s3://"),
          out: str = typer.Option(..., help="Model directory to write: local or s3://"),
          cfg=None, workers: int = 0, ray_options: dict | None = None):
    """Train a model on the good images of DATA (STFPM: in this process or on Ray Train;
    PatchCore: its memory bank, in this process)."""
    from stfpm.training.run import train as run_train

    if ray_options:
        from stfpm.raytrain.driver import train_distributed

        result = train_distributed(data, out, cfg, num_workers=workers, **ray_options)
    else:
        result = run_train(data, out, cfg)
    trained = (f"memory bank of {result.history[0]['bank_size']} patches" if cfg.model == "patchcore"
               else f"best epoch {result.best_epoch}")
    typer.echo(f"model written to {out} ({trained}, threshold {result.calibration.threshold:.6g})")
    if result.metrics:
        typer.echo(json.dumps(_headline(result.metrics), indent=2))
        typer.echo(_threshold_note(result.calibration, result.metrics))


@app.command("train-all")
@_user_errors
@training_options
def train_all(root: str = typer.Argument(..., help="Folder (local or s3://) of category folders"),
              out: str = typer.Option(..., help="Folder for one model per category and registry.yaml"),
              parallel: Optional[int] = typer.Option(None, help="Categories at once (default: as the cluster fits)"),
              cfg=None, workers: int = 0, ray_options: dict | None = None):
    """Train one model per category folder and write OUT/registry.yaml for `stfpm score`."""
    from stfpm.raytrain.driver import train_categories

    summary = train_categories(root, out, cfg, num_workers=workers, parallel=parallel, **ray_options)
    typer.echo(f"trained: {', '.join(summary['trained']) or 'none'}; registry: {summary['registry']}")
    if summary["failed"]:
        for category, error in summary["failed"].items():
            typer.secho(f"failed: {category}: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


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
    from stfpm.model.artifact import load_model
    from stfpm.model.card import write_card
    from stfpm.data import load_dataset
    from stfpm.evaluate import evaluate_model, write_evaluation

    model = load_model(model_dir)
    result = evaluate_model(model, load_dataset(data), batch_size=batch_size, threshold=threshold)
    path = write_evaluation(result, out)
    typer.echo(json.dumps(_headline(result["metrics"]), indent=2))
    if threshold is None:
        typer.echo(_threshold_note(model.card.calibration, result["metrics"]))
    typer.echo(f"written to {path}")
    if set_threshold:
        scores = [r["score"] for r in result["images"]]
        # the score scale and the in-distribution check stay: they were fitted on good images
        calibration = dataclasses.replace(model.card.calibration, threshold=result["metrics"]["image_f1_threshold"],
                                          score_min=min(scores), score_max=max(scores), source="f1_test",
                                          details={"n_images": len(scores), "data": str(data)})
        write_card(model_dir, dataclasses.replace(model.card, calibration=calibration))
        typer.echo(f"stored threshold {result['metrics']['image_f1_threshold']:.6g} in {model_dir}")


@app.command()
@_user_errors
def predict(model_dir: Path = typer.Argument(..., help="Model directory or exported model"),
            inputs: list[str] = typer.Argument(..., help="Images, folders, http(s):// or s3:// URLs"),
            out: Path = typer.Option(Path("output/predict"), help="Folder for overlays and JSON"),
            batch_size: int = typer.Option(8, help="Images per forward pass"),
            threshold: Optional[float] = typer.Option(None, help="Override the stored threshold"),
            engine: str = typer.Option("auto", help="What runs the forward on CPU: auto (the fastest exact one "
                                       "installed), onednn (Paddle Inference), onnxruntime, openvino, dygraph")):
    """Score images; save an overlay PNG and a JSON per input and print a table. Inputs that
    name no image are reported at the end (exit 2); the others are scored first."""
    from stfpm.api import check_inputs, create_model
    from stfpm.model.inference import ENGINES
    from stfpm.storage import printable_path

    if engine not in ENGINES:
        raise UserError(f"--engine is {engine!r}; expected one of {', '.join(ENGINES)}")
    inputs, problems = check_inputs(inputs)
    if not inputs:
        raise UserError("no input names an image: " + "; ".join(problems))
    model = create_model(model_dir=model_dir, engine=engine)
    typer.echo(f"{'image':<48} {'raw_score':>10} {'norm_score':>10}  decision")  # the score table's names
    n = n_anomalous = n_ood = 0
    for res in model.predict(inputs, batch_size=batch_size, threshold=threshold, errors=problems):
        name = printable_path(res["input_path"]) if res["input_path"] else f"image_{n:06d}"
        try:  # a name too long for the output folder: reported with the others, the rest goes on
            res.save_to_img(out / f"{res.name}.png")  # <folder>_<stem>, unique in the call (stfpm.results.OutputNames)
            res.save_to_json(out / f"{res.name}.json")
        except OSError as e:
            problems.append(f"{name}: its results could not be written to {out}: {e.strerror or e}")
        name = name if len(name) <= 48 else "..." + name[-45:]
        typer.echo(f"{name:<48} {res['raw_score']:>10.4g} {res['norm_score']:>10.3f}  "
                   f"{'ANOMALY' if res['is_anomaly'] else 'ok'}{'  OOD' if res['ood'] else ''}")
        n += 1
        n_anomalous += res["is_anomaly"]
        n_ood += bool(res["ood"])
    typer.echo(f"{n} images, {n_anomalous} anomalous at threshold {model.threshold if threshold is None else threshold:.6g}; "
               f"overlays and JSON in {out}")
    if n_ood:
        typer.secho(f"warning: {n_ood} of {n} images are unlike this model's training images (OOD: ood_score > 1); "
                    "their scores are not to be trusted: is it the right model for them?", fg=typer.colors.YELLOW, err=True)
    if problems:
        for problem in problems:
            typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


@app.command()
@_user_errors
def export(model_dir: Path = typer.Argument(..., help="Model directory from `stfpm train`"),
           out: Path = typer.Option(..., help="Folder for the exported model"),
           format: str = typer.Option("paddle", "--format", help="paddle (inference.json/.pdiparams), onnx "
                                      "(model.onnx: ONNX Runtime, no Paddle needed) or openvino (model.xml/.bin)"),
           precision: str = typer.Option("fp32", help="fp32, or int8 (PatchCore, --format onnx: the backbone "
                                         "quantised, calibrated on good training images)"),
           calibration_data: Path = typer.Option(None, help="int8: the dataset whose good training images calibrate "
                                                 "it (default: the one model.json says the model was trained on)")):
    """Export an inference model (Paddle program, ONNX or OpenVINO IR) with inference.yml and
    model.json."""
    from stfpm.model.export import export_model

    export_model(model_dir, out, format, precision, calibration_data)
    typer.echo(f"exported to {out}; load it with create_model(model_dir={str(out)!r})")


@app.command("import-paddlex")
@_user_errors
def import_paddlex(path: Path = typer.Argument(..., help="PaddleX/PaddleSeg STFPM checkpoint (.pdparams), or "
                                               "the folder holding it (PaddleX: OUTPUT/best_model)"),
                   out: Path = typer.Option(..., help="Model directory to write"),
                   good: Path = typer.Option(..., help="Good images to calibrate the threshold on (a folder, or "
                                             "an MVTec category: its train/good), ideally not trained on"),
                   image_size: int = typer.Option(256, help="Input size the model was trained at (PaddleX: 256)"),
                   threshold_quantile: float = typer.Option(0.99, help="Threshold = this quantile of the good "
                                                            "images' scores")):
    """Convert an STFPM ResNet18 model trained by PaddleX or PaddleSeg into a model directory.
    The .pdparams pickle is read by a restricted unpickler (arrays only): importing one is an
    explicit opt-in, a model directory itself never holds a pickle."""
    from stfpm.training.paddlex_import import import_paddlex as run_import

    thr = run_import(path, out, good, image_size=image_size, threshold_quantile=threshold_quantile)
    typer.echo(f"model written to {out} (threshold {thr['value']:.6g}: the {threshold_quantile} quantile of "
               f"{thr['n_images']} good images' scores)")


@app.command()
@_user_errors
def score(model: str = typer.Argument(..., help="Model directory (local or s3://) or a registry YAML "
                                      "mapping category -> model directory"),
          source: str = typer.Argument(..., help="Folder, s3://bucket/prefix, manifest (.parquet, S3 Inventory "
                                       ".csv, or text with one URI per line) or one image; with {date} in it "
                                       "(s3://b/line3/{date}/) only some days' folders are listed (--dates)"),
          output: str = typer.Argument(..., help="Output folder or s3:// prefix (scores/, maps/, _SUCCESS)"),
          partitions: Optional[str] = typer.Option(None, help="Names of the folder levels under SOURCE, kept "
                                                   "as columns, e.g. category,line,date (a registry needs category)"),
          ext: Optional[str] = typer.Option(None, help="Extensions to list, e.g. .png,.jpg (default: all images)"),
          batch_size: int = typer.Option(32, help="Images per forward pass"),
          actors: Optional[str] = typer.Option(None, help="Scoring actors: N, or MIN..MAX to autoscale; default 1, "
                                                        "or one per CPU on the local Ray score starts itself"),
          gpus_per_actor: float = typer.Option(0, help="GPUs per actor (Ray assigns them)"),
          cpus_per_actor: float = typer.Option(1, help="CPUs Ray reserves per actor"),
          threads_per_actor: Optional[int] = typer.Option(None, help="Paddle CPU threads per actor (default: its "
                                                          "CPUs; on one machine, more can use cores decode leaves idle)"),
          threshold: Optional[float] = typer.Option(None, help="Override the stored threshold(s)"),
          overlays: bool = typer.Option(False, "--overlays", help="Also write overlays of anomalous inputs"),
          ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. auto; "
                                                    "default: start a local Ray"),
          run_id: Optional[str] = typer.Option(None, help="Default: UTC time + random suffix"),
          s3_endpoint: Optional[str] = typer.Option(None, help="S3-compatible endpoint, e.g. http://minio:9000 "
                                                    "(default: AWS_ENDPOINT_URL)"),
          s3_region: Optional[str] = typer.Option(None, help="Default: AWS_REGION"),
          allow_root: Optional[list[str]] = typer.Option(None, "--allow-root", help="Read local inputs only from "
                                                         "under this folder (repeatable; symlinks resolved); "
                                                         "default: a folder SOURCE itself (symlinks out of it "
                                                         "are not followed), else any file the workers can read"),
          dates: Optional[str] = typer.Option(None, help="A SOURCE with {date}: the days to list, DAY or "
                                              "FIRST..LAST (default: from the last finished run's day less "
                                              "--lookback-days to today; before any, every day folder)"),
          lookback_days: int = typer.Option(1, help="A SOURCE with {date}: days before the last run's also "
                                            "listed again, for late arrivals"),
          fused: Optional[bool] = typer.Option(None, "--fused/--no-fused", help="Each actor also reads, decodes "
                                               "and writes maps; default: fused on the local Ray score starts "
                                               "itself (no GPUs), else decoding and maps in CPU tasks any node "
                                               "can run")):
    """Score every image of SOURCE on Ray Data: a Parquet score table and anomaly maps in OUTPUT."""
    from stfpm.scoring import score as run_score
    from stfpm.scoring.dates import parse_days
    from stfpm.storage import set_s3_environment

    set_s3_environment(s3_endpoint, s3_region)
    options = {"extensions": tuple(e.strip() for e in ext.split(","))} if ext else {}
    if dates:
        options["dates"] = parse_days(dates)
    summary = run_score(model, source, output, partitions=partitions.split(",") if partitions else None,
                        batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                        cpus_per_actor=cpus_per_actor, threads_per_actor=threads_per_actor, threshold=threshold,
                        overlays=overlays, ray_address=ray_address, run_id=run_id, allow_roots=allow_root or None,
                        fused=fused, lookback_days=lookback_days, **options)
    typer.echo(f"table: {summary['output']['scores']}  maps: {summary['output']['maps']}  "
               f"summary: {summary['output']['root']}/_SUCCESS")


@app.command()
@_user_errors
def serve(model: str = typer.Argument(..., help="Model directory (local or s3://) or a registry YAML "
                                      "mapping category -> model directory"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface, "
                                   "for the line's cameras)"),
          port: int = typer.Option(8000),
          replicas: str = typer.Option("1", help="Replicas per model: N, or MIN..MAX autoscaled on queue length"),
          max_batch_size: int = typer.Option(16, help="Requests batched into one forward"),
          batch_wait_ms: float = typer.Option(5.0, help="How long a batch waits to fill"),
          cpus_per_replica: float = typer.Option(1, help="CPUs Ray reserves per model replica"),
          gpus_per_replica: float = typer.Option(0, help="GPUs per model replica (Ray assigns them)"),
          threads_per_replica: Optional[int] = typer.Option(None, help="Paddle CPU threads per replica "
                                                            "(default: its CPUs)"),
          max_bytes: int = typer.Option(32 << 20, help="Largest request body; above it 413"),
          ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. auto; "
                                                    "default: start a local Ray")):
    """Serve MODEL over HTTP on Ray Serve until interrupted: POST /v1/{category}/predict with
    the image, GET /v1/models, GET /healthz (README: the scoring service)."""
    try:
        from stfpm.serving.app import ServeOptions, run
    except ImportError as e:
        raise UserError(f"stfpm serve needs Ray Serve ({e}): pip install 'stfpm[serve]'") from None
    options = ServeOptions(model=model, replicas=replicas, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                           cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
                           threads_per_replica=threads_per_replica, max_bytes=max_bytes)

    def ready(models: dict) -> None:
        for category, info in sorted(models.items()):
            typer.echo(f"{category}: {info['model_name']} {info['model_version']} threshold {info['threshold']:.6g}")
        typer.echo(f"serving {len(models)} model(s) at http://{host}:{port}/v1/{{category}}/predict; Ctrl-C stops")

    run(options, host=host, port=port, ray_address=ray_address, on_ready=ready)


@app.command()
@_user_errors
def demo(out: Path = typer.Option(Path("demo"), help="Folder for the demo's data, model and outputs"),
         epochs: int = typer.Option(20), size: int = typer.Option(128), seed: int = typer.Option(0)):
    """End to end on generated data: synth -> check-dataset -> train -> evaluate -> predict ->
    score on a local Ray (the batch-scoring job) into OUT/audit."""
    from stfpm.data import check_dataset as run_check, load_dataset, make_synthetic_dataset
    from stfpm.evaluate import evaluate_model, write_evaluation
    from stfpm.model.artifact import load_model
    from stfpm.training.config import TrainConfig
    from stfpm.training.run import train as run_train

    data, model_dir = out / "data", out / "model"
    if not data.exists():  # a rerun reuses the generated data
        make_synthetic_dataset(data, n_train=64, n_test=32, size=size, seed=seed)
    run_check(data, out / "check")
    typer.echo(f"[1/5] dataset written to {data} and checked ({out / 'check'})")
    run_train(str(data), str(model_dir), TrainConfig(backbone="efficientnet_lite0", epochs=epochs,
                                                     image_size=size, seed=seed))
    typer.echo(f"[2/5] model trained: {model_dir}")
    model = load_model(model_dir)
    result = evaluate_model(model, load_dataset(data))
    write_evaluation(result, out / "evaluate")
    typer.echo(f"[3/5] evaluation: {json.dumps(_headline(result['metrics']))}\n"
               f"      {_threshold_note(model.card.calibration, result['metrics'])}")
    predict(model_dir, [str(data / "test")], out / "predict", batch_size=8, threshold=None)
    typer.echo(f"[4/5] overlays and JSON per test image in {out / 'predict'}")
    from stfpm.scoring import score as run_score

    summary = run_score(str(model_dir), str(data / "test"), str(out / "audit"), partitions=["kind"],
                        batch_size=16, verbose=False, progress=True)
    scores = summary["output"]["scores"]
    typer.echo(f"[5/5] {summary['counts']['scored']} test images scored on a local Ray: table {scores}, "
               f"maps {summary['output']['maps']}\n      read it with: python -c \"import pandas as pd; "
               f"print(pd.read_parquet('{scores}').nlargest(5, 'score')[['image_uri', 'score', 'is_anomaly']])\"")


def _threshold_note(calibration, metrics: dict) -> str:
    """Which threshold decides (the model's Calibration) and what the evaluation's F1 threshold is."""
    quantile = calibration.details.get("quantile")
    how = {"holdout_quantile": f"the {quantile} quantile of held-out good images' scores",
           "imported_good_quantile": f"the {quantile} quantile of the --good images' scores",
           "f1_test": "F1-optimal on a labelled test set"}.get(calibration.source, calibration.source)
    return (f"decisions use the model's threshold {calibration.threshold:.6g} ({how}); image_f1_threshold "
            f"{metrics['image_f1_threshold']:.6g} is the F1-optimal one on this test set, for reference "
            f"(`stfpm evaluate MODEL DATA --set-threshold` makes it the model's)")


def _headline(metrics: dict) -> dict:
    """The metrics to print, at 6 significant digits (0.6056, not 0.6056000000000001); the
    JSON files keep full precision."""
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold")
    return {k: float(f"{metrics[k]:.6g}") if isinstance(metrics.get(k), float) else metrics.get(k) for k in keys}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
