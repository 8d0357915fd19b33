"""Token accounting, cost from a configurable price table, and pre-request estimates.

Actual usage always comes from the responses; estimates exist only for ``--dry-run``, the
``--max-cost`` reservation of in-flight requests, and the tokens/min limiter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .items import Item, image_size, scaled_size

DEFAULT_PRICES = Path(__file__).parent / "prices.json"
# Typical completion lengths per mode, used only for estimates (override with --est-output-tokens).
EST_OUTPUT_TOKENS = {"laion": 900, "vflan": 600, "text": 700}


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens; ``batch_discount`` multiplies costs on the Batch API route."""

    input: float
    output: float
    batch_discount: float = 0.5

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        c = (prompt_tokens * self.input + completion_tokens * self.output) / 1e6
        return c * self.batch_discount if batch else c

    def usage_cost(self, usage: dict | None, batch: bool = False) -> float:
        """The cost of a response's ``usage`` dict (0 without one)."""
        if not usage:
            return 0.0
        return self.cost(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), batch)


def load_price(model: str, table: str | Path | None = None, price_in: float | None = None,
               price_out: float | None = None) -> Price | None:
    """Price for ``model``: explicit --price-in/--price-out, else the table's longest prefix match."""
    data = json.loads(Path(table or DEFAULT_PRICES).read_text())
    discount = float(data.get("batch_discount", 0.5))
    if price_in is not None or price_out is not None:
        return Price(price_in or 0.0, price_out or 0.0, discount)
    best = _longest_prefix(model, data.get("models", {}))
    return None if best is None else Price(float(best["input"]), float(best["output"]), discount)


def load_image_price(model: str, table: str | Path | None = None, price_image: float | None = None) -> float | None:
    """USD per generated image for ``model``: explicit --price-image, else the table's ``images``
    entry with the longest prefix match (as :func:`load_price`)."""
    if price_image is not None:
        return float(price_image)
    best = _longest_prefix(model, json.loads(Path(table or DEFAULT_PRICES).read_text()).get("images", {}))
    return None if best is None else float(best)


def _longest_prefix(model: str, table: dict):
    """The entry whose key is the longest prefix of ``model`` (dated snapshots share their base's price)."""
    matches = [k for k in table if not k.startswith("_") and model.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """OpenAI's published tile formula (85 + 170 per 512 px tile after fitting); 85 for low detail."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def text_tokens(text: str) -> int:
    """Rough count (4 characters per token) for estimates only."""
    return len(text) // 4 + 1


def estimate_prompt_tokens(system: str, user: str, item: Item, max_side: int, detail: str) -> int:
    """Estimated prompt tokens of one request, image included."""
    n = text_tokens(system) + text_tokens(user) + 12
    if item.image_path is not None:
        n += image_tokens(*scaled_size(image_size(item.image_path), max_side), detail)
    return n


@dataclass
class Totals:
    """Running usage of a run directory (all runs, all attempts), summed from responses."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0  # images delivered (images mode)
    cost: float = 0.0

    def add(self, usage: dict | None, cost: float, images: int = 0) -> None:
        self.requests += 1
        self.images += images
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.cost += cost


class Budget:
    """``--max-cost``: spent (from responses, ``spent()``) plus reserved (estimates of requests in
    flight); a request goes only if its estimate fits."""

    def __init__(self, max_cost: float | None, spent: Callable[[], float]):
        self.max_cost, self.spent, self.reserved = max_cost, spent, 0.0

    def reserve(self, est: float) -> bool:
        if self.max_cost is not None and self.spent() + self.reserved + est > self.max_cost:
            return False
        self.reserved += est
        return True

    def release(self, est: float) -> None:
        self.reserved -= est
