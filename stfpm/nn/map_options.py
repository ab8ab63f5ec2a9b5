"""The ways the STFPM network's per-layer maps may be made into one anomaly map
(stfpm.nn.maps.anomaly_map). The network owns them; a model card is checked against them.
Pure Python, so reading a card imports no Paddle."""

LAYER_NORMS = ("none", "median", "holdout", "views")  # how layer maps may be normalised
COMBINES = ("product", "sum")  # how the normalised layer maps are combined
