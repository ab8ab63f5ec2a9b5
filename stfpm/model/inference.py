"""The one per-image path (prepare, infer, calibrate, encode) used by predict, evaluate,
training's calibration and batch scoring.

A batch of prepared images (or of their tiles, for a tiled model: `stfpm.data.tiling`; its
whole view and tiles, for the "whole+tiles" views) goes through batched forwards; a tiled
image's tile maps are stitched (and the two views combined); each map is then resized back to
its own image's size, scored (max of the map), normalised (0.5 at the threshold, docs/design.md §3)
and thresholded into a 0/255 mask; the forward's feature profile gives the in-distribution
check (`stfpm.model.ood`: `ood`, `ood_score`).

The forward runs on one of several engines that give the same maps (within 1e-5): on CPU the
network compiled into Paddle Inference with oneDNN (`stfpm.model.export.compile_network`, 3.6-5x
faster than the dynamic graph) or converted in memory to ONNX and run by ONNX Runtime; on GPU,
or where Paddle lacks oneDNN, the dynamic graph. An exported model runs on its format's engine:
a Paddle program on Paddle Inference, an ONNX graph on ONNX Runtime, an OpenVINO IR on
OpenVINO; the last two without Paddle (this module imports it only for a model directory).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stfpm.model.artifact import LoadedModel
from stfpm.model.card import ModelCard, check_threshold
from stfpm.data.images import ModelInput, normalize_batch, prepare_input
from stfpm.model.engines import LayerForward
from stfpm.nn.maps import anomaly_map, images_per_forward, smooth_map, view_maps

ENGINES = ("auto", "onednn", "dygraph", "onnxruntime", "openvino")


def cpu_default() -> str:
    """The CPU engine of a model directory under "auto": STFPM_ENGINE when set (how `stfpm
    score`'s actors are told, e.g. STFPM_ENGINE=onednn), else ONNX Runtime (the network
    converted to ONNX in memory at load) when the `onnx` extra is installed, measured 2-2.7x
    Paddle Inference with oneDNN per CPU-second at the same maps (bench/engines.py,
    bench/RESULTS.md); else oneDNN."""
    import importlib.util
    import os

    from stfpm.model.engines import installed

    chosen = os.environ.get("STFPM_ENGINE", "").strip()
    if chosen:
        if chosen not in ENGINES[1:]:
            from stfpm.errors import UserError

            raise UserError(f"STFPM_ENGINE is {chosen!r}; expected one of {', '.join(ENGINES[1:])}")
        return chosen
    return "onnxruntime" if installed("onnxruntime") and importlib.util.find_spec("paddle2onnx") else "onednn"


TILES_PER_FORWARD = 64  # bounds a forward's memory however many tiles a batch of large images has


@dataclass
class Prediction:
    score: float            # raw: max of the anomaly map
    norm_score: float       # in [0, 1], 0.5 at the threshold, strictly increasing in score (stfpm.model.score_scale)
    is_anomaly: bool
    threshold: float
    anomaly_map: np.ndarray  # float32 (H, W) at the input image's own size
    pred: np.ndarray         # uint8 (H, W) 0/255 mask, map >= threshold
    ood: bool | None = None          # unlike the training images (None: the model has no check)
    ood_score: float | None = None   # in-distribution distance / its limit; > 1 is ood


class Predictor:
    """The whole per-image path of a model, used by predict, evaluate, training's threshold
    calibration and Ray Data scoring (whose stages call its parts on different nodes):

        prepare (bytes or array -> ModelInput, the one decode policy; a tiled model's tiles) ->
        image_maps (a batch of inputs' tiles -> maps, batched forwards, tiles stitched) ->
        calibrate (score, normalise, decide; maps at each image's size) -> encode
        (`stfpm.model.heatmap`: the 8-bit map, its PNG, the overlay)

    The forward is a model directory's network compiled into Paddle Inference (CPU) or run on
    the dynamic graph (GPU), or an exported model's program; all give the same maps."""

    def __init__(self, card: ModelCard, layer_forward: LayerForward, threshold: float | None = None,
                 engine: str | None = None):
        self.card = card
        self.engine = engine  # what runs layer_forward (ENGINES), when the opener knows
        self.layer_forward = layer_forward  # (N, 3, S, S) normalised input -> (layer maps, feature profile)
        self.size = card.input.size
        self.mean, self.std = card.input.mean, card.input.std
        self.calibration = card.calibration
        self.threshold = card.calibration.threshold if threshold is None else check_threshold(threshold)
        self.smooth_sigma = card.map.smooth_sigma
        self.tiling = card.input.tiling  # None, or the tiles every image is cut into (stfpm.data.tiling)
        self.tile_view_scale = card.map.tile_view_scale  # the "whole+tiles" views' scales (tiling.whole)
        bank = card.patchcore  # PatchCore: its (patches x bank) distances bound the images per forward
        self.forward_batch = images_per_forward(bank["bank_size"], bank["patches_per_image"]) if bank else None
        self.view_banks = bool(bank and bank.get("view_banks"))  # a bank per view: two maps per input

    @classmethod
    def from_model(cls, model: LoadedModel, threshold: float | None = None, engine: str = "auto",
                   threads: int | None = None) -> "Predictor":
        """`engine`: "onednn" (Paddle Inference on CPU), "onnxruntime" or "openvino" (the network
        converted to ONNX in memory, then run by that engine on CPU), "dygraph", or "auto":
        on CPU `cpu_default()`, on a GPU (or oneDNN without Paddle's oneDNN) the dynamic graph.
        `threads`: CPU intra-op threads (default `stfpm.runtime.cpu_threads()`)."""
        import paddle

        from stfpm.runtime import configure_threads

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        threads = configure_threads(threads)
        network = model.network
        size = model.card.input.size
        chosen = engine
        if engine == "auto":
            engine = cpu_default() if not paddle.device.get_device().startswith("gpu") else "dygraph"
            if engine == "onednn" and not paddle.base.core.is_compiled_with_mkldnn():
                engine = "dygraph"
        if engine in ("onnxruntime", "openvino") and chosen == "auto":
            try:
                return cls.from_model(model, threshold, engine, threads)
            except Exception as e:  # noqa: BLE001 - a graph paddle2onnx cannot convert, or the engine cannot
                # load (ORT: an AveragePool of stride 0 from the 8x8 profile grid on a map under 8 px) runs on oneDNN
                logging.getLogger(__name__).warning("%s; running on Paddle Inference (oneDNN) instead",
                                                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                engine = "onednn"
        if engine == "onednn":
            from stfpm.model.export import compile_network

            return cls(model.card, compile_network(network, size, threads), threshold, engine)
        if engine in ("onnxruntime", "openvino"):
            from stfpm.model.engines import open_onnx, open_openvino
            from stfpm.model.export import network_onnx

            graph = network_onnx(network, size)
            if engine == "onnxruntime":
                return cls(model.card, open_onnx(graph, threads), threshold, engine)
            import tempfile

            with tempfile.TemporaryDirectory(prefix="stfpm-onnx-") as tmp:  # OpenVINO reads the graph from a file
                (Path(tmp) / "model.onnx").write_bytes(graph)
                return cls(model.card, open_openvino(Path(tmp) / "model.onnx", threads), threshold, engine)
        network.eval()

        def layer_forward(batch: np.ndarray) -> tuple[list, np.ndarray]:
            with paddle.no_grad():
                *maps, profile = (d.numpy() for d in network.inference_outputs(paddle.to_tensor(batch)))
            return maps, profile

        return cls(model.card, layer_forward, threshold, "dygraph")

    @classmethod
    def open(cls, model_dir, threshold: float | None = None, threads: int | None = None,
             engine: str = "auto") -> "Predictor":
        """A model directory from `stfpm train`, or an exported one from `stfpm export` (run on
        its format's engine, or on `engine` where the format allows: `load_exported`)."""
        from stfpm.model.export import is_exported, load_exported

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        if is_exported(model_dir):
            card, forward, engine = load_exported(model_dir, threads, engine)
            return cls(card, forward, threshold, engine)
        from stfpm.model.artifact import load_model

        return cls.from_model(load_model(model_dir), threshold, engine, threads)

    @property
    def model_version(self) -> str:
        return self.card.model_version

    def prepare(self, source: bytes | np.ndarray, name: str = "<image>", max_pixels: int = 100_000_000,
                keep_image: bool = False) -> ModelInput:
        """File bytes or a BGR array -> this model's input (`stfpm.data.images.prepare_input`)."""
        return prepare_input(source, self.size, name, max_pixels, keep_image, self.tiling)

    def forward(self, batch: np.ndarray, whole_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 3, S, S) float32 normalised input -> (N, S, S) float32 anomaly maps and the (N, D)
        feature profiles (None from an export made before the in-distribution check). A
        PatchCore model runs `forward_batch` images at a time and smooths its maps; with a
        bank per view, each input is searched in its own view's (`whole_rows`, `view_rows`)."""
        step = self.forward_batch or max(len(batch), 1)
        size = (batch.shape[2], batch.shape[3])
        maps, profiles = [], []
        for i in range(0, len(batch), step):
            layer_maps, profile = self.layer_forward(batch[i:i + step])
            if self.view_banks:
                layer_maps = view_maps(layer_maps, None if whole_rows is None else whole_rows[i:i + step])
            maps.append(anomaly_map(layer_maps, size, **self.card.map.options()))
            profiles.append(profile)
        join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
        return smooth_map(join(maps), self.smooth_sigma), None if profiles[0] is None else join(profiles)

    def infer(self, pixels: np.ndarray, whole_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (N, S, S, 3) model inputs (`ModelInput.pixels`) -> (N, S, S) float32 maps
        and (N, D) feature profiles."""
        return self.forward(normalize_batch(pixels, self.mean, self.std), whole_rows)

    def view_rows(self, counts: list[int]) -> np.ndarray | None:
        """For images of `counts` inputs each (`ModelInput.tiles`), True at each image's whole
        view (its first input) under the whole+tiles views; None for any other model."""
        if self.tiling is None or not self.tiling.whole:
            return None
        rows = np.zeros(int(sum(counts)), bool)
        rows[np.cumsum([0, *counts[:-1]]).astype(int)] = True
        return rows

    def ood_scores(self, profiles: np.ndarray | None, n: int) -> list[float | None]:
        """Each image's in-distribution score, or None where the model or export has no check."""
        if self.calibration.ood is None or profiles is None:
            return [None] * n
        return [float(v) for v in self.calibration.ood.score(profiles)]

    def tile_forward(self, tiles: np.ndarray, whole_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (M, S, S, 3) tiles or whole images -> their (M, S, S) maps and (M, D)
        feature profiles, TILES_PER_FORWARD at a time (`whole_rows`: `view_rows`)."""
        maps, profiles = [], []
        for i in range(0, len(tiles), TILES_PER_FORWARD):
            chunk_maps, chunk_profiles = self.infer(tiles[i:i + TILES_PER_FORWARD],
                                                    None if whole_rows is None else whole_rows[i:i + TILES_PER_FORWARD])
            maps.append(chunk_maps)
            profiles.append(chunk_profiles)
        join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
        return join(maps), None if profiles[0] is None else join(profiles)

    def stitch(self, maps: np.ndarray, counts: list[int], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """The maps of consecutive images' tiles (`counts` each) -> each image's map: its tiles'
        stitched (stfpm.data.tiling, at the tiles' model scale; with the "whole+tiles" views, the
        two views combined), or its own (S, S) one untiled."""
        starts = np.cumsum([0, *counts])
        if self.tiling is None:
            return list(maps)
        return [self.tiling.stitch(maps[a:b], h, w, self.tile_view_scale)
                for a, b, (h, w) in zip(starts[:-1], starts[1:], sizes)]

    def image_maps(self, tiles: list[np.ndarray], sizes: list[tuple[int, int]]) -> tuple[list, list]:
        """Each image's RGB uint8 (K, S, S, 3) tiles (`ModelInput.tiles`; K = 1 untiled) and
        full (h, w) -> its anomaly map (`stitch`) and in-distribution score (its tiles' largest)."""
        counts = [len(t) for t in tiles]
        maps, profiles = self.tile_forward(np.concatenate(tiles) if len(tiles) > 1 else tiles[0], self.view_rows(counts))
        oods, starts = self.ood_scores(profiles, len(maps)), np.cumsum([0, *counts])
        image_oods = [None if oods[a] is None else max(oods[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        return self.stitch(maps, counts, sizes), image_oods

    def calibrate(self, maps: list[np.ndarray], ood_scores: list[float | None], sizes: list[tuple[int, int]],
                  threshold: float | None = None) -> list[Prediction]:
        """Each image's map (`image_maps`) and in-distribution score -> Predictions: score (max
        of the map), normalised score, decision, and map and mask resized to each (h, w)."""
        thr = self.threshold if threshold is None else check_threshold(threshold)
        scores = np.array([float(m.max()) for m in maps], np.float64)
        norm = self.calibration.normalize(scores, thr)
        out = []
        for (h, w), amap, score, ns, ood in zip(sizes, maps, scores, norm, ood_scores):
            full = amap if (h, w) == amap.shape else cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
            out.append(Prediction(score=float(score), norm_score=float(ns), is_anomaly=bool(score >= thr),
                                  threshold=thr, anomaly_map=full,
                                  pred=np.where(full >= thr, 255, 0).astype(np.uint8),
                                  ood=None if ood is None else bool(ood > 1.0), ood_score=ood))
        return out

    def predict(self, sources: list, names: list[str] | None = None, threshold: float | None = None) -> list[Prediction]:
        """File bytes or BGR arrays of any sizes -> one Prediction each, from batched forwards."""
        if not sources:
            return []
        inputs = [self.prepare(src, name) for src, name in zip(sources, names or ["<image>"] * len(sources))]
        return self.run(inputs, threshold)

    def run(self, inputs: list[ModelInput], threshold: float | None = None) -> list[Prediction]:
        """image_maps + calibrate for prepared inputs."""
        sizes = [(i.height, i.width) for i in inputs]
        return self.calibrate(*self.image_maps([i.tiles for i in inputs], sizes), sizes, threshold)
