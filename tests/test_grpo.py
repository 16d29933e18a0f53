"""The flow-GRPO maths on plain tensors: advantages with missing rewards and exact zero spread, the per-sample loss,
the KL in Flow-GRPO's units against the exact transition KL, and the EMA warm-up."""

import math

import pytest
import torch

from lance_rl.grpo import clipped_policy_loss, gaussian_kl, group_advantages
from lance_rl.model.schedule import sampling_timesteps, step

nan = float("nan")


def test_a_sample_without_reward_is_left_out_of_its_group_and_the_global_std():
    # The case: in a group [None, .9, .8, .85] the 0.8 sample must come out below its group's mean.
    rewards = torch.tensor([nan, 0.9, 0.8, 0.85, 0.1, 0.3, 0.2, 0.4])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups, global_std=True)
    present = torch.tensor([0.9, 0.8, 0.85, 0.1, 0.3, 0.2, 0.4], dtype=torch.float64)
    std = float(present.std(unbiased=False))
    assert adv.valid.tolist() == [False] + [True] * 7
    assert adv.values[0] == 0  # no reward: no advantage, and not trained
    assert adv.values[2] == pytest.approx((0.8 - 0.85) / (std + 1e-4), abs=1e-6)  # -1.22 with the issue's numbers' std
    assert adv.values[2] < 0 < adv.values[1]
    assert adv.group_mean[1] == pytest.approx(0.85)
    assert adv.trained().tolist() == [False] + [True] * 7


def test_group_std_ignores_missing_rewards_too():
    adv = group_advantages(torch.tensor([nan, 1.0, 3.0, 2.0]), torch.tensor([0, 0, 0, 0]), global_std=False)
    assert adv.values[1:].tolist() == pytest.approx([-1 / (math.sqrt(2 / 3) + 1e-4), 1 / (math.sqrt(2 / 3) + 1e-4), 0.0])


def test_zero_spread_is_detected_exactly_for_any_constant():
    # float32 std of a constant 0.7 is ~6e-8, above any epsilon test; max == min is exact.
    rewards = torch.tensor([0.7] * 4 + [0.1, 0.2, 0.3, 0.4], dtype=torch.float32)
    groups = torch.tensor([0] * 4 + [1] * 4)
    adv = group_advantages(rewards, groups)
    assert adv.zero_std.tolist() == [True] * 4 + [False] * 4
    assert (adv.values[:4] == 0).all()
    assert adv.trained(skip_zero_std=True).tolist() == [False] * 4 + [True] * 4
    assert adv.trained(skip_zero_std=False).all()
    # A group with one rewarded sample has no spread either.
    lone = group_advantages(torch.tensor([nan, nan, 0.5, 0.2, 0.3, 0.9]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert lone.zero_std.tolist() == [True] * 3 + [False] * 3


def test_the_loss_is_per_sample_so_masked_micro_batches_sum_to_the_one_pass_loss():
    torch.manual_seed(0)
    logp = torch.randn(8, requires_grad=True)
    old = logp.detach() + 1e-5 * torch.randn(8)
    adv = torch.randn(8)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.float32)
    whole = (clipped_policy_loss(logp, old, adv, 2e-4).per_sample * mask).sum() / mask.sum()
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = sum((clipped_policy_loss(logp[s], old[s], adv[s], 2e-4).per_sample * mask[s]).sum() / mask.sum()
                for s in (slice(0, 3), slice(3, 6), slice(6, 8)))  # fmt: skip
    (g_parts,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(g_parts, g_whole, atol=1e-7, rtol=0)
    assert g_whole[2] == 0 and g_whole[6] == 0  # masked samples get no gradient


def test_flow_grpo_kl_is_the_exact_transition_kl_times_dt():
    """Flow-GRPO divides |mu - mu_ref|^2 by 2 sigma_t^2; the transition's std is sigma_t sqrt(|dt|), so its KL is
    the exact KL times |dt|. That is why published beta values need Flow-GRPO's units."""
    torch.manual_seed(0)
    times = sampling_timesteps(10, 3.5)
    x = torch.randn(2, 16, 48)
    v, v_ref = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    for i in range(9):
        t, t_next = times[i], times[i + 1]
        out = step(x, v, t, t_next, "sde", 0.7)
        ref = step(x, v_ref, t, t_next, "sde", 0.7, x_next=out.prev_sample)
        flow_grpo = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean, out.noise_std)
        exact = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean, out.std_dev_t)
        torch.testing.assert_close(flow_grpo, exact * float(t - t_next), rtol=1e-5, atol=0)
    # At shift 3.5 the first step's |dt| is 1/32.5: published betas would act 32.5x too strongly in exact units.
    assert 1 / float(times[0] - times[1]) == pytest.approx(32.5, rel=0.01)
    # CPS reports its transition std: there the two units agree.
    out = step(x, v, times[2], times[3], "cps", 0.8)
    torch.testing.assert_close(out.noise_std, out.std_dev_t)


def test_ema_warms_up_as_flow_grpo():
    from lance_rl.policy import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.9, warmup=True)
    expected = torch.zeros(3)
    for k in range(1, 12):
        with torch.no_grad():
            p.add_(1.0)
        ema.step({"p": p})
        decay = 0.0 if k == 1 else min(0.9, k / (9 + k))  # Flow-GRPO's (1 + s) / (10 + s), s = k - 1
        expected = decay * expected + (1 - decay) * p.detach()
        assert ema.decay == pytest.approx(decay)
        torch.testing.assert_close(ema.weights()["p"], expected)
    fixed = EMA({"p": p}, decay=0.9, warmup=False)
    fixed.step({"p": p})
    fixed.step({"p": p})
    assert fixed.decay == pytest.approx(0.9)


def test_ema_swaps_in_without_copying_and_back():
    from lance_rl.policy import EMA

    p = torch.nn.Parameter(torch.ones(4))
    ema = EMA({"p": p}, decay=0.5, warmup=False)
    ema.step({"p": p})
    with torch.no_grad():
        p.mul_(3)
    ema.step({"p": p})
    storage = p.data.data_ptr()
    with ema.swapped_in({"p": p}):
        assert p.data.data_ptr() == ema.weights()["p"].data_ptr()
        torch.testing.assert_close(p.detach(), torch.full((4,), 2.0))
    assert p.data.data_ptr() == storage and bool((p == 3).all())
