"""The reward server: ``lance-rl serve-reward`` on uvicorn + Starlette, speaking ``lance-rl-reward/1`` (see remote.py).

    lance-rl serve-reward --reward ocr --port 18090 --token $TOKEN --max-concurrency 1

Why this stack: uvicorn (its h11 protocol) parses HTTP and owns the sockets, the backlog and idle connections;
Starlette routes and streams bodies; this module adds what a reward server needs on top. Ray Serve would put the same
uvicorn behind a Ray cluster, a controller and a proxy: for a reward that must scale over a cluster's GPUs, use the
recipe's ``ray: {num_actors, num_gpus}`` (``ray_pool.py``) or put ``RemoteReward`` in front of a Ray Serve deployment
that speaks this protocol.

Every refusal is an HTTP status with a JSON body ``{"error": "..."}`` naming the limit; no connection is dropped
unanswered. Limits (``ServerLimits``; the flag is the field name with dashes, e.g. ``--max-body-bytes``):

- ``max_body_bytes`` (1 GiB): a ``Content-Length`` above it is refused with 413 before a byte of body is read, and
  the body is counted while it streams; no ``Content-Length`` (or a chunked body) is 411; a malformed or negative
  one is 400 (uvicorn's HTTP parser, h11, refuses it; the answer is JSON here too).
- ``max_pending_bytes`` (2 GiB): request bodies held at once, received or waiting or being scored; a request waits
  for room up to ``queue_timeout``, then gets 503 with ``Retry-After``.
- ``max_json_depth`` (32) and ``max_json_values`` (1,000,000 array elements and object members): checked by one
  pass over the raw bytes before ``json.loads``, so deep nesting never reaches a recursive parser: 413.
- ``max_batch`` (1024 samples), ``max_image_pixels`` (4096 x 4096 per image, video frame or condition),
  ``max_frames`` (1024 per video), ``max_request_pixels`` (2**29 for the whole batch, 1.5 GiB as RGB): read from the
  PNG header and the MP4 stream before any pixel is decoded: 413. Images must be PNG and videos H.264 in MP4.
- ``read_timeout`` (30 s): the longest silence while a body streams in: 408. ``idle_timeout`` (15 s): a connection
  must deliver a whole request head this soon after it opens or after its last answer, else it is closed (408 if a
  partial head had arrived); this is also uvicorn's keep-alive timeout. A request refused before its body was read
  (401, 411, 413, 503) has the rest of its body read and discarded, so the client sees the answer rather than a
  broken pipe, for at most ``idle_timeout`` after the answer.
- ``max_concurrency`` (1): batches parsed, decoded and scored at once, each in its own daemon thread (off the event
  loop; a hung reward never blocks shutdown). Others wait up to ``queue_timeout`` (60 s), then 503 + Retry-After;
  the client retries 503. ``max_connections`` (1024): open connections; past it uvicorn answers its own plain-text
  503. ``backlog`` (2048): the listen queue.

Memory: peak RSS stays below the idle server plus ``max_pending_bytes`` (bodies) plus, per scoring slot, about
``max_body_bytes`` (the body while it is parsed) + 3 bytes x ``max_request_pixels`` (RGB) + 16 bytes x
``max_image_pixels`` (one image in PIL while it decodes and converts), plus what the reward itself allocates.
Measured (tests/test_reward_server.py): 4 PNGs of 12000 x 12000 (0.7 MB sent, 1.7 GB as RGB) raise the peak by
3-4 MiB; a batch exactly at 4 x 2048 x 2048 = ``max_request_pixels`` raises it by ~103 MiB against a bound of 136.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus

import h11
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .base import ModalityError
from .remote import PROTOCOL, TOKEN_ENV, DecodeLimits, LimitExceeded, _json_default, _score_to_json, decode_batch

GiB = 1 << 30


@dataclass(frozen=True)
class ServerLimits:
    """Everything a client can ask of the server, bounded; see the module docstring for what each refusal is."""

    max_body_bytes: int = GiB
    max_pending_bytes: int = 2 * GiB
    max_json_depth: int = 32
    max_json_values: int = 1_000_000
    max_batch: int = 1024
    max_image_pixels: int = 4096 * 4096
    max_frames: int = 1024
    max_request_pixels: int = 1 << 29
    read_timeout: float = 30.0
    idle_timeout: float = 15.0
    queue_timeout: float = 60.0
    max_concurrency: int = 1
    max_connections: int = 1024
    backlog: int = 2048

    def __post_init__(self):
        bad = [f.name for f in dataclasses.fields(self) if not getattr(self, f.name) > 0]
        if bad:
            raise ValueError(f"server limits must be positive: {', '.join(bad)}")
        if self.max_body_bytes > self.max_pending_bytes:
            raise ValueError("max_body_bytes must not exceed max_pending_bytes (a body must fit the pending budget)")

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_batch, self.max_image_pixels, self.max_frames, self.max_request_pixels)


# ------------------------------------------------------------------------------------------------ JSON shape
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}",')))
_SCAN_CHUNK = 1 << 20


def check_json_shape(body, max_depth: int, max_values: int) -> None:
    """Refuse (``LimitExceeded``) a JSON text nested deeper than ``max_depth`` or holding more than ``max_values``
    array elements and object members, from its raw bytes and before any parsing.

    One pass in 1 MiB chunks at C speed (bytes.replace/translate, numpy), so it costs no recursion and O(chunk) memory
    whatever the body holds. Escaped backslashes and quotes are removed first, then everything but ``[]{}",``; quote
    parity then tells string contents (ignored) from structure. Invalid JSON is left for ``json.loads`` to reject.
    """
    depth = deepest = values = 0
    in_string = False
    carry = b""
    for start in range(0, len(body), _SCAN_CHUNK):
        part = carry + bytes(body[start : start + _SCAN_CHUNK])
        carry = b""
        # An odd run of backslashes at the chunk's end escapes the next chunk's first byte: carry one backslash over.
        if (len(part) - len(part.rstrip(b"\\"))) % 2 and start + _SCAN_CHUNK < len(body):
            part, carry = part[:-1], b"\\"
        part = part.replace(b"\\\\", b"").replace(b'\\"', b"")
        s = np.frombuffer(part.translate(None, _NOT_STRUCTURE), np.uint8)
        if not len(s):
            continue
        quote = s == ord('"')
        outside = ~quote & ((np.cumsum(quote) + in_string) % 2 == 0)
        opens = outside & ((s == ord("[")) | (s == ord("{")))
        closes = outside & ((s == ord("]")) | (s == ord("}")))
        path = depth + np.cumsum(opens.astype(np.int64) - closes)
        deepest, depth = max(deepest, int(path.max())), int(path[-1])
        values += int(np.count_nonzero(opens | (outside & (s == ord(",")))))
        in_string = bool((in_string + int(quote.sum())) % 2)
        if deepest > max_depth:
            raise LimitExceeded(f"the JSON body nests deeper than {max_depth} levels (the limit)")
        if values > max_values:
            raise LimitExceeded(f"the JSON body holds more than {max_values} values (the limit)")


# ------------------------------------------------------------------------------------------------ admission
def _error(status: int, message: str, close: bool = False, retry_after: int | None = None) -> HTTPException:
    """An HTTP error answered as ``{"error": message}``; ``close`` ends the connection after it.

    Errors answered before the body is read do not close: uvicorn then reads and discards the rest of the body, so a
    client still sending it gets to read the answer instead of a broken pipe; ``_Protocol`` closes the connection if
    the body has not ended ``idle_timeout`` after the answer."""
    headers = {"Connection": "close"} if close else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return HTTPException(status, message, headers or None)


class _PendingBytes:
    """Bytes of request bodies held at once; a request reserves its Content-Length before reading it."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._room = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, n: int, timeout: float):
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self.used + n <= self.capacity), timeout)
            except asyncio.TimeoutError:
                raise _error(503, f"busy: {self.used} of {self.capacity} pending body bytes held for {timeout:g}s; "
                                  "retry later", retry_after=1) from None  # fmt: skip
            self.used += n
        try:
            yield
        finally:
            async with self._room:
                self.used -= n
                self._room.notify_all()


