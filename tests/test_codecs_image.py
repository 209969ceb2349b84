"""Conditioning-image preprocessing and frame conversion (PIPELINE.md §7, §15.1).

Catches: wrong crop-box arithmetic (int truncation of the kept side, half-to-even rounding of the
box), a resize filter other than LANCZOS, a missing EXIF transpose, a wrong [-1, 1] mapping or
channel layout, and rounding instead of truncation in the uint8 conversion.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.codecs.image import center_crop_box, frames_to_uint8, image_to_tensor, preprocess_image
from tests.conftest import SHARED_DIR

MEDIA = SHARED_DIR / "media"


@pytest.mark.parametrize(
    ("src", "dst", "box"),
    [
        ((1280, 720), (224, 128), (10, 0, 1270, 720)),  # wider target: new_w = int(720*224/128) = 1260
        ((1280, 720), (128, 128), (280, 0, 1000, 720)),
        ((512, 512), (224, 128), (0, 110, 512, 402)),  # taller source: new_h = int(512*128/224) = 292
        ((101, 100), (100, 100), (0, 0, 100, 100)),  # 0.5 -> 0 and 100.5 -> 100 (half to even)
        ((103, 100), (100, 100), (2, 0, 102, 100)),  # 1.5 -> 2 and 101.5 -> 102
    ],
)
def test_center_crop_box(src, dst, box):
    assert center_crop_box(*src, *dst) == box


def test_preprocess_portrait_matches_pillow_crop_and_lanczos():
    img = Image.open(MEDIA / "portrait.png")
    assert img.size == (1280, 720)
    out = preprocess_image(img, 224, 128)
    assert out.shape == (128, 224, 3) and out.dtype == np.uint8
    ref = np.asarray(img.convert("RGB").crop((10, 0, 1270, 720)).resize((224, 128), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, ref)
    bilinear = np.asarray(
        img.convert("RGB").crop((10, 0, 1270, 720)).resize((224, 128), Image.Resampling.BILINEAR)
    )
    assert (out != bilinear).any()
    # Array input gives the same result as the PIL image.
    np.testing.assert_array_equal(preprocess_image(np.asarray(img.convert("RGB")), 224, 128), out)


def test_preprocess_astronaut_crops_rows():
    arr = np.asarray(Image.open(MEDIA / "astronaut.png").convert("RGB"))
    out = preprocess_image(arr, 224, 128)
    ref = np.asarray(Image.fromarray(arr[110:402]).resize((224, 128), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, ref)


def test_preprocess_skips_when_already_target_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(128, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_image(arr, 224, 128), arr)


def test_preprocess_applies_exif_orientation_and_rgb():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(32, 48, 4), dtype=np.uint8)  # RGBA, 48 wide, 32 high
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    loaded = Image.open(io.BytesIO(buf.getvalue()))
    out = preprocess_image(loaded, 32, 48)  # displayed size is 32 wide, 48 high: no crop, no resize
    np.testing.assert_array_equal(out, np.rot90(arr[..., :3], k=-1))


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_preprocess_rejects_bad_arrays(bad):
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(bad, 4, 4)


def test_preprocess_rejects_bad_size():
    with pytest.raises(ValueError, match="width"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), 0, 4)


def test_image_to_tensor_values_and_layout():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (0, 128, 255)
    arr[1, 2] = (10, 20, 30)
    x = image_to_tensor(arr)
    assert x.shape == (1, 3, 1, 2, 3) and x.dtype == torch.float32
    assert x[0, :, 0, 0, 0].tolist() == [-1.0, np.float32(128 / 255) * 2 - 1, 1.0]
    assert x[0, 2, 0, 1, 2].item() == pytest.approx(30 / 255 * 2 - 1, abs=1e-7)
    assert x.min() >= -1 and x.max() <= 1


def test_frames_to_uint8_truncates_and_clamps():
    vals = torch.tensor([-3.0, -1.0, 0.0, 0.998, 1.0, 2.0])
    x = vals.view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6).contiguous()
    out = frames_to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    # 0.0 -> 127.5 -> 127 (rounding would give 128); 0.998 -> 254.745 -> 254 (rounding: 255).
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_frames_to_uint8_layout():
    x = torch.zeros(1, 3, 2, 4, 5)
    x[0, 1, 1, 3, 4] = 1.0  # green, frame 1, row 3, col 4
    out = frames_to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert out[1, 3, 4].tolist() == [127, 255, 127]
    with pytest.raises(ValueError, match=r"\[1, 3, F, H, W\]"):
        frames_to_uint8(torch.zeros(3, 2, 4, 5))
