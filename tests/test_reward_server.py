"""The reward server probed as a hostile client would (issue 18): every probe gets a clean HTTP error with a JSON body
naming the problem, 50 parallel clients x 10 rounds all get 200, and peak RSS stays within the configured limits."""

import base64
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from lance_rl.rewards import Reward, load_reward
from lance_rl.rewards import server as server_mod
from lance_rl.rewards.remote import (
    DecodeLimits,
    LimitExceeded,
    RemoteReward,
    RemoteRewardError,
    decode_batch,
    encode_batch,
    encode_png,
    encode_video,
)
from lance_rl.rewards.server import ServerLimits, check_json_shape, make_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0k"


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def serving(reward, **kwargs):
    server = make_server(reward, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def address(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def read_answer(sock, timeout=10.0):
    """(status, headers, JSON body) of one HTTP answer, read until its Content-Length or the connection's end."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer (got {data!r})"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    assert headers["content-type"] == "application/json", headers
    return int(lines[0].split()[1]), headers, json.loads(body)


def exchange(url, raw: bytes, timeout=10.0):
    """Send raw bytes, read one answer."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock, timeout)


def post(url, body: bytes, token=TOKEN, extra=b"", length=None):
    length = len(body) if length is None else length
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {length}\r\n"
    return exchange(url, head.encode() + extra + b"\r\n" + body)


def images(n, seed=0, size=16):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def blank_png(width, height) -> str:
    """A real greyscale PNG of ``width x height`` zeros, as base64: tiny on the wire, huge once decoded."""
    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode("ascii")


def peak_rss(pid) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# The subprocess server every probe below hits: small limits so the tests are quick and the bounds are tight.
CLI_LIMITS = dict(max_image_pixels=2048 * 2048, max_request_pixels=4 * 2048 * 2048, max_body_bytes=64 << 20,
                  max_pending_bytes=128 << 20, read_timeout=1.0, idle_timeout=2.0, max_concurrency=2)  # fmt: skip


@pytest.fixture(scope="module")
def cli_server():
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CLI_LIMITS.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), LANCE_RL_REWARD_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lance_rl.rewards.remote", "--reward", "jpeg_compressibility", "--port", "0", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "serving reward 'jpeg_compressibility' on http://127.0.0.1:" in line, line
        yield line.split(" on ")[1].split()[0], proc.pid
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ the probes
@pytest.mark.parametrize("length", ["abc", "-1"])
def test_malformed_content_length_is_400(cli_server, length):
    url, _ = cli_server
    raw = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n"
    status, headers, body = exchange(url, raw.encode() + b"{}")
    assert (status, body) == (400, {"error": "malformed HTTP request: bad Content-Length"})
    assert headers["connection"] == "close"


def test_deeply_nested_json_is_413_before_parsing(cli_server):
    url, _ = cli_server
    status, _, body = post(url, b"[" * 100_000)
    assert (status, body) == (413, {"error": "the JSON body nests deeper than 32 levels (the limit)"})


def test_stalled_body_is_408(cli_server):
    url, _ = cli_server
    with socket.create_connection(address(url)) as sock:
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head.encode() + b'{"prompts"')
        start = time.monotonic()
        status, _, body = read_answer(sock)
        waited = time.monotonic() - start
    assert (status, body) == (408, {"error": "the body stalled: no bytes for 1s after 10 of 1000"})
    assert 0.9 < waited < 5


def test_stalled_request_head_is_408_and_an_idle_connection_is_closed(cli_server):
    url, _ = cli_server
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        status, _, body = read_answer(sock)
    assert (status, body) == (408, {"error": "no complete request head within 2s"})
    with socket.create_connection(address(url)) as sock:
        sock.settimeout(10)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert 1.5 < time.monotonic() - start < 6


