"""What a model directory is and how it runs: the card (typed model.json), the artifact
(safetensors weights, hashes), the pretrained teachers, the Predictor (the one per-image
path), export, the in-distribution check, the normalised score and the 8-bit heat map.
Import the modules themselves: the map-writing tasks import `heatmap` without Paddle."""
