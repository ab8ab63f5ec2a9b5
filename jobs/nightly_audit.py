"""Nightly audit, as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/nightly_audit.py --config cluster/audit.example.yaml

Scores the images no finished run has taken yet (a ledger) and writes the score table,
the maps, audit.json and report.html under OUTPUT/runs/<run_id>/ (stfpm/audit.py says how).
Runs the same on a laptop (`python jobs/nightly_audit.py --config ...` starts a local Ray).

Exit codes:
    0  done; every category's anomaly rate at or under its alert level
    3  done; some category's anomaly rate above its alert level (see audit.json "alerts")
    4  done; more inputs than alert.error_rate failed for a reason other than a bad file (a
       model or storage failure); the next run scores them again
    1  failed; the state is not advanced, so the next run retries this one
    2  invalid arguments, configuration or model directory (one line naming it); nothing
       was scored
    5  another audit of the same output is running (OUTPUT/_audit.lock); nothing was done
"""
from __future__ import annotations

import argparse
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    from stfpm.runtime import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Audit config YAML (local path or s3://)")
    parser.add_argument("--rerender", metavar="RUN_ID",
                        help="Only write runs/RUN_ID/report.html again (fresh presigned links)")
    args = parser.parse_args(argv)

    from stfpm.audit.run import EXIT_LOCKED, AuditLocked, load_config, rerender_report, run_audit
    from stfpm.audit.summary import EXIT_FAILED, EXIT_USAGE
    from stfpm.errors import UserError

    try:
        cfg = load_config(args.config)
    except (ValueError, OSError) as e:  # stfpm.errors.UserError is a ValueError; OSError: a folder, unreadable
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.rerender:
            print(rerender_report(cfg, args.rerender))
            return 0
        result = run_audit(cfg)
    except AuditLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except UserError as e:  # e.g. a model directory that fails its checks: one line, state left open
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - any failure is exit 1; the traceback is in the job log
        traceback.print_exc()
        return EXIT_FAILED
    print(f"audit {result.run_id}: {result.summary['status']}; report {result.report}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