def test_decompression_bomb_is_413_from_the_header_and_peak_rss_stays_bounded(cli_server):
    url, pid = cli_server
    ims = images(2)
    ok = post(url, json.dumps(encode_batch(["a", "b"], ims)).encode())  # warm up: codecs loaded, buffers grown
    assert ok[0] == 200
    before = peak_rss(pid)
    bomb = json.dumps({"prompts": ["x"] * 4, "images": [blank_png(12000, 12000)] * 4}).encode()
    assert len(bomb) < 1 << 20  # 4 x 144 Mpx (1.7 GB of RGB) in under 1 MB on the wire
    status, _, body = post(url, bomb)
    assert (status, body) == (413, {"error": "image 0 is 12000x12000 = 144000000 pixels; the limit is 4194304"})
    bomb_growth = peak_rss(pid) - before
    # At the limits: 4 images of 2048 x 2048 = max_request_pixels exactly, decoded and scored.
    side = 2048
    gradient = np.broadcast_to(np.arange(side, dtype=np.uint8)[None, :, None], (side, side, 3))
    at_limit = json.dumps(encode_batch(["x"] * 4, [gradient] * 4)).encode()
    before = peak_rss(pid)
    status, _, body = post(url, at_limit)
    assert status == 200 and len(body["scores"]) == 4
    limit_growth = peak_rss(pid) - before
    # The documented bound for one scoring slot: the body twice + RGB of max_request_pixels + one image in PIL;
    # the JPEG reward itself re-encodes one image at a time (its PIL copy + JPEG buffer: another ~6 bytes/pixel).
    bound = 2 * len(at_limit) + 3 * CLI_LIMITS["max_request_pixels"] + (16 + 6) * CLI_LIMITS["max_image_pixels"]
    print(f"\npeak RSS growth: bomb {bomb_growth / 2**20:.1f} MiB; at the limits {limit_growth / 2**20:.1f} MiB "
          f"(bound {bound / 2**20:.1f} MiB; body {len(at_limit) / 2**20:.1f} MiB)")  # fmt: skip
    assert bomb_growth < 16 << 20
    assert limit_growth < bound


def test_50_parallel_clients_x_10_rounds_all_succeed_at_the_first_attempt(cli_server):
    url, _ = cli_server
    ims = images(2, seed=5)
    want = load_reward("jpeg_compressibility")(prompts=["a", "b"], images=ims).scores
    results, errors = [], []
    start = threading.Barrier(50)

    def client():
        reward = RemoteReward(url, token=TOKEN, retries=0, timeout=60)  # no retry hides a refused connection
        start.wait()  # the first 50 connections arrive at once
        try:
            for _ in range(10):
                results.append(reward(prompts=["a", "b"], images=ims).scores)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 500 and all(r == want for r in results)


# ------------------------------------------------------------------------------------------------ more refusals
def test_declared_body_over_the_limit_is_413_before_reading_it(cli_server):
    url, _ = cli_server
    with socket.create_connection(address(url)) as sock:
        length = (64 << 20) + 1
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n"
        sock.sendall(head.encode())  # and no body: the answer comes first
        status, _, body = read_answer(sock)
        assert (status, body) == (413, {"error": f"body of {length} bytes; the limit is {64 << 20}"})
        start = time.monotonic()
        assert sock.recv(1) == b""  # the announced body never came: closed after idle_timeout
        assert 1.5 < time.monotonic() - start < 6


def test_the_client_reads_a_413_while_still_sending_its_body():
    ims = list(np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))  # ~1 MB of PNG
    with serving("jpeg_compressibility", max_body_bytes=64 << 10) as server:
        with pytest.raises(RemoteRewardError, match=r"HTTP 413 .*: body of \d+ bytes; the limit is 65536"):
            RemoteReward(server.url, retries=3, backoff=10)(prompts=["a"] * 4, images=ims)


def test_missing_length_and_chunked_bodies_are_411(cli_server):
    url, _ = cli_server
    no_length = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    chunked = no_length[:-2] + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    for raw in (no_length, chunked):
        status, _, body = exchange(url, raw.encode())
        assert status == 411 and "needs a Content-Length" in body["error"]


