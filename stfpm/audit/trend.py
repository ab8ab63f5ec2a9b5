"""The audit's trend: per category, volume and anomaly, ood and error rates over the last
nights, read from the runs already in OUTPUT (each finished run's audit.json), so the report
shows tonight against the nights before without a database."""
from __future__ import annotations

import json
import logging

from stfpm.storage import join_uri, read_bytes

logger = logging.getLogger(__name__)

TREND_NIGHTS = 30
SERIES = ("inputs", "anomaly_rate", "ood_rate", "error_rate")


def night_point(run_id: str, until: str | None, c: dict | None) -> dict:
    """One category's figures on one night; a category absent that night has 0 inputs and no rates."""
    if c is None:
        return {"run_id": run_id, "until": until, "inputs": 0, "anomaly_rate": None, "ood_rate": None,
                "error_rate": None}
    return {"run_id": run_id, "until": until, "inputs": c["inputs"], "anomaly_rate": c["anomaly_rate"],
            "ood_rate": c.get("ood_rate"), "error_rate": c["error"] / c["inputs"] if c["inputs"] else None}


def collect_trend(output: str, runs: list[dict], current: dict, nights: int = TREND_NIGHTS) -> dict:
    """{"nights": [{run_id, until}, ...] oldest first, ending with `current` (this run's
    summary), "categories": {name: [night_point, ...] aligned with nights}}. `runs`: the
    audit state's finished runs, newest last; a run whose audit.json cannot be read is left out."""
    summaries = []
    for run in runs[-(nights - 1):] if nights > 1 else []:
        if run["run_id"] == current["run_id"]:
            continue
        try:
            summaries.append(json.loads(read_bytes(join_uri(output, "runs", run["run_id"], "audit.json"))))
        except (OSError, ValueError) as e:  # FileNotFoundError included: a pruned or foreign run
            logger.debug("trend: run %s left out (%s)", run["run_id"], e)
    summaries.append(current)
    names = sorted({name for s in summaries for name in s["categories"]})
    return {"nights": [{"run_id": s["run_id"], "until": s["window"]["until"]} for s in summaries],
            "categories": {name: [night_point(s["run_id"], s["window"]["until"], s["categories"].get(name))
                                  for s in summaries] for name in names}}
