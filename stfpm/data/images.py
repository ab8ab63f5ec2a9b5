"""Image decoding and preprocessing with cv2 and numpy only.

Every consumer (training, prediction, the Ray Data scorer) goes through `decode_image`, so a
bad file always fails the same way: one `ImageDecodeError` naming the source and the reason.
Formats are recognised by their magic number, never by the file name, and only the formats
of `IMAGE_EXTENSIONS` are decoded: an unknown file is rejected before OpenCV tries its many
other decoders on it.

Normalisation to BGR uint8 (`to_bgr_uint8`, shared by files and user arrays):
- grayscale is replicated to three channels; palette PNGs are expanded by OpenCV;
- alpha is composited onto black (colour * alpha / 255), so what hides under fully
  transparent pixels, which differs from one exporting tool to another, cannot change a score;
- 16-bit samples are shifted right by 8 (no per-image stretching, so images stay comparable);
- float images are rejected: their value range (0-1? 0-255? HDR?) cannot be known;
- JPEGs are decoded with OpenCV's colour path, which applies the EXIF orientation and
  converts CMYK and grayscale to BGR, like `cv2.imread` does.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length, type and the CRC every IEND chunk has
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS, _JPEG_EOI = 0xDA, b"\xff\xd9"
_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class ImageDecodeError(ValueError):
    """Bytes, a file or an array that is not a usable image; names the source and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(source, reason)  # args rebuild the error when Ray unpickles it in another process
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class ImageTooLarge(ImageDecodeError):
    """An image above `max_pixels` (a decompression bomb, or a frame larger than allowed):
    a client's fault of its own kind (the scoring service answers 413, not 422)."""


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of a file say; fields the header does not hold are None."""
    format: str                 # "png" | "jpeg" | "bmp" | "tiff" | "webp"
    width: int | None = None
    height: int | None = None
    mode: str | None = None     # "L", "LA", "RGB", "RGBA", "P", "CMYK"
    bit_depth: int | None = None


def _jpeg_segments(data: bytes):
    """Yield (marker, payload offset) of each top-level JPEG segment up to the first scan.
    Walking by segment length skips EXIF thumbnails, which carry their own SOF, SOS and EOI."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        yield marker, pos + 4
        if marker == _JPEG_SOS:
            return
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]


def _jpeg_header(data: bytes) -> ImageHeader:
    for marker, at in _jpeg_segments(data):
        if marker in _JPEG_SOF and at + 6 <= len(data):
            depth, height, width, components = struct.unpack_from(">BHHB", data, at)
            return ImageHeader("jpeg", width, height, _JPEG_MODES.get(components), depth)
    return ImageHeader("jpeg")


def _tiff_header(data: bytes) -> ImageHeader:
    """Width and height from the first IFD (often at the end of the file)."""
    order = "<" if data[:2] == b"II" else ">"
    tags = {}
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for i in range(count):
            tag, kind, n, value = struct.unpack_from(order + "HHI4s", data, ifd + 2 + 12 * i)
            if n == 1 and kind in (3, 4):  # a single SHORT or LONG is stored inline
                tags[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    except struct.error:
        pass
    return ImageHeader("tiff", tags.get(256), tags.get(257), bit_depth=tags.get(258))


def _webp_header(data: bytes) -> ImageHeader:
    chunk = data[12:16]
    try:
        if chunk == b"VP8 ":
            width, height = struct.unpack_from("<HH", data, 26)
            return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF, "RGB", 8)
        if chunk == b"VP8L":
            (bits,) = struct.unpack_from("<I", data, 21)
            mode = "RGBA" if bits >> 28 & 1 else "RGB"
            return ImageHeader("webp", 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF), mode, 8)
        if chunk == b"VP8X":
            width = 1 + int.from_bytes(data[24:27], "little")
            height = 1 + int.from_bytes(data[27:30], "little")
            return ImageHeader("webp", width, height, "RGBA" if data[20] & 0x10 else "RGB", 8)
    except struct.error:
        pass
    return ImageHeader("webp")


