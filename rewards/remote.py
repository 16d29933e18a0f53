"""Remote rewards over HTTP + JSON: a standard-library server and a client reward (no pickle anywhere).

Run a reward in its own process or machine (its dependencies never meet the trainer's)::

    lance-rl serve-reward --reward ocr --port 18090 --token $TOKEN
    # recipe:  rewards: {remote: {kwargs: {url: "http://127.0.0.1:18090", token: ...}, weight: 1.0}}

Protocol ``lance-rl-reward/1`` (any server speaking it works with ``RemoteReward``):

- ``POST /score`` with header ``Authorization: Bearer <token>`` (when the server has a token) and a JSON body
  ``{"prompts": [str], "images": [png] | null, "videos": [video] | null, "conditions": [null | png | video] | null,
  "metadata": [object] | null}`` where ``png`` is a base64 PNG string and ``video`` is
  ``{"mp4": base64, "frames": T, "height": H, "width": W}`` (H.264, lossy) or ``{"png_frames": [png, ...]}``
  (lossless). Answer 200 ``{"scores": [number | null | "nan" | "inf" | "-inf"], "details": {key: [value]}}``, or an
  error status with ``{"error": message}``: 400 a bad batch, 401 a bad token, 413 too large, 500 the reward raised.
- ``GET /info`` -> ``{"protocol", "name", "modalities"}``; ``GET /health`` -> ``{"ok": true}`` (no token needed).

The client retries connection errors, timeouts, 429 and 5xx with exponential backoff and raises
``RemoteRewardError`` (a ``RewardError``) after the last attempt; other 4xx answers fail at once.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import http.client
import io
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .base import ModalityError, Reward, RewardError, RewardOutput

PROTOCOL = "lance-rl-reward/1"
TOKEN_ENV = "LANCE_RL_REWARD_TOKEN"
MAX_BODY = 1 << 30  # 1 GiB: a batch of long videos, not more


class RemoteRewardError(RewardError):
    """The remote reward could not be scored (after retries where the error is retriable)."""


# ------------------------------------------------------------------------------------------------ media <-> JSON
def encode_png(image: np.ndarray) -> str:
    from lance_rl.model.media import write_png

    buf = io.BytesIO()
    write_png(image, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    from lance_rl.model.media import read_image

    return read_image(base64.b64decode(data), min_side=1)


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


def decode_video(obj: dict) -> np.ndarray:
    if "png_frames" in obj:
        return np.stack([decode_png(f) for f in obj["png_frames"]])
    from lance_rl.model.media import read_video

    # Read at the rate it was written (12 fps, all frames kept), then undo write_mp4's even-size padding.
    frames, _ = read_video(base64.b64decode(obj["mp4"]), fps=12, max_seconds=None, frame_rule=None, min_side=1)
    if len(frames) != obj["frames"]:
        raise ValueError(f"mp4 decoded to {len(frames)} frames, expected {obj['frames']}")
    return np.ascontiguousarray(frames[:, : obj["height"], : obj["width"]])


def _encode_condition(c, video_format):
    if c is None:
        return None
    c = np.asarray(c)
    return encode_png(c) if c.ndim == 3 else encode_video(c, video_format)


def _decode_condition(c):
    if c is None:
        return None
    return decode_png(c) if isinstance(c, str) else decode_video(c)


def encode_batch(prompts, images=None, videos=None, conditions=None, metadata=None, video_format="mp4") -> dict:
    return {
        "prompts": list(prompts),
        "images": None if images is None else [encode_png(np.asarray(im)) for im in images],
        "videos": None if videos is None else [encode_video(np.asarray(v), video_format) for v in videos],
        "conditions": None if conditions is None else [_encode_condition(c, video_format) for c in conditions],
        "metadata": metadata,
    }


def decode_batch(body: dict) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), list):
        raise ValueError("the body must be a JSON object with a 'prompts' list")
    unknown = set(body) - {"prompts", "images", "videos", "conditions", "metadata"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    images, videos, conditions = body.get("images"), body.get("videos"), body.get("conditions")
    return {
        "prompts": body["prompts"],
        "images": None if images is None else [decode_png(im) for im in images],
        "videos": None if videos is None else [decode_video(v) for v in videos],
        "conditions": None if conditions is None else [_decode_condition(c) for c in conditions],
        "metadata": body.get("metadata"),
    }


def _score_to_json(s):
    return s if s is None or math.isfinite(s) else str(s)  # strict JSON has no NaN / Infinity


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ------------------------------------------------------------------------------------------------ server
class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung request never blocks shutdown

    def __init__(self, reward: Reward, host: str, port: int, token: str | None, max_concurrency: int = 1):
        self.reward, self.token = reward, token
        self.slots = threading.Semaphore(max_concurrency)  # one GPU model: score one batch at a time by default
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep the trainer's console clean; errors are answered, not printed
        pass

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, default=_json_default, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if not self.server.token:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
            return True
        self._send(401, {"error": "missing or wrong token (send 'Authorization: Bearer <token>')"})
        return False

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {"ok": True})
        if not self._authorised():
            return
        if self.path == "/info":
            r = self.server.reward
            return self._send(200, {"protocol": PROTOCOL, "name": r.name, "modalities": list(r.modalities)})
        self._send(404, {"error": f"no such endpoint {self.path}; use POST /score, GET /info, GET /health"})

    def do_POST(self):
        if self.path != "/score":
            return self._send(404, {"error": f"no such endpoint {self.path}; use POST /score"})
        if not self._authorised():
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self._send(413, {"error": f"body of {length} bytes exceeds {MAX_BODY}"})
        try:
            batch = decode_batch(json.loads(self.rfile.read(length)))
        except (ValueError, KeyError, TypeError) as e:
            return self._send(400, {"error": f"bad request: {e}"})
        try:
            with self.server.slots:
                out = self.server.reward(**batch)
        except ModalityError as e:
            return self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - reported to the client, which retries
            return self._send(500, {"error": f"reward {self.server.reward.name!r} raised {type(e).__name__}: {e}"})
        details = {k: [_score_to_json(v) if isinstance(v, float) else v for v in vs] for k, vs in out.details.items()}
        self._send(200, {"scores": [_score_to_json(s) for s in out.scores], "details": details})


def make_server(reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                reward_kwargs: dict | None = None, max_concurrency: int = 1) -> RewardServer:  # fmt: skip
    """A server bound to ``host:port`` (port 0 picks a free one, see ``.url``); call ``serve_forever()`` on it."""
    from .registry import load_reward

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving a reward on {host} with no token: anyone who can reach it can use it", file=sys.stderr)
    return RewardServer(load_reward(reward, **(reward_kwargs or {})), host, port, token, max_concurrency)


def serve(reward, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          reward_kwargs: dict | None = None, max_concurrency: int = 1) -> None:  # fmt: skip
    """Serve until interrupted."""
    server = make_server(reward, host, port, token, reward_kwargs, max_concurrency)
    print(f"serving reward {server.reward.name!r} on {server.url} ({PROTOCOL})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lance-rl serve-reward", description="Serve a reward over HTTP + JSON.")
    p.add_argument("--reward", required=True, help="a registered name or package.module:callable")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"required bearer token (default ${TOKEN_ENV})")
    p.add_argument("--kwargs", default="{}", help='reward constructor arguments as JSON, e.g. \'{"device": "cuda"}\'')
    p.add_argument("--max-concurrency", type=int, default=1, help="batches scored at the same time")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error("--kwargs must be a JSON object")
    serve(args.reward, args.host, args.port, args.token, kwargs, args.max_concurrency)
    return 0


# ------------------------------------------------------------------------------------------------ client
_RETRIABLE = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)


class RemoteReward(Reward):
    """A reward scored by a server speaking the protocol above (``lance-rl serve-reward`` or your own)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, video_format: str = "mp4", name: str = "remote",
                 modalities: tuple[str, ...] = ("image", "video")):  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries, self.backoff, self.video_format = timeout, retries, backoff, video_format
        # Both modalities by default: the server checks what its reward declares and answers 400 with its name.
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

    def score(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, **kwargs) -> RewardOutput:
        body = encode_batch(prompts, images, videos, conditions, metadata, self.video_format)
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
