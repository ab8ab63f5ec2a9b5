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


def main(argv: list[str] | None = None) -> int:
    try:
        return train_job(argv)
    except (ValueError, FileNotFoundError) as e:  # the data or an option is wrong: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_job(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="A category folder, or a folder of them (local or s3://)")
    p.add_argument("--out", required=True, help="Model directory, or the folder for one per category")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per model (0: in this process)")
    p.add_argument("--gpu", action="store_true", help="One GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--parallel", type=int, default=None, help="Categories at once (default: as the cluster fits)")
    p.add_argument("--storage", default=None, help="Ray Train checkpoint storage (default OUT/_checkpoints)")
    p.add_argument("--name", default=None, help="Run name; the same name resumes (default: from OUT)")
    p.add_argument("--max-failures", type=int, default=2, help="Worker failures to recover from")
    p.add_argument("--backbone", default="resnet18", help="resnet18 | efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="Global batch (split across workers)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-weights", default=None, help="PATH or s3:// URI of the teacher's weights")
    args = p.parse_args(argv)

    import pyarrow.fs as pafs

    from stfpm.distributed.ray_train import train_categories, train_distributed
    from stfpm.storage import filesystem_for, is_s3
    from stfpm.train import TrainConfig, train

    cfg = TrainConfig(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      image_size=args.image_size, seed=args.seed, teacher_weights=args.teacher_weights)
    out = args.out.rstrip("/")
    storage = args.storage or f"{out}/_checkpoints"
    distributed = {"use_gpu": args.gpu, "max_failures": args.max_failures, "cpus_per_worker": args.cpus_per_worker,
                   "storage": storage if is_s3(storage) else filesystem_for(storage)[1]}  # Ray wants absolute paths
    if args.workers:
        from stfpm.noise import init_ray

        init_ray()  # inside a job: the job's cluster; elsewhere: a local Ray
    fs, path = filesystem_for(args.data)
    marks = fs.get_file_info([path.rstrip("/") + "/train", path.rstrip("/") + "/train.txt"])
    is_category = any(m.type != pafs.FileType.NotFound for m in marks)
    if is_category:
        if args.workers:
            result = train_distributed(args.data, out, cfg, num_workers=args.workers, name=args.name, **distributed)
        else:
            result = train(args.data, out, cfg)
        print(json.dumps({"model": out, "best_epoch": result.best_epoch, "threshold": result.calibration.to_dict()}))
        return 0
    summary = train_categories(args.data, out, cfg, num_workers=args.workers, parallel=args.parallel,
                               name=args.name, **(distributed if args.workers else {}))
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
