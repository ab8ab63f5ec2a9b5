"""Training in one process: `run.train` picks the model kind; `loop` trains STFPM's student,
`patchcore` builds PatchCore's bank; both end in `calibration` (card, threshold, in-distribution
check, save), on the shared `config`. `proxy` is label-free validation, `options` the training
options every entry point shares, `paddlex_import` brings in a PaddleX model and calibrates it."""
