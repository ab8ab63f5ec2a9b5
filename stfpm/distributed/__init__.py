"""Ray parts of stfpm: batch scoring on Ray Data (`score`, see stfpm.distributed.scoring)."""
from stfpm.distributed.scoring import TABLE_DOC, map_to_raw, score

__all__ = ["TABLE_DOC", "map_to_raw", "score"]
