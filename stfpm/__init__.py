"""stfpm: STFPM unsupervised image anomaly detection on PaddlePaddle."""
from stfpm import noise as _noise
from stfpm import runtime as _runtime  # noqa: F401  (reads OMP_NUM_THREADS before Paddle changes it)

_noise.install_warning_filters()  # before Paddle is imported: its import-time warning is one of them

__version__ = "0.1.0"


def create_model(model_name: str | None = None, model_dir=None, engine: str = "auto"):
    """PaddleX-style entry point (model_name optional: the directory says it); see
    stfpm.api.create_model."""
    from stfpm.api import create_model as _create

    return _create(model_name, model_dir, engine)


def load_model(path):
    """Load a model directory (network + model.json); see stfpm.model.artifact.load_model."""
    from stfpm.model.artifact import load_model as _load

    return _load(path)