def test_oversized_headers_are_431(cli_server):
    url, _ = cli_server
    status, _, body = exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 100_000)  # no end in sight
    assert status == 431 and body["error"].startswith("malformed HTTP request")


@pytest.mark.parametrize(
    "payload, status, message",
    [
        (b"{not json", 400, "bad request: Expecting property name"),
        ('{"prompts": ["\u00e9"]}'.encode("utf-16"), 400, "bad request: 'utf-8' codec can't decode"),
        (b'{"prompts": "a"}', 400, "bad request: the body must be a JSON object with a 'prompts' list"),
        (b'{"prompts": ["a"], "images": [3]}', 400, "bad request: image 0 must be a base64 string, got int"),
        (b'{"prompts": ["a"], "images": ["!!"]}', 400, "bad request: image 0 is not valid base64"),
        (b'{"prompts": ["a"], "images": ["aGVsbG8="]}', 400, "bad request: image 0 is not a PNG"),
        (b'{"prompts": ["a", "b"], "images": []}', 400, "'images' must be null or a list with one entry per prompt"),
        (b'{"prompts": ["a"], "extra": 1}', 400, "bad request: unknown field(s) ['extra']"),
        (b'{"prompts": ["a"], "videos": [{"mp4": "", "frames": 0}]}', 400, "video 0: 'frames' must be a positive"),
    ],
)
def test_malformed_batches_are_400(cli_server, payload, status, message):
    url, _ = cli_server
    got, _, body = post(url, payload)
    assert got == status and message in body["error"], body


