"""`picovlm serve`: a small web demo and JSON API, on the standard library's HTTP server.

    GET  /          the page: drop or pick an image, choose a decoding strategy, see the caption
                    and each word's attention map
    GET  /health    {"status": "ok", "model": ..., "params_unique": ..., "generation": the decoding
                    a request without a strategy gets (the checkpoint's own, else beam-3)}
    POST /caption   body: the image bytes (Content-Type image/*); query: strategy, beam_width,
                    mirror (1: decode from the image and its mirror), center_crop (0.8: and the
                    middle 80 % of each, enlarged), mbr_neighbours (30: the beam that best fits
                    the 30 nearest training images' captions; needs the checkpoint's index), ...; no strategy: the
                    checkpoint's own decoding, as for `picovlm caption`
                    -> {"caption": ..., "strategy": ..., "seconds": ...}
    POST /explain   the same -> {"caption": ..., "words": [{"word", "heatmap" (PNG data URL),
                    "grid" (attention per visual token), "mass"}], ...}

Uploads are checked before decoding: a size limit (413), an image content type (415), and an
image that decodes (400). Requests are served on threads, one model call at a time.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from PIL import Image

from picovlm.data.images import decode_image
from picovlm.errors import UserError
from picovlm.explain import explain, upsample
from picovlm.generate import STRATEGIES, GenerationConfig, resolve_generation
from picovlm.models.supravl import SupraVL

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
_NUMERIC = {"beam_width": int, "top_k": int, "max_new_tokens": int, "seed": int,
            "top_p": float, "temperature": float, "length_penalty": float, "center_crop": float,
            "mbr_temperature": float, "mbr_neighbours": int}
_SWITCHES = {"mirror": {"1": True, "true": True, "0": False, "false": False}}


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def heatmap_png(image: Image.Image, grid: torch.Tensor) -> str:
    """The image with a jet-coloured attention map over it, as a PNG data URL."""
    from matplotlib import colormaps

    heat = upsample(grid, *image.size).numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
    colour = (colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    blended = 0.5 * np.asarray(image, dtype=np.float32) + 0.5 * colour
    buf = io.BytesIO()
    Image.fromarray(blended.astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class CaptionService:
    """The model behind the API; one inference at a time (explain toggles module state)."""

    def __init__(self, model: SupraVL, name: str):
        self.model, self.name = model, name
        self.lock = threading.Lock()

    def options(self, query: dict[str, list[str]]) -> GenerationConfig:
        """The decoding a request asks for: its query's settings on the model's own (resolve_generation)."""
        strategy = query.get("strategy", [None])[0]
        if strategy is not None and strategy not in STRATEGIES:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        kwargs: dict[str, Any] = {}
        for key, values in query.items():
            if key == "strategy":
                continue
            if key in _SWITCHES:
                if values[0].lower() not in _SWITCHES[key]:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be 1 or 0, got {values[0]!r}")
                kwargs[key] = _SWITCHES[key][values[0].lower()]
                continue
            if key not in _NUMERIC:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown parameter {key!r}")
            try:
                kwargs[key] = _NUMERIC[key](values[0])
            except ValueError:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be a number, got {values[0]!r}") from None
        return resolve_generation(self.model, strategy, **kwargs)

    def caption(self, image: Image.Image, gen: GenerationConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self.lock:
            caption = self.model.caption([image], **dataclasses.asdict(gen))[0]
        return {"caption": caption, "strategy": gen.strategy, "seconds": round(time.perf_counter() - t0, 4)}

    def explain(self, image: Image.Image, gen: GenerationConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self.lock:
            expl = explain(self.model, image, **dataclasses.asdict(gen))
        words = [{"word": w, "grid": grid.tolist(), "mass": float(grid.sum()), "heatmap": heatmap_png(expl.image, grid)}
                 for w, grid in zip(expl.words, expl.mean_maps)]
        return {"caption": expl.caption, "strategy": gen.strategy, "words": words,
                "seconds": round(time.perf_counter() - t0, 4)}


def make_handler(service: CaptionService) -> type[BaseHTTPRequestHandler]:
    page = resources.files("picovlm").joinpath("static/index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "picovlm"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise here
            pass

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif path == "/health":
                counts = service.model.param_counts()
                self._json(HTTPStatus.OK, {"status": "ok", "model": service.name,
                                           "params_unique": counts["params_unique"],
                                           "generation": dataclasses.asdict(resolve_generation(service.model))})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}; try / or /health"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            try:
                if url.path not in ("/caption", "/explain"):
                    raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {url.path}; POST /caption or /explain")
                gen = service.options(parse_qs(url.query))
                image = self._read_image()
                run = service.caption if url.path == "/caption" else service.explain
                self._json(HTTPStatus.OK, run(image, gen))
            except ApiError as e:
                self._json(e.status, {"error": str(e)})
            except UserError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})

        def _read_image(self) -> Image.Image:
            length = self.headers.get("Content-Length")
            if length is None:
                raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the image as the request body, with Content-Length")
            size = int(length)
            if size > MAX_UPLOAD_BYTES:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"upload is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
            if size == 0:
                raise ApiError(HTTPStatus.BAD_REQUEST, "the request body is empty; send an image")
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if not (kind.startswith("image/") or kind == "application/octet-stream"):
                raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"Content-Type {kind or '(none)'} is not an image; send image/jpeg, image/png, ...")
            return decode_image(self.rfile.read(size), name="the uploaded image")

    return Handler


def make_server(model: SupraVL, name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(CaptionService(model, name)))
    server.daemon_threads = True
    return server


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    from picovlm.checkpoint import from_pretrained

    model = from_pretrained(model_dir)
    try:
        server = make_server(model, str(model_dir), host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    print(f"picovlm demo on http://{host}:{server.server_address[1]}/  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
