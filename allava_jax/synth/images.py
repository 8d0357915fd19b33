"""Images mode: SynthVLM's caption -> image step through any OpenAI-compatible Images API.

One request per caption asks for ``n`` images (``client.images.generate``), answered as base64
(``b64_json``) or as URLs that are fetched right away (with the key only when they are on the API's
own host: a provider's signed storage URLs must not receive it). An answer is usable when it holds
``n`` images that PIL decodes; anything less is an unusable output (one attempt used, as in the chat
modes), since the images were paid for. The images are written as received to
``images/<safe id>_<k>.<ext>`` (temporary name, fsync, rename, directory fsync) before the ``done``
entry that points at them, so a crash never leaves a done caption without its files. Cost is per
image delivered; the Batch API route is for the chat modes only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import httpx
import openai
from PIL import Image

from allava_jax import storage
from allava_jax.data.images import check_complete
from allava_jax.files import atomic_write, remove_partial_writes

from . import prompts as P
from .config import SynthConfig
from .items import Item
from .journal import Journal
from .redact import contains_secret
from .work import ITEM_HEADER, Request, Work

log = logging.getLogger(__name__)
IMAGES_MODE = "images"
IMAGES_DIR = "images"
RESPONSE_FORMATS = ("b64_json", "url")
MAX_IMAGE_BYTES = 64 << 20  # a fetched image larger than this is refused, not buffered
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
_SIZE = re.compile(r"\d+x\d+|auto")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Unusable(Exception):
    """An answer that cannot be used; ``raw`` is a short excerpt of it for the failures file."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.raw = raw


def check_images_config(cfg: SynthConfig) -> None:
    """Refuse settings images mode cannot honour, before anything is written or requested."""
    if cfg.batch:
        raise ValueError("--batch: the Batch API route serves the chat modes only; run images mode without --batch")
    if cfg.n < 1:
        raise ValueError(f"--n {cfg.n}: ask for at least one image per caption")
    if not _SIZE.fullmatch(cfg.size):
        raise ValueError(f"--size {cfg.size!r}: expected WIDTHxHEIGHT (e.g. 1024x1024) or auto")
    if cfg.response_format not in RESPONSE_FORMATS:
        raise ValueError(f"--response-format {cfg.response_format!r}: expected one of {RESPONSE_FORMATS}")


def safe_id(item_id: str) -> str:
    """A file-name stem for ``item_id``: the id itself when safe, else a cleaned prefix plus a hash
    of the id (so distinct ids never share files)."""
    safe = _UNSAFE.sub("_", item_id)[:100].lstrip(".")
    if safe != item_id or not safe:
        safe = f"{safe}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:10]}"
    return safe


def decode_b64(text: str, k: int) -> bytes:
    """Image ``k``'s bytes from its base64 (a ``data:`` URL prefix and line breaks are tolerated)."""
    body = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Unusable(f"image {k}: not valid base64", raw=text[:200]) from None


def image_extension(data: bytes, k: int) -> str:
    """The file extension of image ``k``, after checking that PIL decodes it fully.

    ``data.images.check_complete`` catches truncated files even where another library has set
    PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` (lmms-eval and tensorflow-datasets do),
    under which ``load`` pads a truncated image silently."""
    try:
        check_complete(data)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or "PNG"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBombError...)
        raise Unusable(f"image {k}: not an image PIL can open ({type(e).__name__})", raw=repr(data[:200])) from None
    if contains_secret(data):
        raise Unusable(f"image {k}: its bytes hold the API key (the server echoed it); not written")
    return EXTENSIONS.get(fmt, fmt.lower())


def _fsync_dir(path: Path) -> None:
    if storage.is_remote(path):  # each image is one object upload, durable when it returns
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


