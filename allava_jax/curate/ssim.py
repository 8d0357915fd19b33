"""SynthVLM's detail-loss score: SSIM of an image with itself after a trip through LLaVA's size.

The paper (arXiv 2407.20756) ranks pairs by CLIPScore + 0.5 x SSIM, where SSIM compares the
grayscale image at 768 px with the same image resized 768 -> 336 -> 768: detail that a 336 px
vision tower cannot see lowers it. Its repository ships no SSIM code, so the resampling filter
(bicubic) and the square 768 x 768 resize are our reading of the paper; SSIM itself is
scikit-image's (Wang et al. 2004, 7 x 7 window, data range 255).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

FULL = 768
LOW = 336


def round_trip_ssim(img: Image.Image, full: int = FULL, low: int = LOW) -> float:
    """SSIM between grayscale ``img`` at ``full`` px and its ``full -> low -> full`` round trip."""
    gray = img.convert("L").resize((full, full), Image.Resampling.BICUBIC)
    trip = gray.resize((low, low), Image.Resampling.BICUBIC).resize((full, full), Image.Resampling.BICUBIC)
    return float(structural_similarity(np.asarray(gray), np.asarray(trip), data_range=255))
