"""Decoding real files of every awkward kind, array normalisation and preprocessing."""
import pickle
import struct
import zlib

import cv2
import numpy as np
import pytest

from stfpm.data import (ImageDecodeError, decode_image, image_mode, normalize_batch, preprocess, read_image,
                        read_mask, resize_for_model, sniff_image, to_bgr_uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def hand_png(width: int, height: int, colour_type: int, pixels: bytes, plte: bytes = b"", depth: int = 8) -> bytes:
    """A PNG written byte by byte, for colour types cv2 cannot write (palette, gray+alpha)."""
    row = len(pixels) // height
    raw = b"".join(b"\x00" + pixels[r * row:(r + 1) * row] for r in range(height))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + (png_chunk(b"PLTE", plte) if plte else b"")
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def cmyk_jpeg() -> bytes:
    """An 8x8 flat 4-component (CMYK) baseline JPEG, which cv2 cannot write: one MCU of
    DC-only blocks with two-symbol Huffman tables. C = Y = K = 128, M = 128 + 200/8."""
    dqt = jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
    sof = jpeg_segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 4) + b"".join(bytes([i, 0x11, 0]) for i in range(1, 5)))
    dc = b"\x00" + bytes([0, 2] + [0] * 14) + b"\x00\x08"      # '00' -> category 0, '01' -> category 8
    ac = b"\x10" + bytes([0, 1] + [0] * 14) + b"\x00"          # '00' -> end of block
    sos = jpeg_segment(0xDA, b"\x04" + b"".join(bytes([i, 0]) for i in range(1, 5)) + b"\x00\x3f\x00")
    bits = "0000" + "01" + "11001000" + "00" + "0000" + "0000"
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + dqt + sof + jpeg_segment(0xC4, dc + ac) + sos + scan + b"\xff\xd9"


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


@pytest.fixture
def colour_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_colour_png_and_jpeg_round_trip(tmp_path, colour_image):
    (tmp_path / "a.png").write_bytes(encode(colour_image))
    assert np.array_equal(read_image(tmp_path / "a.png"), colour_image)
    decoded = decode_image(encode(colour_image, ".jpg"), "a.jpg")
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    for ext in (".bmp", ".tiff", ".webp"):
        assert decode_image(encode(colour_image, ext), ext).shape == (48, 64, 3), ext


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    (tmp_path / "g.png").write_bytes(encode(gray))
    image = read_image(tmp_path / "g.png")
    assert image.shape == (48, 64, 3) and all(np.array_equal(image[..., c], gray) for c in range(3))
    assert image_mode(tmp_path / "g.png") == "L 8-bit"


def test_rgba_is_composited_onto_black(tmp_path):
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., :3] = (200, 100, 50)
    bgra[..., 3] = [[255], [128], [0], [255]]
    (tmp_path / "rgba.png").write_bytes(encode(bgra))
    image = read_image(tmp_path / "rgba.png")
    assert image[0, 0].tolist() == [200, 100, 50]
    assert image[1, 0].tolist() == [100, 50, 25]
    assert image[2, 0].tolist() == [0, 0, 0]
    assert image_mode(tmp_path / "rgba.png") == "RGBA 8-bit"


def test_gray_alpha_png(tmp_path):
    pixels = bytes([200, 255, 200, 128, 200, 0, 100, 255])  # (gray, alpha) x 4
    (tmp_path / "la.png").write_bytes(hand_png(4, 1, 4, pixels))
    image = read_image(tmp_path / "la.png")
    assert image[0, :, 0].tolist() == [200, 100, 0, 100] and image.shape == (1, 4, 3)
    assert image_mode(tmp_path / "la.png") == "LA 8-bit"


def test_palette_png_is_expanded(tmp_path):
    plte = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])  # RGB red, green, blue
    (tmp_path / "p.png").write_bytes(hand_png(3, 2, 3, bytes([0, 1, 2, 2, 1, 0]), plte))
    image = read_image(tmp_path / "p.png")
    assert image[0].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 0]]  # BGR
    assert image_mode(tmp_path / "p.png") == "P 8-bit"


def test_16_bit_is_shifted_to_8_bit(tmp_path):
    gray16 = np.full((8, 8), 0xABCD, np.uint16)
    (tmp_path / "g16.png").write_bytes(encode(gray16))
    assert (read_image(tmp_path / "g16.png") == 0xAB).all()
    assert image_mode(tmp_path / "g16.png") == "L 16-bit"
    colour16 = np.zeros((8, 8, 3), np.uint16) + np.array([0x1234, 0x5678, 0xFFFF], np.uint16)
    assert decode_image(encode(colour16), "c16")[0, 0].tolist() == [0x12, 0x56, 0xFF]


def test_cmyk_jpeg_is_converted_to_bgr():
    data = cmyk_jpeg()
    assert image_mode(data) == "CMYK 8-bit"
    image = decode_image(data, "cmyk.jpg")
    assert image.shape == (8, 8, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) == 1
    blue, green, red = image[0, 0].tolist()
    assert abs(blue - red) <= 1 and green > blue + 5  # the magenta component reached the result