def test_wrong_token_path_and_method_are_json_errors(cli_server):
    url, _ = cli_server
    wrong_token = {"error": "missing or wrong token (send 'Authorization: Bearer <token>')"}
    assert post(url, b"{}", token="nope")[::2] == (401, wrong_token)
    assert exchange(url, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (401, wrong_token)
    assert exchange(url, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (404, {"error": "Not Found"})
    assert exchange(url, b"GET /score HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (405, {"error": "Method Not Allowed"})
    assert exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (200, {"ok": True})


def test_batch_and_pixel_limits_are_413_before_decoding():
    limits = DecodeLimits(max_batch=3, max_image_pixels=32 * 32, max_frames=4, max_request_pixels=3 * 32 * 32)
    ims = [encode_png(im) for im in images(4, size=32)]
    cases = [
        ({"prompts": ["a"] * 4, "images": ims}, "the batch has 4 samples; the limit is 3"),
        ({"prompts": ["a"], "images": [encode_png(images(1, size=33)[0])]}, "image 0 is 33x33 = 1089 pixels"),
        ({"prompts": ["a", "b"], "images": ims[:1]}, "'images' must be null or a list with one entry per prompt (2)"),
    ]
    with pytest.raises(LimitExceeded, match="decodes to 4096 pixels or more by condition 0; the limit is 3072"):
        decode_batch({"prompts": ["a"] * 3, "images": ims[:3], "conditions": [ims[0], None, None]}, limits)
    for body, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            decode_batch(body, limits)
    video = np.stack(images(5, size=16))
    for fmt in ("png", "mp4"):
        with pytest.raises(LimitExceeded, match="video 0 has 5 frames; the limit is 4"):
            decode_batch({"prompts": ["v"], "videos": [encode_video(video, fmt)]}, limits)
    big = np.stack(images(2, size=48))  # 2304 px per frame > 1024
    with pytest.raises(LimitExceeded, match="video 0 is 48x48 = 2304 pixels"):
        decode_batch({"prompts": ["v"], "videos": [encode_video(big, "mp4")]}, limits)
    ok = decode_batch({"prompts": ["v"], "videos": [encode_video(video[:4], "mp4")]}, limits)
    assert ok["videos"][0].shape == (4, 16, 16, 3)


def test_too_many_json_values_is_413():
    with serving("jpeg_compressibility", max_json_values=1000) as server:
        status, _, body = post(server.url, json.dumps({"prompts": ["a"], "metadata": [{"k": [0] * 2000}]}).encode(),
                               token="")  # fmt: skip
    assert (status, body) == (413, {"error": "the JSON body holds more than 1000 values (the limit)"})


# ------------------------------------------------------------------------------------------------ busy: 503
class Slow(Reward):
    name, modalities = "slow", ("image",)

    def __init__(self, seconds):
        self.seconds, self.started = seconds, threading.Event()

    def score(self, *, prompts, **kwargs):
        self.started.set()
        time.sleep(self.seconds)
        return [1.0] * len(prompts)


def test_busy_scoring_slots_answer_503_with_retry_after_and_the_client_retries():
    body = json.dumps(encode_batch(["a"], images(1))).encode()
    slow = Slow(0.6)
    with serving(slow, queue_timeout=0.1) as server:
        first = threading.Thread(target=post, args=(server.url, body), kwargs={"token": ""})
        first.start()
        assert slow.started.wait(10)  # the first batch holds the only slot for 0.6 s
        status, headers, answer = post(server.url, body, token="")
        first.join()
        assert status == 503 and headers["retry-after"] == "1" and "scoring slot(s) taken" in answer["error"]
        # Three clients at once on one slot: two are refused at first, and get in on a retry.
        retrying = RemoteReward(server.url, retries=4, backoff=0.3)
        scores = []
        threads = [threading.Thread(target=lambda: scores.append(retrying(prompts=["a"], images=images(1)).scores))
                   for _ in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert scores == [[1.0]] * 3


def test_pending_body_budget_makes_later_bodies_wait_then_503():
    with serving("jpeg_compressibility", max_body_bytes=4000, max_pending_bytes=4000, queue_timeout=0.3,
                 read_timeout=5) as server:  # fmt: skip
        with socket.create_connection(address(server.url)) as holder:
            holder.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 3900\r\n\r\n{")  # holds 3900
            time.sleep(0.2)
            status, headers, body = post(server.url, b"{}" * 100, token="")
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"] == "busy: 3900 of 4000 pending body bytes held for 0.3s; retry later"
        assert post(server.url, json.dumps(encode_batch(["a"], images(1))).encode(), token="")[0] == 200


# ------------------------------------------------------------------------------------------------ the JSON scan
def _shape(obj):
    """(depth, values) as check_json_shape counts them: brackets and commas outside strings."""
    if isinstance(obj, (list, dict)):
        items = list(obj.values()) if isinstance(obj, dict) else obj
        inner = [_shape(x) for x in items]
        return 1 + max([d for d, _ in inner], default=0), max(len(items), 1) + sum(v for _, v in inner)
    return 0, 0


def _random_json(rng, depth=0):
    tricky = ["a[b", '{"', "\\", '\\"', '"]', ",", "é[", "\\\\[", "}}}", ""]
    kind = rng.randrange(4 if depth < 6 else 2)
    if kind == 0:
        return "".join(rng.choice(tricky) for _ in range(rng.randrange(5)))
    if kind == 1:
        return rng.choice([0, 1.5, None, True])
    if kind == 2:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        "".join(rng.choice(tricky) for _ in range(3)) + str(i): _random_json(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_json_scan_counts_depth_and_values_like_the_parser(monkeypatch, chunk):
    monkeypatch.setattr(server_mod, "_SCAN_CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(60):
        obj = [_random_json(rng)]
        depth, values = _shape(obj)
        for ascii_only in (True, False):
            raw = json.dumps(obj, ensure_ascii=ascii_only).encode()
            check_json_shape(raw, depth, values)
            with pytest.raises(LimitExceeded, match="nests deeper"):
                check_json_shape(raw, depth - 1, values)
            with pytest.raises(LimitExceeded, match="more than"):
                check_json_shape(raw, depth, values - 1)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="must be positive: read_timeout"):
        ServerLimits(read_timeout=0)
    with pytest.raises(ValueError, match="max_body_bytes must not exceed max_pending_bytes"):
        ServerLimits(max_body_bytes=10, max_pending_bytes=5)
    assert server_mod._byte_size("512M") == 512 << 20 and server_mod._byte_size("1GiB") == 1 << 30
