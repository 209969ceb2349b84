"""Image and frame conversions around the video codecs.

* ``preprocess_image``: conditioning-image preparation, PIPELINE.md §7 steps 1-3
  (EXIF transpose + RGB, centre crop to the target aspect ratio, Pillow LANCZOS resize).
* ``image_to_tensor``: uint8 HWC -> float32 ``[1, 3, 1, H, W]`` in [-1, 1] (§7 step 4).
* ``frames_to_uint8``: decoder output in ~[-1, 1] -> uint8 ``[F, H, W, 3]`` with truncation
  (PIPELINE.md §15.1).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = ["center_crop_box", "frames_to_uint8", "image_to_tensor", "preprocess_image"]


def center_crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Centre-crop box that gives the target aspect ratio, PIPELINE.md §7 step 2.

    If ``src_h / src_w > height / width`` the full width is kept and ``new_h = int(src_w * height / width)``;
    otherwise the full height is kept and ``new_w = int(src_h * width / height)``. The box
    ``((w - new_w)/2, (h - new_h)/2, (w + new_w)/2, (h + new_h)/2)`` is rounded per coordinate with
    Python ``round`` (half to even), as Pillow's ``Image.crop`` does.

    Returns:
        ``(left, upper, right, lower)`` in pixels.
    """
    w, h = src_width, src_height
    if h / w > height / width:
        new_w, new_h = w, int(w * height / width)
    else:
        new_w, new_h = int(h * width / height), h
    return (
        round((w - new_w) / 2),
        round((h - new_h) / 2),
        round((w + new_w) / 2),
        round((h + new_h) / 2),
    )


def preprocess_image(image: np.ndarray | Image.Image, width: int, height: int) -> np.ndarray:
    """Prepare a conditioning image at the stage resolution (PIPELINE.md §7 steps 1-3).

    Args:
        image: ``uint8 [H, W, 3]`` RGB array, or a PIL image (EXIF orientation applied, then
            converted to RGB, like diffusers ``load_image``).
        width: target width in pixels (> 0).
        height: target height in pixels (> 0).

    Returns:
        ``uint8 [height, width, 3]``: centre-cropped to the target aspect ratio (skipped when the
        source is already ``width x height``) and resized with Pillow LANCZOS.

    Raises:
        ValueError: ``width``/``height`` not positive, or an array that is not ``uint8 [H, W, 3]``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be > 0, got width={width}, height={height}")
    if isinstance(image, Image.Image):
        pil = ImageOps.exif_transpose(image).convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
        pil = Image.fromarray(arr)
    if pil.size != (width, height):
        pil = pil.crop(center_crop_box(pil.width, pil.height, width, height))
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.uint8).copy()


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 RGB image -> ``float32 [1, 3, 1, H, W]`` in [-1, 1] (PIPELINE.md §7 step 4: ``x/255*2 - 1``).

    Raises:
        ValueError: ``img`` is not ``uint8 [H, W, 3]``.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"img must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    x = x * 2.0 - 1.0
    return x.permute(2, 0, 1)[None, :, None].contiguous()


def frames_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded video -> uint8 frames (PIPELINE.md §15.1).

    ``p = clamp(0.5 * x + 0.5, 0, 1)``, then ``uint8(p * 255)`` with **truncation** (not rounding),
    computed in float32.

    Args:
        x: ``[1, 3, F, H, W]`` any float dtype, approximately in [-1, 1].

    Returns:
        ``uint8 [F, H, W, 3]``.

    Raises:
        ValueError: ``x`` is not ``[1, 3, F, H, W]``.
    """
    if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"x must be [1, 3, F, H, W], got {list(x.shape)}")
    p = (x[0].float() * 0.5 + 0.5).clamp(0.0, 1.0)
    return (p * 255.0).to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()
