"""Images and datasets: decoding and preprocessing, dataset discovery, the PaddleX-style
dataset check and the synthetic defect generator."""
from stfpm.data.check import check_dataset
from stfpm.data.datasets import Dataset, DatasetError, Sample, load_dataset, scan_dataset, split_holdout
from stfpm.data.images import (IMAGE_EXTENSIONS, ImageDecodeError, ImageHeader, ModelInput, decode_image,
                               image_mode, normalize_batch, prepare_input, preprocess, read_image, read_mask,
                               resize_for_model, sniff_image, to_bgr_uint8)
from stfpm.data.synth import DEFECT_KINDS, add_defect, make_synthetic_dataset, render_texture

__all__ = [
    "DEFECT_KINDS", "IMAGE_EXTENSIONS", "Dataset", "DatasetError", "ImageDecodeError", "ImageHeader", "ModelInput",
    "Sample",
    "add_defect", "check_dataset", "decode_image", "image_mode", "load_dataset", "make_synthetic_dataset",
    "normalize_batch", "prepare_input", "preprocess", "read_image", "read_mask", "render_texture", "resize_for_model",
    "scan_dataset", "sniff_image", "split_holdout", "to_bgr_uint8",
]