class _ScoringSlots:
    """At most ``n`` batches scored at once, each in a daemon thread; a slot frees when its thread ends, even if the
    request waiting on it was cancelled (Python cannot stop a thread, so the slot stays taken while it runs)."""

    def __init__(self, n: int):
        self.n = n
        self._free = asyncio.Semaphore(n)

    async def run(self, fn, timeout: float):
        try:
            await asyncio.wait_for(self._free.acquire(), timeout)
        except asyncio.TimeoutError:
            raise _error(503, f"busy: all {self.n} scoring slot(s) taken for {timeout:g}s; retry later",
                         retry_after=1) from None  # fmt: skip
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finish(outcome):
            self._free.release()
            if not done.cancelled():
                done.set_result(outcome)

        def work():
            try:
                outcome = (fn(), None)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop, which answers or re-raises it
                outcome = (None, e)
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server shut down meanwhile
                loop.call_soon_threadsafe(finish, outcome)

        threading.Thread(target=work, name="reward-score", daemon=True).start()
        try:
            result, error = await done
        except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time: answer rather than drop
            raise _error(503, "the server is shutting down; retry later", close=True, retry_after=1) from None
        if error is not None:
            raise error
        return result


# ------------------------------------------------------------------------------------------------ the app
class _RewardApp:
    def __init__(self, reward, token: str | None, limits: ServerLimits):
        self.reward, self.token, self.limits = reward, token, limits
        self.pending = _PendingBytes(limits.max_pending_bytes)
        self.slots = _ScoringSlots(limits.max_concurrency)

    def starlette(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/score", self.score, methods=["POST"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _unexpected_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    def _authorise(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise _error(401, "missing or wrong token (send 'Authorization: Bearer <token>')")

    async def health(self, request: Request) -> Response:
        return _json(200, {"ok": True})

    async def info(self, request: Request) -> Response:
        self._authorise(request)
        r = self.reward
        return _json(200, {"protocol": PROTOCOL, "name": r.name, "modalities": list(r.modalities)})

    async def score(self, request: Request) -> Response:
        self._authorise(request)
        length = self._declared_length(request)
        async with self.pending.reserve(length, self.limits.queue_timeout):
            # The body travels in a list the worker empties, so it can be freed once parsed (no frame keeps it).
            box = [await self._read_body(request, length)]
            return await self.slots.run(lambda: self._score_body(box), self.limits.queue_timeout)

    def _declared_length(self, request: Request) -> int:
        declared = request.headers.get("content-length")
        if declared is None or "transfer-encoding" in request.headers:
            raise _error(411, "POST /score needs a Content-Length header (chunked bodies are not accepted)")
        if not declared.isdigit():  # h11 refuses these first; kept should the HTTP parser ever change
            raise _error(400, f"bad Content-Length {declared!r}", close=True)
        length = int(declared)
        if length > self.limits.max_body_bytes:
            raise _error(413, f"body of {length} bytes; the limit is {self.limits.max_body_bytes}")
        return length

    async def _read_body(self, request: Request, length: int) -> bytearray:
        """The body, counted as it streams (never past ``length``), with at most ``read_timeout`` of silence."""
        body, received = bytearray(length), 0
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.limits.read_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise _error(408, f"the body stalled: no bytes for {self.limits.read_timeout:g}s after {received} of "
                                  f"{length}", close=True) from None  # fmt: skip
            except ClientDisconnect:
                raise _error(400, "the client disconnected while sending the body", close=True) from None
            if received + len(chunk) > length:
                raise _error(413, f"the body is longer than its Content-Length of {length}", close=True)
            body[received : received + len(chunk)] = chunk
            received += len(chunk)
        if received != length:
            raise _error(400, f"the body ended after {received} of {length} bytes", close=True)
        return body

    def _score_body(self, box: list) -> Response:
        """Parse, decode and score in the worker thread: all the heavy work is here, off the event loop."""
        batch = self._parse(box)
        try:
            out = self.reward(**batch)
        except ModalityError as e:
            raise _error(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - reported to the client, which retries
            raise _error(500, f"reward {self.reward.name!r} raised {type(e).__name__}: {e}") from None
        details = {k: [_score_to_json(v) if isinstance(v, float) else v for v in vs] for k, vs in out.details.items()}
        return _json(200, {"scores": [_score_to_json(s) for s in out.scores], "details": details})

    def _parse(self, box: list) -> dict:
        body = box.pop()
        try:
            check_json_shape(body, self.limits.max_json_depth, self.limits.max_json_values)
            text = body.decode("utf-8")
            del body  # peak memory: raw body + text, then text + parsed objects, never all three
            obj = json.loads(text)
            del text
            return decode_batch(obj, self.limits.decode_limits())
        except LimitExceeded as e:
            raise _error(413, str(e)) from None
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise _error(400, f"bad request: {e}") from None


def _json(status: int, obj: dict, headers: dict | None = None) -> Response:
    data = json.dumps(obj, default=_json_default, allow_nan=False).encode()
    return Response(data, status, headers, media_type="application/json")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _json(exc.status_code, {"error": exc.detail}, dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return _json(500, {"error": f"server error: {type(exc).__name__}: {exc}"})


# ------------------------------------------------------------------------------------------------ HTTP protocol
class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what it leaves out: a JSON body when h11 refuses a request (a bad Content-Length,
    oversized headers); a deadline of ``idle_timeout`` for each request head and for the rest of an answered request's
    body (uvicorn's keep-alive timer restarts on every byte received, so a client trickling bytes would hold its
    connection forever); and a lingering close (see ``_LingeringTransport``)."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(_LingeringTransport(transport, self))
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # else: the rest of a body nobody will read
            super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc):
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        pass  # the head deadline below does its work (and more); two timers would linger twice

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        if self.transport.is_closing() or self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY):
            return  # a request is being answered: the app's read timeout covers its body
        # Here no request has begun, or one was answered and the client is still sending its unread body.
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._answer_and_close(408, f"no complete request head within {self.timeout_keep_alive:g}s")
        else:
            self.transport.close_now()  # idle, or the answered body never ended: it had its idle_timeout

    def send_400_response(self, msg: str) -> None:
        error = sys.exc_info()[1]  # uvicorn calls this while handling h11's RemoteProtocolError
        if isinstance(error, h11.RemoteProtocolError):
            self._answer_and_close(error.error_status_hint, f"malformed HTTP request: {error}")
        else:
            self._answer_and_close(400, f"malformed HTTP request: {msg}")

    def _answer_and_close(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
        self.transport.write(head.encode() + body)
        self.transport.close()  # flushes the answer first


class _LingeringTransport:
    """A connection's transport whose ``close()`` lingers while the client is still sending a body the server will
    not read. Closing a socket with unread input sends a TCP reset, which can destroy the answer before the client
    reads it, and urllib (so ``RemoteReward``) sends ``Connection: close``, so uvicorn closes right after a 413 or
    401 answered early. Instead the rest of the body is discarded until the client hangs up, for ``idle_timeout``
    seconds at most."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name):  # everything else is the real transport's
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if self._protocol.conn.their_state is h11.SEND_BODY:
            self.lingering = True
            self._transport.resume_reading()
            self._protocol.loop.call_later(self._protocol.timeout_keep_alive, self._transport.close)
        else:
            self._transport.close()

    def close_now(self) -> None:
        self._transport.close()


# ------------------------------------------------------------------------------------------------ serving
class RewardServer:
    """A reward served on a bound socket: ``url``, ``serve_forever()`` (blocks), ``shutdown()`` from another thread,
    ``server_close()``."""

    def __init__(self, reward, host: str, port: int, token: str | None, limits: ServerLimits):
        self.reward, self.token, self.limits = reward, token, limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=limits.backlog)
        config = uvicorn.Config(
            _RewardApp(reward, token, limits).starlette(),
            http=_Protocol,
            lifespan="off",
            log_config=None,  # leave the host process's logging alone; warnings reach stderr
            log_level="warning",
            access_log=False,  # keep the trainer's console clean; errors are answered, not printed
            timeout_keep_alive=limits.idle_timeout,
            limit_concurrency=limits.max_connections,
            backlog=limits.backlog,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving and wait until ``serve_forever`` has returned."""
        self._server.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def make_server(reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                reward_kwargs: dict | None = None, **limits) -> RewardServer:  # fmt: skip
    """A server bound to ``host:port`` (port 0 picks a free one, see ``.url``); ``limits`` override ``ServerLimits``
    fields (e.g. ``max_concurrency=4``). Call ``serve_forever()`` on it."""
    from .registry import load_reward

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving a reward on {host} with no token: anyone who can reach it can use it", file=sys.stderr)
    return RewardServer(load_reward(reward, **(reward_kwargs or {})), host, port, token, ServerLimits(**limits))


def serve(reward, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          reward_kwargs: dict | None = None, **limits) -> None:  # fmt: skip
    """Serve until interrupted."""
    server = make_server(reward, host, port, token, reward_kwargs, **limits)
    try:
        print(f"serving reward {server.reward.name!r} on {server.url} ({PROTOCOL})", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------------------------ CLI
def _byte_size(text: str) -> int:
    """'1073741824', '512M', '1G' (binary units) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if text[-1:] in units else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1073741824, 512M, 1G)") from None


_LIMIT_HELP = {
    "max_body_bytes": "largest request body (413 above; sizes take K/M/G)",
    "max_pending_bytes": "request bodies held at once; more wait, then 503",
    "max_json_depth": "deepest JSON nesting (413 above)",
    "max_json_values": "JSON array elements + object members per body (413 above)",
    "max_batch": "samples per request (413 above)",
    "max_image_pixels": "pixels per image or video frame, read from the header before decoding (413 above)",
    "max_frames": "frames per video (413 above)",
    "max_request_pixels": "decoded pixels per request, all images and frames together (413 above)",
    "read_timeout": "seconds of silence allowed while a body streams in (408 after)",
    "idle_timeout": "seconds a connection may go without a complete request head (closed after)",
    "queue_timeout": "seconds a request may wait for body room or a scoring slot (503 after)",
    "max_concurrency": "batches parsed, decoded and scored at the same time",
    "max_connections": "open connections (uvicorn answers 503 above)",
    "backlog": "listen backlog",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lance-rl serve-reward", description="Serve a reward over HTTP + JSON.")
    p.add_argument("--reward", required=True, help="a registered name or package.module:callable")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"required bearer token (default ${TOKEN_ENV})")
    p.add_argument("--kwargs", default="{}", help='reward constructor arguments as JSON, e.g. \'{"device": "cuda"}\'')
    for field in dataclasses.fields(ServerLimits):
        kind = _byte_size if field.name.endswith("_bytes") else type(field.default)
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                       help=f"{_LIMIT_HELP[field.name]} (default {field.default})")  # fmt: skip
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error("--kwargs must be a JSON object")
    limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)}
    try:
        ServerLimits(**limits)
    except ValueError as e:
        p.error(str(e))
    serve(args.reward, args.host, args.port, args.token, kwargs, **limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
