"""Remote rewards over HTTP + JSON: the protocol, its media codec and the client reward (no pickle anywhere).

Run a reward in its own process or machine (its dependencies never meet the trainer's); the server, its limits and
its flags live in ``lance_rl.rewards.server``::

    lance-rl serve-reward --reward ocr --port 18090 --token $TOKEN
    # recipe:  rewards: {remote: {kwargs: {url: "http://127.0.0.1:18090", token: ...}, weight: 1.0}}

Protocol ``lance-rl-reward/1`` (any server speaking it works with ``RemoteReward``):

- ``POST /score`` with header ``Authorization: Bearer <token>`` (when the server has a token), a ``Content-Length``
  and a UTF-8 JSON body ``{"prompts": [str], "images": [png] | null, "videos": [video] | null,
  "conditions": [null | png | video] | null, "metadata": [object] | null, "completions": [str] | null,
  "answers": [null | str | [str]] | null}`` where every list has one entry per prompt (a text reward gets
  ``completions`` instead of images or videos, and ``conditions`` holds the media the question was about),
  ``png`` is a base64 PNG string and ``video`` is ``{"mp4": base64, "frames": T, "height": H, "width": W}`` (H.264,
  lossy; T frames, cropped to H x W after decoding) or ``{"png_frames": [png, ...]}`` (lossless). Answer 200
  ``{"scores": [number | null | "nan" | "inf" | "-inf"], "details": {key: [value]}}``, or an error status with
  ``{"error": message}``: 400 a malformed request or batch, 401 a bad token, 404/405 a wrong path or method, 408 a body
  that stalled, 411 no Content-Length, 413 over one of the server's limits, 431 headers too large, 500 the reward
  raised, 503 busy (with ``Retry-After``).
- ``GET /info`` -> ``{"protocol", "name", "modalities"}``; ``GET /health`` -> ``{"ok": true}`` (no token needed).

The client retries connection errors, timeouts, 429 and 5xx with exponential backoff and raises
``RemoteRewardError`` (a ``RewardError``) after the last attempt; other 4xx answers fail at once.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import os
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from .base import Reward, RewardError, RewardOutput

PROTOCOL = "lance-rl-reward/1"
TOKEN_ENV = "LANCE_RL_REWARD_TOKEN"
BATCH_FIELDS = ("prompts", "images", "videos", "conditions", "metadata", "completions", "answers")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RemoteRewardError(RewardError):
    """The remote reward could not be scored (after retries where the error is retriable)."""


class LimitExceeded(ValueError):
    """A batch asks for more than the decoding limits allow (the server answers 413)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one batch may decode to; None is unlimited. Checked from declared sizes (the PNG header, the MP4 stream)
    before any pixel is decoded, so a small file that inflates to gigabytes is refused while it is still small."""

    max_batch: int | None = None  # samples (prompts) per batch
    max_image_pixels: int | None = None  # per image, video frame or condition frame
    max_frames: int | None = None  # per video
    max_request_pixels: int | None = None  # every image, frame and condition of the batch together


# ------------------------------------------------------------------------------------------------ media -> JSON
def encode_png(image: np.ndarray) -> str:
    from lance_rl.model.media import write_png

    buf = io.BytesIO()
    write_png(image, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_video(frames: np.ndarray, video_format: str = "mp4") -> dict:
    if video_format == "png":
        return {"png_frames": [encode_png(f) for f in frames]}
    if video_format != "mp4":
        raise ValueError(f"video_format must be 'mp4' or 'png', got {video_format!r}")
    from lance_rl.model.media import write_mp4

    with tempfile.TemporaryDirectory() as tmp:  # PyAV's mp4 muxer wants a seekable file
        path = os.path.join(tmp, "v.mp4")
        write_mp4(frames, path, fps=12)
        with open(path, "rb") as f:
            data = f.read()
    t, h, w = frames.shape[:3]
    return {"mp4": base64.b64encode(data).decode("ascii"), "frames": t, "height": h, "width": w}


def _encode_condition(c, video_format):
    if c is None:
        return None
    c = np.asarray(c)
    return encode_png(c) if c.ndim == 3 else encode_video(c, video_format)


def encode_batch(prompts, images=None, videos=None, conditions=None, metadata=None, video_format="mp4",
                 completions=None, answers=None) -> dict:
    body = {
        "prompts": list(prompts),
        "images": None if images is None else [encode_png(np.asarray(im)) for im in images],
        "videos": None if videos is None else [encode_video(np.asarray(v), video_format) for v in videos],
        "conditions": None if conditions is None else [_encode_condition(c, video_format) for c in conditions],
        "metadata": metadata,
    }
    if completions is not None:  # a text batch; image and video batches keep the original five fields
        body |= {"completions": list(completions), "answers": None if answers is None else list(answers)}
    return body


# ------------------------------------------------------------------------------------------------ JSON -> media
class _BatchDecoder:
    """Decodes one batch under ``DecodeLimits``, keeping the running pixel total of the batch."""

    def __init__(self, limits: DecodeLimits | None = None):
        self.limits = limits or DecodeLimits()
        self.pixels = 0

    def _admit(self, what: str, width: int, height: int, frames: int = 1) -> None:
        """Count ``frames`` frames of ``width x height`` against the limits, before they are decoded."""
        lim, n = self.limits, width * height
        if lim.max_image_pixels is not None and n > lim.max_image_pixels:
            raise LimitExceeded(f"{what} is {width}x{height} = {n} pixels; the limit is {lim.max_image_pixels}")
        if lim.max_frames is not None and frames > lim.max_frames:
            raise LimitExceeded(f"{what} has {frames} frames; the limit is {lim.max_frames}")
        self.pixels += n * frames
        if lim.max_request_pixels is not None and self.pixels > lim.max_request_pixels:
            raise LimitExceeded(
                f"the batch decodes to {self.pixels} pixels or more by {what}; the limit is {lim.max_request_pixels}"
            )

    def png(self, data, what: str) -> np.ndarray:
        from lance_rl.model.media import read_image

        raw = _b64decode(data, what)
        # The size sits in the IHDR chunk right after the signature: read it there, not through PIL (which would warn
        # or raise its own decompression-bomb error on its own global limit).
        if raw[:8] != PNG_SIGNATURE or raw[12:16] != b"IHDR":
            raise ValueError(f"{what} is not a PNG")
        width, height = struct.unpack(">II", raw[16:24])
        self._admit(what, width, height)
        return read_image(raw, min_side=1)

    def video(self, obj, what: str) -> np.ndarray:
        if isinstance(obj, dict) and "png_frames" in obj:
            frames = obj["png_frames"]
            if not isinstance(frames, list) or not frames:
                raise ValueError(f"{what}: 'png_frames' must be a non-empty list of base64 PNGs")
            if self.limits.max_frames is not None and len(frames) > self.limits.max_frames:
                raise LimitExceeded(f"{what} has {len(frames)} frames; the limit is {self.limits.max_frames}")
            return np.stack([self.png(f, f"{what} frame {t}") for t, f in enumerate(frames)])
        if isinstance(obj, dict) and "mp4" in obj:
            return self.mp4(obj, what)
        raise ValueError(f"{what} must be an object with 'mp4' (and frames, height, width) or 'png_frames'")

    def mp4(self, obj: dict, what: str) -> np.ndarray:
        import av

        frames, height, width = (_positive_int(obj.get(k), f"{what}: '{k}'") for k in ("frames", "height", "width"))
        raw = _b64decode(obj["mp4"], what)
        try:
            with av.open(io.BytesIO(raw), format="mp4") as container:  # the mp4 demuxer only: no exotic formats
                coded_w, coded_h = _h264_stream_size(container, what)
                packets = _count_packets(container, stop_after=max(frames, self.limits.max_frames or frames))
            self._admit(what, coded_w, coded_h, frames=max(frames, packets))
            if height > coded_h or width > coded_w:
                raise ValueError(f"{what}: declared {width}x{height} is larger than its {coded_w}x{coded_h} stream")
            with av.open(io.BytesIO(raw), format="mp4") as container:
                decoded = _decode_frames(container, coded_w, coded_h, packets, what)
        except av.error.FFmpegError as e:
            raise ValueError(f"{what}: unreadable mp4 ({e})") from None
        if len(decoded) != frames:
            raise ValueError(f"{what}: mp4 decoded to {len(decoded)} frames, expected {frames}")
        # write_mp4 pads odd sides to even for H.264: crop back to the declared size.
        return np.ascontiguousarray(np.stack(decoded)[:, :height, :width])

    def condition(self, c, what: str):
        if c is None:
            return None
        return self.png(c, what) if isinstance(c, str) else self.video(c, what)

    def batch(self, body) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("prompts"), list):
            raise ValueError("the body must be a JSON object with a 'prompts' list")
        unknown = set(body) - set(BATCH_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}")
        n = len(body["prompts"])
        if self.limits.max_batch is not None and n > self.limits.max_batch:
            raise LimitExceeded(f"the batch has {n} samples; the limit is {self.limits.max_batch}")
        for key in BATCH_FIELDS[1:]:  # checked up front, so a long list is never decoded only to be refused
            value = body.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != n):
                raise ValueError(f"'{key}' must be null or a list with one entry per prompt ({n})")
        images, videos, conditions = body.get("images"), body.get("videos"), body.get("conditions")
        text = {} if body.get("completions") is None else {"completions": body["completions"], "answers": body.get("answers")}
        return text | {
            "prompts": body["prompts"],
            "images": None if images is None else [self.png(im, f"image {i}") for i, im in enumerate(images)],
            "videos": None if videos is None else [self.video(v, f"video {i}") for i, v in enumerate(videos)],
            "conditions": None if conditions is None
            else [self.condition(c, f"condition {i}") for i, c in enumerate(conditions)],
            "metadata": body.get("metadata"),
        }  # fmt: skip


def _b64decode(data, what: str) -> bytes:
    if not isinstance(data, str):
        raise ValueError(f"{what} must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise ValueError(f"{what} is not valid base64 ({e})") from None


def _positive_int(x, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{what} must be a positive integer, got {x!r}")
    return x


def _h264_stream_size(container, what: str) -> tuple[int, int]:
    if not container.streams.video:
        raise ValueError(f"{what}: the mp4 has no video stream")
    codec = container.streams.video[0].codec_context
    if codec.name != "h264":
        raise ValueError(f"{what}: the mp4 must hold H.264, not {codec.name}")
    return codec.width, codec.height


def _count_packets(container, stop_after: int) -> int:
    """Frames in the stream, counted from its packets without decoding; stops one past ``stop_after``."""
    n = 0
    for packet in container.demux(container.streams.video[0]):
        n += packet.size > 0  # the demuxer ends with an empty flush packet
        if n > stop_after:
            break
    return n


def _decode_frames(container, width: int, height: int, packets: int, what: str) -> list[np.ndarray]:
    out = []
    for frame in container.decode(container.streams.video[0]):
        # An H.264 stream may change its size mid-stream; every frame is held to the admitted size.
        if (frame.width, frame.height) != (width, height) or len(out) >= packets:
            raise ValueError(f"{what}: the mp4 stream changes size or holds more frames than it declares")
        out.append(frame.to_ndarray(format="rgb24"))
    return out


def decode_png(data: str, limits: DecodeLimits | None = None) -> np.ndarray:
    return _BatchDecoder(limits).png(data, "image")


def decode_video(obj: dict, limits: DecodeLimits | None = None) -> np.ndarray:
    return _BatchDecoder(limits).video(obj, "video")


def decode_batch(body: dict, limits: DecodeLimits | None = None) -> dict:
    """A JSON batch -> reward keyword arguments; ``ValueError`` if malformed, ``LimitExceeded`` if over ``limits``."""
    return _BatchDecoder(limits).batch(body)


def _score_to_json(s):
    return s if s is None or math.isfinite(s) else str(s)  # strict JSON has no NaN / Infinity


def _json_default(x):
    if isinstance(x, np.generic):
        x = x.item()
        return _score_to_json(x) if isinstance(x, float) else x
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def main(argv: list[str] | None = None) -> int:
    """``lance-rl serve-reward``: the server lives in ``server.py``, imported here only, so clients need no uvicorn."""
    from .server import main as serve_main

    return serve_main(argv)


# ------------------------------------------------------------------------------------------------ client
_RETRIABLE = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)


class RemoteReward(Reward):
    """A reward scored by a server speaking the protocol above (``lance-rl serve-reward`` or your own)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, video_format: str = "mp4", name: str = "remote",
                 modalities: tuple[str, ...] = ("image", "video", "text")):  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries, self.backoff, self.video_format = timeout, retries, backoff, video_format
        # Every modality by default: the server checks what its reward declares and answers 400 with its name.
        self.name, self.modalities = name, tuple(modalities)

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body, default=_json_default).encode()
        method = "GET" if data is None else "POST"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500 and e.code != 429:
                    raise self._error(f"HTTP {e.code} from {self.url}{path}: {message}", body) from None
                last = f"HTTP {e.code}: {message}"
            except _RETRIABLE as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"no answer within {self.timeout:g}s ({last})"
        raise self._error(f"{self.url}{path} failed after {self.retries + 1} attempt(s); last error: {last}", body)

    def _error(self, message: str, body: dict | None) -> RemoteRewardError:
        n = len(body["prompts"]) if body else 1
        return RemoteRewardError(self.name, list(range(n)), [message] * n)

    def info(self) -> dict:
        return self._request("/info")

    def score(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, completions=None,
              answers=None, **kwargs) -> RewardOutput:  # fmt: skip
        body = encode_batch(prompts, images, videos, conditions, metadata, self.video_format, completions, answers)
        answer = self._request("/score", body)
        try:
            scores = [None if s is None else float(s) for s in answer["scores"]]
            return RewardOutput(scores, dict(answer.get("details") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise self._error(f"{self.url}/score answered a malformed body ({e})", body) from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except Exception:  # noqa: BLE001 - a non-JSON error page
        return str(e.reason)


if __name__ == "__main__":
    sys.exit(main())
