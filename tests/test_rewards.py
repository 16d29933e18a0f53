"""The reward contract, registry, weighted mix and async runner (no model weights needed)."""

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import yaml

from lance_rl.rewards import (
    FailurePolicy,
    ModalityError,
    Reward,
    RewardError,
    RewardMix,
    RewardOutput,
    RewardRunner,
    as_mix,
    build_mix,
    load_reward,
    reward,
    score_with_policy,
)
from lance_rl.rewards.registry import REGISTRY, UnknownRewardError
from lance_rl.rewards.failure import call_with_timeout


def images(n, seed=0, size=32):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def flat(n, value=128, size=32):
    return [np.full((size, size, 3), value, np.uint8) for _ in range(n)]


@reward(name="const", modalities=("image",))
def const(*, prompts, value=1.0, **kwargs):
    return [value] * len(prompts)


# ------------------------------------------------------------------------------------------------ contract
def test_import_is_light():
    code = "import sys, rewards; print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'onnxruntime', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_function_and_class_forms():
    class Brightness(Reward):
        name, modalities = "brightness", ("image", "video")

        def score(self, *, images=None, videos=None, **kwargs):
            media = images if images is not None else videos
            return [float(m.mean()) / 255 for m in media], {"raw": [float(m.mean()) for m in media]}

    r = Brightness()
    out = r(prompts=["a", "b"], images=flat(2, 255))
    assert out.scores == [1.0, 1.0] and out.details["raw"] == [255.0, 255.0]
    assert r(prompts=["a"], videos=[np.zeros((3, 8, 8, 3), np.uint8)]).scores == [0.0]
    assert const(prompts=["a", "b"], images=flat(2)).scores == [1.0, 1.0]

    def plain(prompts, images):  # no **kwargs: receives only what it names
        return np.array([len(p) for p in prompts])

    assert load_reward(plain)(prompts=["ab", "c"], images=flat(2), metadata=[{}, {}]).scores == [2.0, 1.0]


