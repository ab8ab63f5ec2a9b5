"""Batch scoring on Ray Data: images in, a Parquet score table and anomaly maps out.

    list inputs (driver) -> read + decode + resize (CPU tasks) -> STFPM forward (actor pool,
    one model load per actor, GPU if asked) -> encode + write maps (CPU tasks) -> table files

Decoding is the expensive part at scale (docs/design.md §6), so it runs in CPU tasks that Ray can
place on CPU-only nodes; only uint8 model-size images reach the actors. A JPEG at least
twice the model's input is decoded at 1/2, 1/4 or 1/8 scale. Everything streams: each
stage holds a few batches, whatever the number of images.

The pieces: plan.py (what to score), stages.py (the per-batch stages), sink.py (table
files and compaction), table.py (the columns, TABLE_DOC); this module runs them.

Output under OUTPUT (local folder or s3://bucket/prefix):
    scores/bucket=NN/part-<hash>.parquet   the score table, table.TABLE_DOC, in 16 buckets
                                 by a hash of image_uri (table.bucket_of)
    maps/<model_version>/<image_id>.png       8-bit anomaly map at the input's size
    overlays/<model_version>/<image_id>.png   (--overlays) heatmap over anomalous inputs
    _SUCCESS                     JSON with counts, timings, stage throughput, models;
                                 written last, deleted when a run starts
    _pending/<run_id>/           the run's pending inputs, which the pipeline reads (plan.py;
                                 deleted when the run ends)

Map scaling: pixel = round(255 * s), s the normalised score of each pixel (the same
normalisation as the `score` column, stfpm.model.score_scale: strictly increasing, never clipped);
so pixel / 255 is the normalised score, pixel >= 128 is at or above the threshold, and
`map_to_raw` is its exact inverse. Each model's log_scale is in model.json and in _SUCCESS.

Exactly once: every listed input yields one row (unreadable, corrupt, truncated, empty,
oversized, unsupported and non-regular files yield status="error" rows naming the reason).
An input is its canonical URI (local paths absolute and normalised) plus its input_version
(size and modification time as listed): a replaced file is a new input_version and is
scored again. A run first reads the existing table and skips inputs whose current
input_version already has, for the same model version, an ok row or an error row of kind
"input" (the file itself is bad); "transient" errors (a model that failed in an actor, IO)
are retried by every later run. Models are checked on the driver first (weights against
their hashes), so a model that cannot load fails the run before any row is written.

Table files are written whole (temp file + rename, or one S3 PUT) and named by a hash of
their rows, every ROWS_PER_FILE rows or FLUSH_S seconds, maps at deterministic keys before
their rows, so a killed run leaves only complete rows and loses at most about FLUSH_S of
work; a re-run writes what is missing. Before _SUCCESS, rows superseded by a retry or by
newer content are removed (from the files this run wrote and those that held rows of its
inputs: the end of a run costs what the run wrote, not the table's history), so the table
holds one row per (image_uri, model_version): the history across model versions.
`read_scores(OUTPUT)` (table.latest_rows) is the one row per input of the last run's model
versions; _SUCCESS counts both (table_* and latest_*).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from stfpm.data.images import IMAGE_EXTENSIONS
from stfpm.errors import UserError
from stfpm.scoring.dates import LOOKBACK_DAYS, DateTemplate, days_to_list, has_date, run_started
from stfpm.scoring.plan import Plan, plan_run
from stfpm.scoring.sink import FLUSH_S, ROWS_PER_FILE, TableWriter, merge_stats, move_flat_files, remove_superseded
from stfpm.scoring.stages import MAX_BYTES, FusedScoreActor, ScoreActor, load_images, write_maps
from stfpm.scoring.table import INDEX_SCHEMA, MAPS, SCORES, SUCCESS, shards, table_files, winning_rows
from stfpm.scoring.progress import ScoringProgress
from stfpm.noise import ACTOR_ARGS_IN_OBJECT_STORE, drop_progress_bars_disabled_notice, init_ray, native_lines_dropped
from stfpm.storage import MODEL_CACHE, check_output, filesystem_for, join_uri, read_bytes, s3_settings, write_bytes

logger = logging.getLogger(__name__)

DECODE_BATCHES_PER_WORKER = 256
RESERVATION_MIN_CPUS = 16  # fewer CPUs: no per-stage reservations (build_pipeline)
PENDING, PENDING_ROWS_PER_FILE = "_pending", 250_000  # the pipeline's input files (write_pending)
MAX_LOCAL_ACTORS = 8  # on a local Ray of its own, score starts one fused actor per CPU up to this (each holds a model)


def parse_actors(actors: int | str | tuple[int, int]) -> tuple[int, int]:
    """3 -> (3, 3); "1..8" -> (1, 8); (1, 8) -> (1, 8)."""
    if isinstance(actors, str):
        low, _, high = actors.partition("..")
        actors = (int(low), int(high or low))
    elif isinstance(actors, int):
        actors = (actors, actors)
    low, high = actors
    if not 1 <= low <= high:
        raise ValueError(f"actors must be N or MIN..MAX with 1 <= MIN <= MAX, got {low}..{high}")
    return low, high


def choose_layout(fused: bool | None, actors, gpus_per_actor: float, cpus_per_actor: float,
                  own_local_ray: bool, cpus: float) -> tuple[bool, tuple[int, int]]:
    """(fused, (min, max) actors) of a run; None means "choose". On a local Ray that `score`
    started itself the machine is all there is, so unless the actors use GPUs the default is
    fused actors, one per CPU (each with one CPU and one Paddle thread, up to MAX_LOCAL_ACTORS):
    every core then reads, decodes, predicts and writes maps, and no stage waits for another's
    CPU (0.73x the in-process loop at 4,000 images on 2 cores, against 0.60x for the separate
    stages; bench/RESULTS.md). On a Ray that was already running (a cluster, `ray job submit`)
    the default stays separate stages with one actor, so decoding runs in CPU tasks any node
    can take and GPU actors only predict."""
    if fused is None:
        fused = own_local_ray and gpus_per_actor == 0
    if actors is None:
        per_cpu = fused and own_local_ray and gpus_per_actor == 0
        actors = min(MAX_LOCAL_ACTORS, max(1, int(cpus // max(1.0, cpus_per_actor)))) if per_cpu else 1
    return fused, parse_actors(actors)


def check_cpus_left_for_decoding(actors: int, cpus_per_actor: float, cluster_cpus: float) -> None:
    """On a fixed-size (local) Ray, actors that hold every CPU leave none for the read and
    decode tasks, and Ray Data then waits forever without an error (measured): refuse it."""
    if actors * cpus_per_actor >= cluster_cpus:
        raise ValueError(f"{actors} scoring actor(s) x {cpus_per_actor:g} CPU take all {cluster_cpus:g} CPUs of "
                         "this local Ray, leaving none to read and decode images: use fewer actors or a "
                         "smaller cpus_per_actor (--cpus-per-actor), e.g. "
                         f"{max(0.25, (cluster_cpus - 1) / max(actors, 1)):g}")


def fused_actor_reservation(actors: int, cpus_per_actor: float, threads_per_actor: int | None,
                            cluster_cpus: float) -> tuple[float, int]:
    """(CPUs each fused actor reserves from Ray, its Paddle threads) on a local Ray of its own.
    The pipeline's input is read by Ray Data tasks (list the pending files, read them, cut
    them into batch-sized blocks) that each need a CPU of Ray's: actors holding every CPU
    would leave them none and the run would wait forever (seen: `stfpm score` hung at its
    first batch). So the actors reserve all but one CPU between them and keep the threads
    they were given: the cores they compute on are the same, the read tasks are short."""
    threads = threads_per_actor or max(1, int(cpus_per_actor))
    return max(0.0, cluster_cpus - 1) / max(actors, 1), threads


def last_listed(output: str) -> datetime | None:
    """When the last finished run into OUTPUT listed its inputs: its run id's time (new_run_id),
    else its finish time; None without _SUCCESS (no run yet, or the last one did not finish)."""
    try:
        done = json.loads(read_bytes(join_uri(output, SUCCESS)))
    except (FileNotFoundError, ValueError):
        return None
    started = run_started(done.get("run_id"))
    if started is None and done.get("finished_at"):
        started = datetime.fromisoformat(done["finished_at"])
    return started


def score(model: str, source: str, output: str, *, partitions: list[str] | None = None,
          extensions=IMAGE_EXTENSIONS, batch_size: int = 32, actors: int | str | tuple[int, int] | None = None,
          gpus_per_actor: float = 0, cpus_per_actor: float = 1, threads_per_actor: int | None = None,
          threshold: float | None = None, overlays: bool = False, run_id: str | None = None, ray_address: str | None = None,
          max_pixels: int = 100_000_000, max_bytes: int = MAX_BYTES, wait_for_actors_s: float = 600,
          rows_per_file: int = ROWS_PER_FILE, flush_s: float = FLUSH_S, allow_roots: list[str] | None = None,
          verbose: bool = True, progress: bool | None = None, fused: bool | None = None,
          dates: list[date] | None = None, lookback_days: int = LOOKBACK_DAYS) -> dict:
    """Score every image of SOURCE with MODEL on Ray Data and write OUTPUT (module docstring).

    model: a model directory (local or s3://) or a registry YAML (category -> model directory).
    source: a directory, an s3:// prefix, a manifest (.parquet or text, one URI per line) or
        an image. partitions: names for the directory levels under it (e.g. category, line).
    actors: pool size, N or "MIN..MAX" (autoscaling); gpus_per_actor > 0 puts each actor on a
        GPU Ray assigns. A new local Ray is started unless Ray is initialised in this process,
        ray_address is given or RAY_ADDRESS is set (inside `ray job submit`: the job's cluster);
        "local" in either starts one too.
        fused: each actor also reads, decodes and writes maps (stages.FusedScoreActor) instead of
        separate CPU tasks doing so. None for both: `choose_layout` (on a local Ray of its own,
        fused actors, one per CPU; else separate stages and one actor).
    dates, lookback_days: a source with {date} (stfpm.scoring.dates) lists the folders of `dates`;
        default: from the day the last finished run into OUTPUT listed (_SUCCESS), less
        lookback_days, to today (UTC); before any finished run, every day folder that exists.
    allow_roots: folders local inputs must lie in (symlinks resolved); default: a folder
        source itself (symlinks out of it are not followed), else anywhere the workers can read.
        Table files are written every rows_per_file rows or flush_s seconds.
    verbose: report on stderr. progress (default: verbose): rows done, images/s and ETA while
        the pipeline runs (stfpm.scoring.progress): a bar when stderr is a terminal, else
        a line every 30 s.
    Returns the _SUCCESS summary (counts, timings, per-stage throughput, models)."""
    echo = logger.info if verbose else logger.debug
    started = time.perf_counter()
    if actors is not None:
        parse_actors(actors)  # a bad pool size fails before any listing
    check_output(output)  # a missing bucket fails now, not after every image is scored
    if dates is not None and not has_date(source):
        raise UserError(f"dates apply to a source with {{date}} in it (e.g. s3://bucket/line3/{{date}}/); {source} has none")
    if has_date(source) and dates is None:
        dates = days_to_list(DateTemplate.parse(source), last_listed(output), datetime.now(timezone.utc), lookback_days)
    plan = plan_run(model, source, output, partitions, extensions, threshold, run_id, allow_roots=allow_roots,
                    dates=dates)
    _delete(join_uri(plan.output, SUCCESS))
    echo(f"{plan.n_listed} inputs listed in {plan.timings['list_s']:.1f}s; {plan.n_skipped} already scored "
         f"with the same model version; {len(plan.pending)} to score")
    totals, started_ray, own_local_ray, layout, written = merge_stats([]), False, False, None, []
    if len(plan.pending):
        t0 = time.perf_counter()
        if not ray.is_initialized():
            env = s3_settings()  # S3 endpoint and region (never credentials) for workers on a cluster
            # No address anywhere (not given, no RAY_ADDRESS as a Ray job has), or "local" given
            # (--ray-address local, RAY_ADDRESS=local): a new local Ray of this run's own, never one
            # that another `ray start` on the machine advertises, with the one-machine layout.
            own_local_ray = (ray_address or os.environ.get("RAY_ADDRESS") or "local") == "local"
            init_ray(address="local" if own_local_ray else ray_address, runtime_env={"env_vars": env} if env else None,
                     pin_workers=False, include_dashboard=False, log_to_driver=verbose)
            started_ray = True
        plan.timings["ray_start_s"] = time.perf_counter() - t0
        try:
            cluster_cpus = ray.cluster_resources().get("CPU", 0)
            fused, (low, high) = choose_layout(fused, actors, gpus_per_actor, cpus_per_actor, own_local_ray,
                                               cluster_cpus)
            layout = {"fused": fused, "actors": [low, high], "cpus_per_actor": cpus_per_actor,
                      "gpus_per_actor": gpus_per_actor}
            echo(f"{low if low == high else f'{low}..{high}'} {'fused ' if fused else ''}scoring actor(s) x "
                 f"{cpus_per_actor:g} CPU" + ("" if fused else ", decoding and maps in separate CPU tasks"))
            if own_local_ray and not fused:
                check_cpus_left_for_decoding(high, cpus_per_actor, cluster_cpus)
            actor_cpus, actor_threads = cpus_per_actor, threads_per_actor
            if fused and own_local_ray and gpus_per_actor == 0 and high * cpus_per_actor > cluster_cpus - 1:
                actor_cpus, actor_threads = fused_actor_reservation(high, cpus_per_actor, threads_per_actor, cluster_cpus)
            t0 = time.perf_counter()
            shown = verbose if progress is None else progress
            meter = ScoringProgress(len(plan.pending)) if shown else None
            ds, writer = build_pipeline(plan, batch_size=batch_size, actors=(low, high),
                                        gpus_per_actor=gpus_per_actor, cpus_per_actor=actor_cpus,
                                        threads_per_actor=actor_threads, threshold=threshold,
                                        overlays=overlays, max_pixels=max_pixels, max_bytes=max_bytes,
                                        wait_for_actors_s=wait_for_actors_s, rows_per_file=rows_per_file,
                                        flush_s=flush_s, fused=fused)
            with native_lines_dropped(ACTOR_ARGS_IN_OBJECT_STORE), meter or contextlib.nullcontext():
                totals = writer.consume(ds, on_rows=meter and meter.add)
            written = writer.files
            plan.timings["pipeline_s"] = time.perf_counter() - t0
        finally:
            _delete_folder(join_uri(plan.output, PENDING, plan.run_id))
            if started_ray:
                t0 = time.perf_counter()
                ray.shutdown()
                plan.timings["ray_stop_s"] = time.perf_counter() - t0
    return finish_run(plan, totals, layout, started, written, echo)


def finish_run(plan: Plan, totals: dict, layout: dict | None, started: float, written: list[str] = (),
               echo=logger.debug) -> dict:
    """The end of a run: compaction of the files this run wrote and of those that held rows of
    its inputs (plan.table_files), never the table's whole history; a flat table's rows
    moved into bucket folders (once, sink.move_flat_files); the table's counts from a few of
    its columns; _SUCCESS. Returns the summary."""
    t0 = time.perf_counter()
    scores = join_uri(plan.output, SCORES)
    removed = remove_superseded(scores, None if plan.table_files is None else sorted({*plan.table_files, *written}))
    move_flat_files(scores)  # a table written before buckets: once
    counts = table_counts(scores, [ref.version for ref in plan.models.values()])
    plan.timings["compact_s"] = time.perf_counter() - t0
    plan.timings["total_s"] = time.perf_counter() - started
    summary = _summary(plan, totals, removed, counts, layout)
    write_bytes(join_uri(plan.output, SUCCESS), json.dumps(summary, indent=2).encode())
    echo(format_report(summary))
    return summary


def table_counts(scores_uri: str, versions: list[str]) -> dict:
    """Rows, ok and error rows of the whole table and of its latest view (table.latest_rows),
    bucket by bucket (an input's rows are all in one), reading only the columns that decide."""
    counts = dict.fromkeys(("table_rows", "table_ok", "table_error", "latest_rows", "latest_ok", "latest_error"), 0)
    count = lambda column, value: int(pc.sum(pc.equal(column, value)).as_py() or 0)  # noqa: E731
    wanted = sorted(set(versions))
    fs, _ = filesystem_for(scores_uri)
    for group in shards(table_files(scores_uri)):
        dataset = pads.dataset(group, filesystem=fs, format="parquet", schema=INDEX_SCHEMA)
        shard = dataset.to_table(columns=["status", "model_version"])
        status, found = shard["status"], shard["model_version"]
        counts["table_rows"] += len(shard)
        counts["table_ok"] += count(status, "ok")
        counts["table_error"] += count(status, "error")
        if len(wanted) == 1 and not found.null_count:
            # one model and no row without one: the table, just compacted, holds one row per
            # (image_uri, model_version), so the latest view is the rows of that version
            latest = status.filter(pc.equal(found, wanted[0]))
        else:
            field = pads.field("model_version")
            current = dataset.to_table(columns=["image_uri", "input_version", "status", "scored_at"],
                                       filter=field.is_null() | field.isin(wanted))
            latest = current["status"].take(pa.array(winning_rows(current, ["image_uri"]), pa.int64()))
        counts["latest_rows"] += len(latest)
        counts["latest_ok"] += count(latest, "ok")
        counts["latest_error"] += count(latest, "error")
    return counts


def build_pipeline(plan: Plan, *, batch_size: int = 32, actors: tuple[int, int] = (1, 1), gpus_per_actor: float = 0,
                   cpus_per_actor: float = 1, threads_per_actor: int | None = None,
                   threshold: float | None = None, overlays: bool = False,
                   max_pixels: int = 100_000_000, max_bytes: int = MAX_BYTES, wait_for_actors_s: float = 600,
                   rows_per_file: int = ROWS_PER_FILE, flush_s: float = FLUSH_S,
                   fused: bool = False) -> tuple[ray.data.Dataset, TableWriter]:
    """The Ray Data pipeline for `plan.pending` up to the maps, and the writer of its rows:
    `writer.consume(ds)` runs it and returns the counts and stage times. `fused`: one
    actor stage that also decodes and writes maps (stages.FusedScoreActor), for one machine."""
    ds = ray.data.read_parquet(write_pending(plan), filesystem=filesystem_for(plan.output)[0])
    # streamed into blocks of one batch, in the read tasks: every actor gets work from the start
    # and a batch's rows reach the table writer as soon as it is scored
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds.context.wait_for_min_actors_s = wait_for_actors_s
    ds.context.enable_progress_bars = False  # progress.py draws ours
    # Ray Data reserves a share of the CPUs for each stage; on a few CPUs those shares are
    # fractions of a CPU that no 1-CPU maps task fits, and the maps stage waited for decoding
    # and prediction to end (bench/RESULTS.md, issue 14). Reservations pay on a cluster only.
    ds.context.op_resource_reservation_enabled = ray.cluster_resources().get("CPU", 0) >= RESERVATION_MIN_CPUS
    drop_progress_bars_disabled_notice()
    models = {("" if key is None else key): ref.uri for key, ref in plan.models.items()}
    # max_calls: a decoding worker is replaced after that many batches, so heap fragmentation
    # from images of every size cannot build up. Being a remote argument the actors lack, it
    # also keeps Ray Data from fusing decoding into the actors: decoding stays in CPU tasks
    # that any node can run, and the stage report can tell it apart (docs/design.md §6).
    actor_kwargs = {"models": models, "threshold": threshold, "threads": threads_per_actor, "cache_dir": MODEL_CACHE}
    writer = TableWriter(join_uri(plan.output, SCORES), plan.run_id, plan.schema, rows_per_file, flush_s)
    if fused:
        ds = ds.map_batches(FusedScoreActor, batch_format="pyarrow", batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
                            num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
                            fn_constructor_kwargs={**actor_kwargs, "output": plan.output, "max_pixels": max_pixels,
                                                   "max_bytes": max_bytes, "keep_images": overlays})
        return ds, writer
    ds = ds.map_batches(load_images, batch_format="pyarrow", batch_size=None, num_cpus=1,
                        max_calls=DECODE_BATCHES_PER_WORKER,
                        fn_kwargs={"max_pixels": max_pixels, "max_bytes": max_bytes, "keep_images": overlays})
    ds = ds.map_batches(ScoreActor, batch_format="pyarrow", batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
                        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor, fn_constructor_kwargs=actor_kwargs)
    ds = ds.map_batches(write_maps, batch_format="pyarrow", batch_size=None, num_cpus=1,
                        fn_kwargs={"output": plan.output})
    return ds, writer


def write_pending(plan: Plan, rows_per_file: int = PENDING_ROWS_PER_FILE) -> list[str]:
    """plan.pending as a few Parquet files under OUTPUT/_pending/<run_id>/ (deleted when the
    run ends), which the pipeline reads: the driver holds no object per batch."""
    fs, folder = filesystem_for(join_uri(plan.output, PENDING, plan.run_id))
    fs.create_dir(folder, recursive=True)
    paths = []
    for i in range(0, max(len(plan.pending), 1), rows_per_file):
        paths.append(f"{folder}/pending-{i // rows_per_file:05d}.parquet")
        pq.write_table(plan.pending.slice(i, rows_per_file), paths[-1], filesystem=fs)
    return paths


def _delete_folder(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _delete(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _summary(plan: Plan, totals: dict, removed: int, counts: dict, layout: dict | None) -> dict:
    rows = totals["rows"]
    wall = plan.timings.get("pipeline_s")
    stages = {s: {"busy_s": round(t, 3), "images_per_busy_s": round(rows / t, 1) if t > 0 else None}
              for s, t in totals["seconds"].items()}
    return {
        "run_id": plan.run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": {"root": plan.output, "scores": join_uri(plan.output, SCORES), "maps": join_uri(plan.output, MAPS)},
        "models": {str(k or ref.name): {"uri": ref.uri, "model_version": ref.version, "threshold": ref.threshold,
                                        "log_scale": ref.log_scale,
                                        "input_size": ref.input_size, "tile_size": ref.tile_size,
                                        "tile_overlap": ref.tile_overlap, "tile_whole": ref.tile_whole}
                   for k, ref in plan.models.items()},
        "counts": {"listed": plan.n_listed, "skipped_already_scored": plan.n_skipped, "scored": rows,
                   "ok": totals["ok"], "error": totals["error"], "error_input": totals["error_input"],
                   "error_transient": totals["error_transient"], "anomalous": totals["anomalous"],
                   "ood": totals["ood"],
                   "superseded_rows_removed": removed, "files_written": totals["files"], **counts},
        "timings_s": {k: round(v, 3) for k, v in plan.timings.items()},
        "images_per_s": round(rows / wall, 2) if wall else None,
        "layout": layout, "stages": stages, "actor_peak_rss_mb": round(totals["actor_peak_rss_mb"], 1),
        "devices": totals["devices"], "error_examples": totals["error_examples"],
        "map_scaling": "pixel = round(255 * s), r = raw / threshold: s = 0.5 * r ** (1 / log_scale) "
                       "below the threshold, 1 - 0.5 / r above (map_to_raw inverts it)",
    }


def format_report(summary: dict) -> str:
    c, t = summary["counts"], summary["timings_s"]
    lines = [f"run {summary['run_id']}: {c['scored']} scored ({c['ok']} ok, {c['error']} errors, "
             f"{c['anomalous']} anomalous, {c['ood']} unlike the training images (ood)), "
             f"{c['skipped_already_scored']} skipped as already scored",
             f"  ray start {t.get('ray_start_s', 0):.1f}s, pipeline {t.get('pipeline_s', 0):.1f}s "
             f"({summary['images_per_s'] or 0} images/s), total {t['total_s']:.1f}s",
             "  stage      busy s   images per busy second (one task or actor)"]
    for stage, s in summary["stages"].items():
        lines.append(f"  {stage:<9}{s['busy_s']:>8.1f}   {s['images_per_busy_s'] or '-'}")
    lines.append(f"  table: {summary['output']['scores']} ({c['table_rows']} rows), maps: {summary['output']['maps']}")
    return "\n".join(lines)
