"""Training, as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --data s3://bucket/mvtec --out s3://bucket/models --workers 8 --gpu

DATA is one category (a folder holding train/good or train.txt), trained into OUT; or a
folder of categories, each trained into OUT/<category>, then OUT/registry.yaml for the
nightly audit. With --workers N each model trains data-parallel on N Ray Train workers
(one GPU each with --gpu); --workers 0 trains in the job's own process. Checkpoints go to
--storage (default OUT/_checkpoints, shared by every node when OUT is on S3), so
submitting the same command again resumes where a failed job stopped.

Exit codes: 0 every model trained; 1 a model failed (the others are kept and in the registry);
2 invalid arguments or data (nothing trained).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing


# The job's own defaults where they differ from the CLI's: a cluster job trains on Ray Train
# workers and recovers from lost workers unless told otherwise.
JOB_DEFAULTS = {"workers": 2, "max_failures": 2}


def main(argv: list[str] | None = None) -> int:
    from stfpm.errors import UserError
    from stfpm.runtime import configure_logging

    configure_logging()
    try:
        return train_job(argv)
    except (UserError, ValueError, FileNotFoundError) as e:  # the data or an option is wrong: say which
        print(f"error: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    """--data, --out and the job's Ray options, then every training option of the CLI
    (`stfpm.training.options.TRAINING_OPTIONS`: one list, so the two cannot drift apart)."""
    from stfpm.training.options import TRAINING_OPTIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="A category folder, or a folder of them (local or s3://)")
    p.add_argument("--out", required=True, help="Model directory, or the folder for one per category")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--parallel", type=int, default=None, help="Categories at once (default: as the cluster fits)")
    for name, (kind, option) in TRAINING_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=option.help)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = JOB_DEFAULTS.get(name, option.default)
        p.add_argument(flag, type=base, default=default, help=option.help if name != "storage" else
                       "Ray Train checkpoint storage (default OUT/_checkpoints)")
    return p


def train_job(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)

    from stfpm.raytrain.driver import is_category, train_categories, train_distributed
    from stfpm.storage import filesystem_for, is_s3
    from stfpm.training.run import train
    from stfpm.training.options import train_config

    cfg = train_config(vars(args))
    out = args.out.rstrip("/")
    storage = args.storage or f"{out}/_checkpoints"
    distributed = {"use_gpu": args.gpu, "max_failures": args.max_failures, "cpus_per_worker": args.cpus_per_worker,
                   "threads_per_worker": args.threads_per_worker,
                   "storage": storage if is_s3(storage) else filesystem_for(storage)[1]}  # Ray wants absolute paths
    if args.workers:
        from stfpm.noise import init_ray

        init_ray(address=args.ray_address)  # inside a job: the job's cluster; elsewhere: a local Ray
    if is_category(args.data):
        if args.workers:
            result = train_distributed(args.data, out, cfg, num_workers=args.workers, name=args.name, **distributed)
        else:
            result = train(args.data, out, cfg)
        print(json.dumps({"model": out, "best_epoch": result.best_epoch,
                          "threshold": result.calibration.to_dict()}))
        return 0
    summary = train_categories(args.data, out, cfg, num_workers=args.workers, parallel=args.parallel,
                               name=args.name, **(distributed if args.workers else {}))
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
