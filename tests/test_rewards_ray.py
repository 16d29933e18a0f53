"""A reward hosted in a Ray actor pool: one local Ray (2 CPUs) for the module, actors on fractional CPUs."""

import os

import numpy as np
import pytest

from lance_rl.rewards import RewardError, build_mix, load_reward

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()  # share a Ray that another test module left running, never stop it
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def images(n, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_pool_matches_local_scoring_in_order():
    from lance_rl.rewards.ray_pool import RayRewardPool

    ims = images(5)
    pool = RayRewardPool("jpeg_incompressibility", num_actors=2, num_cpus=0.25, num_gpus="auto")
    try:
        assert pool.name == "jpeg_incompressibility" and pool.modalities == ("image",)
        out = pool(prompts=[str(i) for i in range(5)], images=ims)
        local = load_reward("jpeg_incompressibility")(prompts=["x"] * 5, images=ims)
        assert out.scores == local.scores and out.details == local.details  # chunks put back in order
        with pytest.raises(Exception, match="scores image only"):
            pool(prompts=["a"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    finally:
        pool.close()


def test_pool_from_recipe_and_resource_errors():
    mix = build_mix({"jpeg_compressibility": {"weight": 1.0, "ray": {"num_actors": 1, "num_cpus": 0.25}}})
    try:
        out = mix(prompts=["a", "b"], images=images(2, seed=1))
        assert out.scores == out.details["jpeg_compressibility"] and all(s < 0 for s in out.scores)
    finally:
        mix.components[0].reward.close()
    available = ray.cluster_resources()
    too_many_gpus = available.get("GPU", 0) + 1
    with pytest.raises(ValueError, match="GPU exceed the Ray cluster's .* GPU; lower num_actors / num_gpus"):
        build_mix({"jpeg_compressibility": {"ray": {"num_cpus": 0.25, "num_gpus": too_many_gpus}}})
    with pytest.raises(ValueError, match="CPU exceed the Ray cluster's .* CPU"):
        build_mix({"jpeg_compressibility": {"ray": {"num_actors": int(available["CPU"]) + 1, "num_cpus": 1}}})


def test_pool_errors_are_reported_by_name(tmp_path):
    from lance_rl.rewards.ray_pool import RayRewardPool

    with pytest.raises(Exception, match="could not load the reward: ImportError: reward 'no_such_pkg.mod:fn': cannot import"):
        RayRewardPool("no_such_pkg.mod:fn", num_cpus=0.25)
    (tmp_path / "user_rewards.py").write_text(
        "def crashy(*, prompts, **kwargs):\n    raise RuntimeError('CUDA out of memory')\n"
    )
    # actor options pass through to Ray: here a runtime_env so the workers import the user's file
    ray_opts = {"num_cpus": 0.25, "runtime_env": {"env_vars": {"PYTHONPATH": str(tmp_path)}}}
    mix = build_mix({"user_rewards:crashy": {"ray": ray_opts, "retries": 1, "backoff": 0.01}})
    try:
        with pytest.raises(RewardError, match="reward 'user_rewards:crashy' failed for 1 sample.*CUDA out of memory"):
            mix(prompts=["a"], images=images(1))
    finally:
        mix.components[0].reward.close()
