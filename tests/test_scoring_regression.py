"""The rows `stfpm score` writes for a fixed set of real files stay what they were before the
driver's planning, feeding and table code moved to Arrow (issue 23).

The expected rows (tests/scoring_regression.json) were recorded by the code before that change:

    PYTHONPATH=<checkout before issue 23> python tests/test_scoring_regression.py record

The inputs are test_scoring's dataset (good PNGs and JPEGs of several sizes and modes, broken
and unsupported files) made from a fixed seed, and its random-weight model (fixed seed,
threshold at the median score). Compared per input: URI (below the data folder), partition,
the size part of input_version (the rest is the file's time), model name and version, status,
error kind and message, scores, decision, threshold, ood, size, image_id and map key (both
derived from the absolute URI); then a
second run adds no row, and a run through a Parquet manifest of the same files finds them
all scored.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_scoring import _ray_teardown, make_model, ray_local, with_threshold_at_median, write_dataset  # noqa: E402,F401

EXPECTED = Path(__file__).with_name("scoring_regression.json")
DIGITS = 6


def build(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    good = write_dataset(root / "data", rng)
    model = make_model(root / "model", seed=0)
    with_threshold_at_median(model, [good[k] for k in sorted(good) if k.endswith(".png")])
    return root / "data", model


def rows_of(output: Path, data: Path) -> list[dict]:
    table = pq.read_table(output / "scores").sort_by("image_uri")
    rows = []
    for r in table.to_pylist():
        rel = r["image_uri"][len(str(data)) + 1:]
        rows.append({
            "uri": rel, "kind": r["kind"], "size": (r["input_version"] or "").split("-")[0],
            "model_name": r["model_name"], "model_version": r["model_version"], "status": r["status"],
            "error_kind": r["error_kind"], "error": (r["error"] or "").replace(str(data), "DATA") or None,
            "raw_score": None if r["raw_score"] is None else round(r["raw_score"], DIGITS),
            "score": None if r["score"] is None else round(r["score"], DIGITS),
            "is_anomaly": r["is_anomaly"], "threshold": None if r["threshold"] is None else round(r["threshold"], DIGITS),
            "ood": r["ood"], "width": r["width"], "height": r["height"],
            "image_id_ok": r["image_id"] == hashlib.sha256(r["image_uri"].encode()).hexdigest()[:32],
            "map": None if r["map_uri"] is None else r["map_uri"] == f"{output}/maps/{r['model_version']}/{r['image_id']}.png"})
    return rows


def score_rows(root: Path) -> list[dict]:
    from stfpm.scoring import score

    data, model = build(root)
    score(str(model), str(data), str(root / "out"), partitions=["kind"], batch_size=4, verbose=False)
    return rows_of(root / "out", data)


SCORE_TOLERANCE = 1e-5  # the CPU engine may differ (ONNX Runtime's maps are within 1e-6 of oneDNN's, issue 28)


def same_row(got: dict, want: dict) -> bool:
    """Equal, scores within SCORE_TOLERANCE; the decision too, but for an image whose score is
    the threshold itself within that tolerance (the threshold here is an image's score)."""
    numeric = ("raw_score", "score", "threshold")
    if got["score"] is not None and abs(got["score"] - 0.5) <= SCORE_TOLERANCE:
        numeric += ("is_anomaly",)
        got, want = {**got, "is_anomaly": 0.0}, {**want, "is_anomaly": 0.0}
    if {k: v for k, v in got.items() if k not in numeric} != {k: v for k, v in want.items() if k not in numeric}:
        return False
    return all((got[k] is None) == (want[k] is None) and (got[k] is None or abs(got[k] - want[k]) <= SCORE_TOLERANCE)
               for k in numeric)


@pytest.mark.usefixtures("ray_local")
def test_rows_are_the_same_as_before_the_arrow_driver(tmp_path):
    from stfpm.scoring import score

    expected = json.loads(EXPECTED.read_text())
    rows = score_rows(tmp_path)
    assert len(rows) == len(expected) == 18
    for got, want in zip(rows, expected):
        assert same_row(got, want), (got, want)
    data, model = tmp_path / "data", tmp_path / "model"
    again = score(str(model), str(data), str(tmp_path / "out"), partitions=["kind"], verbose=False)
    assert again["counts"]["scored"] == 0 and again["counts"]["table_rows"] == len(expected)
    manifest = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"image_uri": [str(data / r["uri"]) for r in expected]}), manifest)
    by_manifest = score(str(model), str(manifest), str(tmp_path / "out"), partitions=["kind"], verbose=False)
    settled = sum(r["status"] == "ok" or r["error_kind"] == "input" for r in expected)
    assert by_manifest["counts"]["skipped_already_scored"] == settled
    assert all(same_row(got, want) for got, want in zip(rows_of(tmp_path / "out", data), expected))


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        EXPECTED.write_text(json.dumps(score_rows(Path(work)), indent=1) + "\n")
    print(f"wrote {EXPECTED}")
elif __name__ == "__main__":
    pytest.main([__file__])
