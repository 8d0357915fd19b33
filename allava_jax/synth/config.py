"""Run settings (what the CLI parses) in one dataclass the runners share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class SynthConfig:
    """Everything one ``python -m allava_jax.synth`` invocation decides."""

    mode: str  # laion | vflan | text | images
    out: Path
    model: str
    base_url: str | None = None
    # request shape
    max_tokens: int = 2048
    temperature: float = 0.7
    max_side: int = 1024
    jpeg_quality: int = 90
    detail: str = "auto"
    prompts_dir: Path | None = None
    seed: int = 0
    # images mode (Images API)
    n: int = 5  # images per caption
    size: str = "1024x1024"
    response_format: str = "b64_json"  # or "url" (fetched after the answer)
    # robustness and throughput
    concurrency: int = 16
    rpm: float = 0.0
    tpm: float = 0.0
    timeout: float = 120.0
    max_retries: int = 5  # SDK retries per request (429/5xx/timeouts)
    max_attempts: int = 3  # requests per item when the output is malformed
    retry_failed: bool = False
    limit: int | None = None
    # cost
    prices: Path | None = None
    price_in: float | None = None
    price_out: float | None = None
    price_image: float | None = None  # USD per generated image (images mode)
    max_cost: float | None = None
    est_output_tokens: int | None = None
    dry_run: bool = False
    # batch API
    batch: bool = False
    batch_size: int = 1000
    batch_max_bytes: int = 190_000_000
    poll_interval: float = 30.0
    # output
    progress: bool = True
    journal_flush_s: float = 5.0  # --out on object storage: seconds between journal uploads