def test_float_tiff_is_rejected(colour_image):
    with pytest.raises(ImageDecodeError, match="f.tiff: unsupported pixel type float32"):
        decode_image(encode(colour_image.astype(np.float32) / 255, ".tiff"), "f.tiff")


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"just some text, not an image\n", "not a PNG, JPEG, BMP, TIFF or WebP image"),
])
def test_empty_and_text_files_name_file_and_reason(tmp_path, content, reason):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as info:
        read_image(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(info.value)
    assert image_mode(tmp_path / "bad.png") == "unknown"


@pytest.mark.parametrize("ext", [".png", ".jpg"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files_are_errors(tmp_path, colour_image, ext, keep):
    data = encode(colour_image, ext)
    (tmp_path / f"cut{ext}").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as info:
        read_image(tmp_path / f"cut{ext}")
    assert f"cut{ext}" in str(info.value)


def test_jpeg_missing_only_its_end_marker_is_an_error(colour_image):
    with pytest.raises(ImageDecodeError, match="no end-of-image marker"):
        decode_image(encode(colour_image, ".jpg")[:-2], "eoi.jpg")


def test_decompression_bombs_are_refused_from_the_header():
    """A valid PNG header claiming 10^10 pixels over a tiny IDAT, and a JPEG whose SOF was patched."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + png_chunk(b"IEND", b""))
    assert sniff_image(bomb).width == 100_000
    with pytest.raises(ImageDecodeError, match=r"bomb.png: 100000x100000 = 10,000,000,000 pixels is above"):
        decode_image(bomb, "bomb.png")
    jpeg = bytearray(encode(np.zeros((16, 16, 3), np.uint8), ".jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(ImageDecodeError, match="60000x60000"):
        decode_image(bytes(jpeg), "bomb.jpg")


def test_max_pixels_applies_to_every_format(colour_image):
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp"):
        with pytest.raises(ImageDecodeError, match="above max_pixels=1,000"):
            decode_image(encode(colour_image, ext), ext, max_pixels=1000)


def test_decode_error_survives_pickling():
    """Ray ships exceptions between processes by pickling them."""
    error = pickle.loads(pickle.dumps(ImageDecodeError("s3://b/x.png", "empty file (0 bytes)")))
    assert (error.source, error.reason, str(error)) == ("s3://b/x.png", "empty file (0 bytes)",
                                                        "s3://b/x.png: empty file (0 bytes)")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_to_bgr_uint8_normalises_user_arrays():
    gray = np.full((5, 6), 7, np.uint8)
    assert to_bgr_uint8(gray).shape == (5, 6, 3)
    assert to_bgr_uint8(gray[..., None]).shape == (5, 6, 3)
    bgra = np.dstack([np.full((5, 6, 3), 200, np.uint8), np.full((5, 6), 255, np.uint8)])
    assert (to_bgr_uint8(bgra) == 200).all()
    assert (to_bgr_uint8(np.full((5, 6, 3), 0x8000, np.uint16)) == 0x80).all()
    for bad in (np.zeros((5, 6, 3), np.float32), np.zeros((5, 6, 5), np.uint8), np.zeros(5, np.uint8),
                np.zeros((0, 6, 3), np.uint8), [[1, 2]]):
        with pytest.raises(ValueError, match="frame_17"):
            to_bgr_uint8(bad, "frame_17")


def test_read_mask_any_nonzero_is_defect_and_resizes_nearest(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1
    mask[6, 6] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    read = read_mask(tmp_path / "m.png")
    assert read.dtype == bool and np.array_equal(read, mask > 0)
    big = read_mask(tmp_path / "m.png", (16, 32))
    assert big.shape == (16, 32) and big.sum() == 4 * read.sum() * 2


def test_preprocess_layout_order_and_normalisation():
    blue = np.zeros((300, 200, 3), np.uint8)
    blue[..., 0] = 255                                   # BGR blue
    small_gray = np.full((10, 12), 128, np.uint8)
    batch = preprocess([blue, small_gray], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32 and batch.flags.c_contiguous
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert np.allclose(batch[0, :, 5, 5], (np.array([0, 0, 1]) - mean) / std, atol=1e-5)  # RGB order
    assert np.allclose(batch[1, :, 5, 5], (128 / 255 - mean) / std, atol=1e-5)
    assert preprocess([], 32).shape == (0, 3, 32, 32)


def test_preprocess_shrinks_with_area_interpolation():
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[::2] = 255                                   # alternate rows: area averaging gives grey
    value = preprocess([stripes], 64, mean=(0, 0, 0), std=(1, 1, 1))[0, 0]
    assert np.allclose(value, 127.5 / 255, atol=0.01)


def test_preprocess_is_resize_then_normalize():
    """The scorer runs the halves on different nodes; together they must equal preprocess."""
    images = [np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
              for i, shape in enumerate([(70, 90, 3), (20, 30), (64, 64, 4)])]
    halves = np.stack([resize_for_model(image, 64) for image in images])
    assert halves.dtype == np.uint8 and halves.shape == (3, 64, 64, 3)
    assert np.array_equal(halves[0], cv2.resize(images[0], (64, 64), interpolation=cv2.INTER_AREA)[..., ::-1])
    assert np.array_equal(normalize_batch(halves), preprocess(images, 64))


def test_large_jpegs_decode_at_reduced_scale_but_never_below_the_model_input():
    from stfpm.data.images import jpeg_reduction

    assert jpeg_reduction(900, 900, 256) == 2 and jpeg_reduction(511, 4000, 256) == 1
    assert jpeg_reduction(2048, 2048, 256) == 8 and jpeg_reduction(4096, 4096, 256) == 8
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8), (9, 9), 0)
    data = cv2.imencode(".jpg", big)[1].tobytes()
    assert decode_image(data, "big.jpg", min_side=128).shape == (150, 200, 3)  # 1/4 scale
    assert decode_image(data, "big.jpg").shape == (600, 800, 3)
