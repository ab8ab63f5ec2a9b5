"""Online scoring on Ray Serve (`stfpm serve`, `serve run stfpm.serving.app:build_app`): a camera
PC posts one image and gets the score, the decision and optionally the map in milliseconds,
from the same Predictor, model directory and threshold as `predict` and the nightly table.

    app.py     the options, the models (one directory, or a registry's categories), the app
               builder, and running it on a local Ray or a cluster
    scorer.py  one deployment per model: requests from many clients batched (@serve.batch)
               into one forward of the Predictor
    router.py  the HTTP ingress: POST /v1/{category}/predict, GET /healthz, GET /v1/models;
               bad input is a 4xx with a one-line JSON error; our counters per category
"""
