"""The HTTP reward server and client on loopback: round trips, auth, errors, a server that dies, one that hangs."""

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lance_rl.rewards import FailurePolicy, Reward, RewardError, build_mix, load_reward, score_with_policy
from lance_rl.rewards.remote import RemoteReward, RemoteRewardError, decode_video, encode_video, main
from lance_rl.rewards.server import make_server

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff=0.01)


def images(n, seed=0, size=32):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


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


class Echo(Reward):
    """Reports what arrived, to check the transport; NaN for the prompt "nan"; raises for the prompt "boom"."""

    name, modalities = "echo", ("image", "video")

    def __init__(self):
        self.calls = 0

    def score(self, *, prompts, images=None, videos=None, conditions=None, metadata=None, **kwargs):
        self.calls += 1
        if "boom" in prompts:
            raise RuntimeError("model exploded")
        media = images if images is not None else videos
        return [float("nan") if p == "nan" else float(m.astype(np.int64).sum()) for p, m in zip(prompts, media)], {
            "shape": [list(m.shape) for m in media],
            "condition_sum": [None if c is None else int(c.astype(np.int64).sum()) for c in conditions or [None] * len(prompts)],
            "meta": [m.get("k") for m in metadata or [{}] * len(prompts)],
        }


def test_round_trip_images_videos_conditions_metadata():
    echo = Echo()
    ims, cond = images(2), images(1, seed=1)[0]
    with serving(echo, token="s3cret") as server:
        client = RemoteReward(server.url, token="s3cret", retries=0)
        assert client.info() == {"protocol": "lance-rl-reward/1", "name": "echo", "modalities": ["image", "video"]}
        out = client(prompts=["a", "b"], images=ims, conditions=[cond, None], metadata=[{"k": 1}, {"k": "x"}])
        assert out.scores == [float(i.astype(np.int64).sum()) for i in ims]  # PNG is lossless
        assert out.details == {"shape": [[32, 32, 3]] * 2, "condition_sum": [int(cond.astype(np.int64).sum()), None], "meta": [1, "x"]}
        video = np.stack(images(3, seed=2, size=34))[:, :, :33]  # odd width: padded for H.264, cropped back
        lossless = RemoteReward(server.url, token="s3cret", video_format="png")(prompts=["v"], videos=[video])
        assert lossless.scores == [float(video.astype(np.int64).sum())]
        lossy = client(prompts=["v"], videos=[video])
        assert lossy.details["shape"] == [[3, 34, 33, 3]]


def test_builtin_reward_served_matches_local():
    ims = images(3, seed=3)
    local = load_reward("jpeg_incompressibility")(prompts=["x"] * 3, images=ims)
    with serving("jpeg_incompressibility") as server:
        mix = build_mix({"remote": {"kwargs": {"url": server.url, "retries": 0}, "weight": 2.0}})
        out = mix(prompts=["x"] * 3, images=ims)
    assert out.details["remote"] == local.scores and out.scores == [2 * s for s in local.scores]


def test_auth_and_bad_requests_fail_at_once_with_the_server_message():
    echo = Echo()
    with serving(echo, token="right") as server:
        with pytest.raises(RemoteRewardError, match="HTTP 401.*missing or wrong token"):
            RemoteReward(server.url, token="wrong", retries=3, backoff=10)(prompts=["a"], images=images(1))
    with serving("jpeg_compressibility") as server:
        with pytest.raises(RemoteRewardError, match="HTTP 400.*'jpeg_compressibility' scores image only"):
            RemoteReward(server.url, retries=3, backoff=10)(prompts=["a"], videos=[np.zeros((2, 16, 16, 3), np.uint8)])
    assert echo.calls == 0


def test_reward_error_on_server_is_retried_then_reported():
    echo = Echo()
    with serving(echo) as server:
        client = RemoteReward(server.url, retries=2, backoff=0.01, name="judge")
        with pytest.raises(RemoteRewardError, match=r"'judge'.*after 3 attempt\(s\).*HTTP 500.*RuntimeError: model exploded"):
            client(prompts=["boom"], images=images(1))
        assert echo.calls == 3
        # NaN travels as "nan" (strict JSON) and counts as a failed sample under the policy
        out = score_with_policy(client, FailurePolicy(retries=0, on_failure="none"), prompts=["nan", "ok"], images=images(2))
        assert out.scores[0] is None and out.scores[1] > 0 and "returned nan" in out.details["failed"][0]


def test_server_that_hangs_times_out():
    release = threading.Event()

    class Hang(Reward):
        name = "hang"

        def score(self, *, prompts, **kwargs):
            release.wait(10)
            return [1.0] * len(prompts)

    with serving(Hang(), max_concurrency=4) as server:
        try:
            client = RemoteReward(server.url, timeout=0.2, retries=1, backoff=0.01)
            with pytest.raises(RemoteRewardError, match=r"after 2 attempt\(s\); last error: no answer within 0.2s"):
                client(prompts=["a"], images=images(1))
        finally:
            release.set()


def test_cli_server_that_dies(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LANCE_RL_REWARD_TOKEN="t0k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lance_rl.rewards.remote", "--reward", "jpeg_compressibility", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "serving reward 'jpeg_compressibility' on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        client = RemoteReward(url, token="t0k", retries=2, backoff=0.01, timeout=30)
        ims = images(2)
        assert client(prompts=["a", "b"], images=ims).scores == load_reward("jpeg_compressibility")(prompts=["a", "b"], images=ims).scores
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RemoteRewardError, match=r"after 3 attempt\(s\); last error: ConnectionRefusedError") as e:
        client(prompts=["a", "b"], images=ims)
    assert e.value.indices == [0, 1]
    # in a mix, the policy reports it by name and does not retry the client's retries again
    mix = build_mix({"remote": {"kwargs": {"url": url, "retries": 0}, "retries": 5, "backoff": 10}})
    with pytest.raises(RewardError, match=r"reward 'remote' failed for 1 sample\(s\): samples 0: http.*after 1 attempt\(s\)"):
        mix(prompts=["a"], images=ims[:1])


def test_cli_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["--reward", "jpeg_compressibility", "--kwargs", "{not json"])
    assert "--kwargs is not valid JSON" in capsys.readouterr().err


def test_video_codec_helpers_keep_shape():
    video = np.stack(images(5, seed=4, size=20))
    assert decode_video(encode_video(video, "png")).tolist() == video.tolist()
    assert decode_video(encode_video(video, "mp4")).shape == video.shape