class ImageWork(Work):
    """Caption -> ``n`` image files; usable when every image decodes; priced per image."""

    def __init__(self, cfg: SynthConfig, prompts: P.Prompts, journal: Journal, price: float | None):
        super().__init__(cfg, journal)
        self.prompts, self.price = prompts, price
        self.dir = storage.as_path(cfg.out) / IMAGES_DIR
        self._http: httpx.AsyncClient | None = None
        # A run killed while writing an image leaves its temporary file; the journal's lock makes
        # this run the directory's only writer, so every one there now is such a leftover.
        if removed := remove_partial_writes(self.dir):
            log.info("removed %d partly written image files of an interrupted run", removed)

    # ---- requests -------------------------------------------------------------------------------
    def prepare(self, item: Item) -> Request:
        cfg = self.cfg
        body = {"model": cfg.model, "prompt": item.instruction, "n": cfg.n, "size": cfg.size}
        # gpt-image models always answer in base64 and reject the parameter itself.
        if not (cfg.model.startswith("gpt-image") and cfg.response_format == "b64_json"):
            body["response_format"] = cfg.response_format
        return Request(body)

    def request_cost(self, req: Request) -> float:
        return req.body["n"] * (self.price or 0.0)

    async def call(self, client: openai.AsyncOpenAI, item: Item, req: Request) -> Any:
        return await client.images.generate(**req.body, extra_headers={ITEM_HEADER: item.id})

    def dry_run(self, todo: list[Item], finished: int) -> dict:
        images = len(todo) * self.cfg.n
        return {"requests": len(todo), "images": images, "finished": finished, "price_image": self.price,
                "est_cost": images * self.price if self.price is not None else None}

    # ---- responses ------------------------------------------------------------------------------
    async def receive(self, client: openai.AsyncOpenAI, item: Item, resp: Any) -> tuple[str | None, str | None]:
        data = list(resp.data or [])
        usage = resp.usage.model_dump() if getattr(resp, "usage", None) else None
        base = {"id": item.id, "usage": usage, "cost": len(data) * (self.price or 0.0), "n_images": len(data)}
        try:
            if len(data) < self.cfg.n:
                raise Unusable(f"expected {self.cfg.n} images, got {len(data)}")
            payloads = await asyncio.gather(*(self._payload(client, d, k) for k, d in enumerate(data[: self.cfg.n])))
            paths = await asyncio.to_thread(self._save, item, payloads)
        except Unusable as e:
            self.journal.append({"k": "bad", **base, "reason": str(e), "raw": e.raw})
            log.info("item %s: unusable images (%s)", item.id, e)
            return str(e), e.raw
        caption_instruction = P.caption_instruction(self.prompts, self.cfg.seed, item.id)
        self.finish({"k": "done", **base, "result": {"images": paths, "caption": item.instruction,
                                                     "caption_instruction": caption_instruction}})
        return None, None

    async def _payload(self, client: openai.AsyncOpenAI, datum: Any, k: int) -> str | bytes:
        """Image ``k`` as its base64 text or, for a URL answer, the fetched bytes."""
        if datum.b64_json:
            return datum.b64_json
        if datum.url:
            return datum.url if datum.url.startswith("data:") else await self._fetch(client, datum.url, k)
        raise Unusable(f"image {k}: the answer holds neither b64_json nor url")

    async def _fetch(self, client: openai.AsyncOpenAI, url: str, k: int) -> bytes:
        """GET an answer's URL (relative ones against the API's base URL), at most MAX_IMAGE_BYTES."""
        base = httpx.URL(str(client.base_url))
        target = base.join(url)
        headers = {"Authorization": f"Bearer {client.api_key}"} if _same_origin(target, base) else {}
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.cfg.timeout, follow_redirects=True,
                                           transport=httpx.AsyncHTTPTransport(retries=2))
        chunks, size = [], 0
        try:
            async with self._http.stream("GET", target, headers=headers) as r:
                if r.status_code >= 400:
                    raise Unusable(f"image {k}: its url answered HTTP {r.status_code}", raw=str(target))
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_IMAGE_BYTES:
                        raise Unusable(f"image {k}: larger than {MAX_IMAGE_BYTES} bytes", raw=str(target))
                    chunks.append(chunk)
        except httpx.HTTPError as e:
            raise Unusable(f"image {k}: fetching its url failed ({type(e).__name__})", raw=str(target)) from None
        return b"".join(chunks)

    def _save(self, item: Item, payloads: list[str | bytes]) -> list[str]:
        """Check every image, then write them all (durably); returns their paths relative to --out."""
        blobs = [decode_b64(p, k) if isinstance(p, str) else p for k, p in enumerate(payloads)]
        stem = safe_id(item.id)
        names = [f"{stem}_{k}.{image_extension(b, k)}" for k, b in enumerate(blobs)]
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, blob in zip(names, blobs):
            atomic_write(self.dir / name, blob)
        _fsync_dir(self.dir)
        return [f"{IMAGES_DIR}/{name}" for name in names]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