def sniff_image(data: bytes) -> ImageHeader | None:
    """Format, size and mode from the header, without decoding; None for an unknown format.
    A prefix of the file is enough for everything but JPEG and TIFF dimensions."""
    if data.startswith(_PNG_MAGIC):
        if len(data) < 26 or data[12:16] != b"IHDR":
            return ImageHeader("png")
        width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
        return ImageHeader("png", width, height, _PNG_MODES.get(colour), depth)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_header(data)
    if data.startswith(b"BM") and len(data) >= 30:
        width, height, _, bits = struct.unpack_from("<iiHH", data, 18)
        mode = "P" if bits <= 8 else "RGBA" if bits == 32 else "RGB"
        return ImageHeader("bmp", width, abs(height), mode, 8)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_header(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    return None


def frames_note(data: bytes) -> str | None:
    """A note for an image of several frames (a multi-page TIFF, an animated PNG or WebP), of
    which every decoder here reads the first only; None for a single frame. From the
    container's own fields, without decoding."""
    if data.startswith(_PNG_MAGIC):
        actl, idat = data.find(b"acTL"), data.find(b"IDAT")
        if actl != -1 and (idat == -1 or actl < idat) and len(data) >= actl + 8:
            frames = int.from_bytes(data[actl + 4:actl + 8], "big")
            if frames > 1:
                return f"frames: an animated PNG of {frames} frames; only the first was scored"
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        order = "<" if data[:2] == b"II" else ">"
        try:
            (ifd,) = struct.unpack_from(f"{order}I", data, 4)
            (entries,) = struct.unpack_from(f"{order}H", data, ifd)
            (following,) = struct.unpack_from(f"{order}I", data, ifd + 2 + 12 * entries)
        except struct.error:
            return None
        if following:
            return "frames: a multi-page TIFF; only the first page was scored"
    elif data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and len(data) > 20 and data[20] & 0x02:
        return "frames: an animated WebP; only the first frame was scored"
    return None


def _truncation(data: bytes, header: ImageHeader) -> str | None:
    """Why a PNG or JPEG is cut short, or None. Older OpenCV builds return the decoded top
    of a truncated JPEG (grey below) instead of failing, so the end marker is checked here."""
    if header.format == "png" and _PNG_IEND not in data:
        return "truncated or corrupt PNG (no IEND chunk)"
    if header.format == "jpeg":
        scan = next((at for marker, at in _jpeg_segments(data) if marker == _JPEG_SOS), None)
        if scan is None:
            return "truncated or corrupt JPEG (no image scan)"
        if data.rfind(_JPEG_EOI) < scan:
            return "truncated or corrupt JPEG (no end-of-image marker)"
    return None


def to_bgr_uint8(image: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Normalise a decoded or user-given array to contiguous BGR uint8 (H, W, 3): gray 2-D or
    (H, W, 1) is replicated, gray+alpha and BGRA are composited onto black, uint16 is >> 8.
    Anything else raises ImageDecodeError (a ValueError) naming the source."""
    if not isinstance(image, np.ndarray):
        raise ImageDecodeError(source, f"expected a numpy array, got {type(image).__name__}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(source, f"unsupported pixel type {image.dtype} (use uint8 or uint16; "
                                       "scale float images to 0-255 and convert them to uint8 first)")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2] if image.ndim == 3 else 0
    if channels not in (1, 2, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageDecodeError(source, f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                                       f"got shape {image.shape}")
    if channels in (2, 4):
        colour, alpha = image[:, :, :-1].astype(np.uint16), image[:, :, -1:].astype(np.uint16)
        image = ((colour * alpha + 127) // 255).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def jpeg_reduction(width: int, height: int, min_side: int) -> int:
    """The largest of 1, 2, 4 and 8 that keeps both sides at least `min_side` after division."""
    factor = 1
    while factor < 8 and min(width, height) >= 2 * factor * min_side:
        factor *= 2
    return factor


_JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = 100_000_000,
                 min_side: int | None = None) -> np.ndarray:
    """Bytes -> BGR uint8 (H, W, 3) (see the module docstring for the normalisation).
    PNG and JPEG sizes (and BMP, WebP, TIFF where the header has them) are checked against
    `max_pixels` before decoding, so a decompression bomb never allocates its pixels.
    `min_side` (a model's input size): a JPEG at least twice that on both sides is decoded
    at 1/2, 1/4 or 1/8 scale in the DCT domain (OpenCV's IMREAD_REDUCED_COLOR_*), keeping
    both sides >= min_side for the resize that follows: a 900-px JPEG for a 256 input
    decodes and resizes 1.75x faster at 1/2 scale, more at 1/4 and 1/8."""
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    header = sniff_image(data)
    if header is None:
        raise ImageDecodeError(source, "not a PNG, JPEG, BMP, TIFF or WebP image (no known signature)")
    if header.format in ("png", "jpeg") and header.width is None:
        raise ImageDecodeError(source, f"truncated or corrupt {header.format.upper()} (no image size in header)")
    if header.width is not None and header.height is not None:
        _check_pixels(header.width, header.height, max_pixels, source)
    reason = _truncation(data, header)
    if reason:
        raise ImageDecodeError(source, reason)
    flags = cv2.IMREAD_COLOR if header.format == "jpeg" else cv2.IMREAD_UNCHANGED
    if header.format == "jpeg" and min_side:
        flags = _JPEG_REDUCED.get(jpeg_reduction(header.width, header.height, min_side), flags)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageDecodeError(source, f"OpenCV cannot decode it ({str(e).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageDecodeError(source, f"corrupt or truncated {header.format.upper()} (OpenCV cannot decode it)")
    _check_pixels(image.shape[1], image.shape[0], max_pixels, source)
    return to_bgr_uint8(image, source)


def _check_pixels(width: int, height: int, max_pixels: int, source: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(source, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(source, f"{width}x{height} = {width * height:,} pixels is above "
                            f"max_pixels={max_pixels:,}")


def read_image(path: str | Path) -> np.ndarray:
    """Local file -> BGR uint8; FileNotFoundError naming the path, ImageDecodeError otherwise."""
    return decode_image(Path(path).read_bytes(), str(path))


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask file -> bool (H, W); any nonzero pixel is defect. `shape` (h, w) resizes with
    nearest neighbour so no new labels appear at the edges."""
    mask = read_image(path).any(axis=2)
    if shape is not None and mask.shape != tuple(shape):
        mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return mask


def resize_for_model(image: np.ndarray, size: int) -> np.ndarray:
    """Any image `to_bgr_uint8` accepts -> RGB uint8 (size, size, 3): the CPU half of
    preprocessing, a quarter of the float32 bytes to ship to a GPU worker. INTER_AREA when
    both sides shrink (anti-aliased), INTER_LINEAR otherwise."""
    image = to_bgr_uint8(image)
    shrink = image.shape[0] >= size and image.shape[1] >= size
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(resized[..., ::-1])


@dataclass
class ModelInput:
    """One image prepared for a model: what the network sees and the size to answer at."""
    pixels: np.ndarray           # RGB uint8 (S, S, 3), `resize_for_model` of the decoded image;
                                 # a tiled model's (K, S, S, 3) tiles (stfpm.data.tiling)
    height: int                  # the image's full-resolution size (EXIF orientation applied):
    width: int                   # maps and masks are returned at this size
    image: np.ndarray | None = None  # the decoded BGR image, when asked for (overlays); a large
                                     # JPEG's is at the reduced scale it was decoded at

    @property
    def tiles(self) -> np.ndarray:
        """(K, S, S, 3): the tiles, or the one whole image of an untiled model."""
        return self.pixels if self.pixels.ndim == 4 else self.pixels[None]


def prepare_input(source: bytes | np.ndarray, size: int, name: str = "<image>", max_pixels: int = 100_000_000,
                  keep_image: bool = False, tiling=None) -> ModelInput:
    """THE decode policy, for every path that feeds a network (training, its threshold
    calibration, predict, evaluate, Ray Train, Ray Data scoring), so a file gets the same
    score whichever way it comes in. Bytes are decoded with `decode_image(min_side=size)`: a
    JPEG at least twice the input on both sides is decoded at 1/2, 1/4 or 1/8 scale (1.5-7x
    faster, bench/RESULTS.md); arrays (already decoded) go through `to_bgr_uint8`. With a
    `tiling` (stfpm.data.tiling.Tiling) the image is decoded at full resolution, which its
    tiles are cut from, and `pixels` holds the tiles."""
    if isinstance(source, np.ndarray):
        image = to_bgr_uint8(source, name)
        height, width = image.shape[:2]
    else:
        image = decode_image(source, name, max_pixels, min_side=None if tiling else size)
        height, width = full_size(source, image)
    if tiling is None:
        pixels = resize_for_model(image, size)
    else:
        pixels = np.ascontiguousarray(tiling.cut(image, size)[..., ::-1])
    return ModelInput(pixels, height, width, image if keep_image else None)


def full_size(data: bytes, image: np.ndarray) -> tuple[int, int]:
    """(h, w) of the full-resolution image `data` decoded to `image`: a JPEG decoded at reduced
    scale is smaller than its header says, and possibly turned by its EXIF orientation."""
    h, w = image.shape[:2]
    header = sniff_image(data)
    if header.format != "jpeg" or {h, w} == {header.width, header.height}:
        return h, w
    turned = abs(h * header.width - w * header.height) > abs(h * header.height - w * header.width)
    return (header.width, header.height) if turned else (header.height, header.width)


def normalize_batch(batch: np.ndarray, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """RGB uint8 (N, S, S, 3) -> float32 (N, 3, S, S): /255 then (x - mean) / std."""
    rgb = batch.astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def preprocess(images: list[np.ndarray], size: int, mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """BGR uint8 images of any sizes -> float32 (N, 3, size, size) in RGB order, normalised:
    `resize_for_model` on each image, then `normalize_batch`."""
    batch = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        batch[i] = resize_for_model(image, size)
    return normalize_batch(batch, mean, std)


def image_mode(data_or_path: bytes | str | Path) -> str:
    """Cheap description for dataset checks, e.g. "RGB 8-bit", "L 16-bit", "P 8-bit",
    "CMYK 8-bit": from the header when it says, else from a raw decode; "unknown" for a file
    that is not a readable image. Raises only OSError for a path that cannot be read."""
    data = data_or_path if isinstance(data_or_path, bytes) else Path(data_or_path).read_bytes()
    header = sniff_image(data)
    if header is None:
        return "unknown"
    if header.mode and header.bit_depth:
        return f"{header.mode} {header.bit_depth}-bit"
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None:
        return "unknown"
    channels = 1 if image.ndim == 2 else image.shape[2]
    kind = " float" if image.dtype.kind == "f" else ""
    return f"{_ARRAY_MODES.get(channels, f'{channels}-channel')} {image.dtype.itemsize * 8}-bit{kind}"