def test_modality_and_batch_errors_are_clear():
    with pytest.raises(ModalityError, match="'const' scores image only, but was given videos"):
        const(prompts=["a"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(ModalityError, match="exactly one of images= or videos="):
        const(prompts=["a"])
    with pytest.raises(ModalityError, match="uint8 RGB"):
        const(prompts=["a"], images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ModalityError, match="got 1 images for 2 prompts"):
        const(prompts=["a", "b"], images=flat(1))
    bad = load_reward(lambda **kw: [1.0])
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
        bad(prompts=["a", "b"], images=flat(2))


def test_registry_names_paths_and_errors(tmp_path, monkeypatch):
    assert REGISTRY["shapes"] == "lance_rl.rewards.shapes:ShapesReward"  # written elsewhere; resolved lazily
    with pytest.raises(UnknownRewardError, match="unknown reward 'nope'.*clip_score.*package.module:callable"):
        load_reward("nope")
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_mod.py").write_text(textwrap.dedent("""
        def score(*, prompts, images, scale=1.0, **kwargs):
            return [scale * float(im.mean() > 100) for im in images]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_reward("my_pkg.my_mod:score", scale=2.0)
    assert r.name == "my_pkg.my_mod:score" and r(prompts=["x"], images=flat(1, 200)).scores == [2.0]
    with pytest.raises(ImportError, match="has no attribute 'nothing'"):
        load_reward("my_pkg.my_mod:nothing")
    # the README's one-line recipe
    recipe = yaml.safe_load("rewards: {my_pkg.my_mod:score: 1.0, jpeg_compressibility: 0.5}")
    out = build_mix(recipe["rewards"])(prompts=["x", "y"], images=flat(2, 200))
    assert out.details["my_pkg.my_mod:score"] == [1.0, 1.0]
    assert out.scores == pytest.approx([1.0 + 0.5 * s for s in out.details["jpeg_compressibility"]])


def test_jpeg_rewards():
    noisy, plain = images(1)[0], flat(1)[0]
    inc = load_reward("jpeg_incompressibility")(prompts=["a", "b"], images=[noisy, plain])
    comp = load_reward("jpeg_compressibility")(prompts=["a", "b"], images=[noisy, plain])
    assert inc.scores[0] > inc.scores[1] > 0
    assert comp.scores == [-s for s in inc.scores] and comp.details["kb"] == inc.scores


# ------------------------------------------------------------------------------------------------ mix
def test_mix_reports_components_and_total_with_none_reweighting():
    @reward(name="half")
    def half(*, prompts, **kwargs):  # applies to even samples only
        return [0.5 if i % 2 == 0 else None for i in range(len(prompts))]

    mix = build_mix({"a": {"reward": const, "weight": 2.0}, "b": {"reward": half, "weight": 1.0}})
    out = mix(prompts=["p"] * 4, images=flat(4))
    assert out.details["a"] == [1.0] * 4 and out.details["b"] == [0.5, None, 0.5, None]
    # all apply: plain weighted sum; only `a` applies: re-weighted by (2 + 1) / 2
    assert out.scores == pytest.approx([2.5, 3.0, 2.5, 3.0])
    nobody = build_mix({"b": {"reward": half}})(prompts=["p"] * 2, images=flat(2))
    assert nobody.scores == [0.5, None]


def test_mix_options_are_checked():
    with pytest.raises(ValueError, match="unknown option.*'wieght'"):
        build_mix({"jpeg_compressibility": {"wieght": 1.0}})
    with pytest.raises(ValueError, match="normalize must be one of"):
        build_mix({"jpeg_compressibility": {"normalize": "zscore"}})
    with pytest.raises(ValueError, match="non-empty mapping"):
        build_mix({})


def test_normalisation_batch_and_running():
    @reward(name="idx")
    def idx(*, prompts, **kwargs):
        return [float(p) for p in prompts]

    batch = build_mix({"idx": {"reward": idx, "normalize": "batch"}})
    out = batch(prompts=["1", "2", "3"], images=flat(3))
    assert out.details["idx"] == [1.0, 2.0, 3.0] and np.mean(out.scores) == pytest.approx(0)
    assert np.std(out.scores) == pytest.approx(1, abs=1e-4)
    running = build_mix({"idx": {"reward": idx, "normalize": "running"}})
    running(prompts=["0", "10"], images=flat(2))
    second = running(prompts=["5"], images=flat(1))  # mean of 0, 10, 5 is 5
    assert second.scores == pytest.approx([0.0]) and second.details["idx/normalized"] == second.scores
    state = running.state_dict()
    fresh = build_mix({"idx": {"reward": idx, "normalize": "running"}})
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and state["idx"]["count"] == 3


# ------------------------------------------------------------------------------------------------ failure policy
class Flaky(Reward):
    """Fails (raises, NaN, or sleeps) for the first `fail_times` calls."""

    name = "flaky"

    def __init__(self, mode, fail_times=1):
        self.mode, self.fail_times, self.calls = mode, fail_times, []

    def score(self, *, prompts, **kwargs):
        self.calls.append(list(prompts))
        failing = len(self.calls) <= self.fail_times
        if failing and self.mode == "raise":
            raise RuntimeError("scorer crashed")
        if failing and self.mode == "sleep":
            time.sleep(1.0)
        return [float("nan") if failing and self.mode == "nan" and p == "bad" else 1.0 for p in prompts]


FAST = dict(backoff=0.01)


def test_exception_is_retried_then_reported_with_name():
    r = Flaky("raise", fail_times=1)
    assert score_with_policy(r, FailurePolicy(retries=1, **FAST), prompts=["a", "b"], images=flat(2)).scores == [1.0, 1.0]
    r = Flaky("raise", fail_times=5)
    with pytest.raises(RewardError, match=r"reward 'flaky' failed for 2 sample\(s\): samples 0-1: RuntimeError: scorer crashed") as e:
        score_with_policy(r, FailurePolicy(retries=2, **FAST), prompts=["a", "b"], images=flat(2))
    assert e.value.indices == [0, 1] and len(r.calls) == 3


def test_nan_retries_only_the_nan_samples():
    r = Flaky("nan", fail_times=1)
    out = score_with_policy(r, FailurePolicy(retries=1, **FAST), prompts=["ok", "bad", "ok"], images=flat(3))
    assert out.scores == [1.0, 1.0, 1.0] and r.calls == [["ok", "bad", "ok"], ["bad"]]
    r = Flaky("nan", fail_times=9)
    with pytest.raises(RewardError, match="samples 1: returned nan"):
        score_with_policy(r, FailurePolicy(retries=1, **FAST), prompts=["ok", "bad"], images=flat(2))
    out = score_with_policy(Flaky("nan", 9), FailurePolicy(retries=0, on_failure="none"), prompts=["ok", "bad"], images=flat(2))
    assert out.scores == [1.0, None] and out.details["failed"][0] is None and "nan" in out.details["failed"][1]


def test_timeout_is_retried_and_reported():
    r = Flaky("sleep", fail_times=1)
    out = score_with_policy(r, FailurePolicy(retries=1, timeout=0.2, **FAST), prompts=["a"], images=flat(1))
    assert out.scores == [1.0]
    with pytest.raises(RewardError, match="timed out after 0.1s"):
        score_with_policy(Flaky("sleep", 5), FailurePolicy(retries=0, timeout=0.1), prompts=["a"], images=flat(1))
    with pytest.raises(TimeoutError):
        call_with_timeout(lambda: time.sleep(0.5), 0.05)


def test_failed_component_in_mix_names_it_and_never_scores_zero():
    mix = build_mix({"good": {"reward": const}, "bad": {"reward": Flaky("raise", 9), "retries": 0}})
    with pytest.raises(RewardError, match="'flaky'"):
        mix(prompts=["a"], images=flat(1))
    lenient = build_mix({"good": {"reward": const, "weight": 1.0},
                         "bad": {"reward": Flaky("raise", 9), "retries": 0, "on_failure": "none", "weight": 3.0}})
    out = lenient(prompts=["a"], images=flat(1))
    assert out.details["bad"] == [None] and "scorer crashed" in out.details["bad/failed"][0]
    assert out.scores == [4.0]  # the total over the reward that applied, re-weighted to the full weight


# ------------------------------------------------------------------------------------------------ async runner
def test_runner_returns_results_in_submission_order_and_overlaps():
    names = ("1", "2", "3")
    started = {p: threading.Event() for p in names}
    release = {p: threading.Event() for p in names}

    @reward(name="slow")
    def slow(*, prompts, **kwargs):
        started[prompts[0]].set()
        assert release[prompts[0]].wait(10)
        return [float(p) for p in prompts]

    mix = build_mix({"slow": {"reward": slow, "normalize": "running"}})
    with RewardRunner(mix, max_workers=3) as runner:
        futures = [runner.submit(prompts=[p], images=flat(1)) for p in names]
        assert all(started[p].wait(10) for p in names)  # all three score at once, while the caller goes on
        assert not any(f.done() for f in futures)
        release["3"].set()  # the last batch finishes first ...
        time.sleep(0.05)
        assert not futures[2].done()  # ... but its result waits for the earlier batches' running statistics
        release["2"].set()
        release["1"].set()
        outs = [f.result() for f in futures]
    assert [o.details["slow"] for o in outs] == [[1.0], [2.0], [3.0]]
    # running statistics were updated in submission order: identical to scoring the batches one by one
    ref = build_mix({"slow": {"reward": slow, "normalize": "running"}})
    assert [o.scores for o in outs] == [ref(prompts=[p], images=flat(1)).scores for p in names]


def test_runner_wraps_a_single_reward_and_propagates_errors():
    with RewardRunner(as_mix("jpeg_incompressibility", FailurePolicy(retries=0)), max_workers=2) as runner:
        out = runner.score(prompts=["a"], images=images(1))
        assert out.details["jpeg_incompressibility"] == out.scores
        bad = runner.submit(prompts=["a"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
        good = runner.submit(prompts=["a"], images=flat(1))
        with pytest.raises(ModalityError):
            bad.result()
        assert good.result().scores[0] > 0  # later batches still run


def test_runner_is_thread_safe_under_load():
    lock, seen = threading.Lock(), []

    @reward(name="count")
    def count(*, prompts, **kwargs):
        with lock:
            seen.extend(prompts)
        return [float(p) for p in prompts]

    with RewardRunner(as_mix(count), max_workers=4) as runner:
        outs = runner.map([{"prompts": [str(i)], "images": flat(1)} for i in range(20)])
    assert [o.scores[0] for o in outs] == [float(i) for i in range(20)] and sorted(map(int, seen)) == list(range(20))


def test_reward_output_shapes():
    out = RewardOutput([1.0, None], {"x": [1, 2]})
    assert len(out) == 2
    assert isinstance(build_mix({"const": {"reward": const}}), RewardMix)
