"""The policy-update algorithms the RL recipe can run, on the same rollouts, rewards, advantages, evaluation and
checkpoints (`algorithm.name`):

    flow_grpo      Flow-GRPO: PPO-clipped ratio of each recorded SDE step's log-probability (+ Gaussian KL)
    mix_grpo       MixGRPO: Flow-GRPO on a window of SDE steps that slides from high to low noise over training
    grpo_guard     GRPO-Guard: Flow-GRPO with the ratio normalised per step (RatioNorm) and the steps reweighted
    diffusion_nft  DiffusionNFT: ODE rollouts, no likelihoods; the velocity is trained on the forward process toward
                   the good samples and away from the bad ones (negative-aware flow matching)

Each algorithm supplies how rollouts sample (`sampler`), the loss of one group (`group_loss`, which runs backward
micro-batch by micro-batch), what the workers sample with (`sampling_weights`) and what happens after an update
(`after_update`). The maths are pure functions in grpo.py; the recipe (rl.py) provides the prefixes, the reference
and the precision context.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lance_rl.grpo import (
    clipped_policy_loss,
    gaussian_kl,
    nft_loss,
    optimality_probability,
    ratio_norm_log_ratio,
)


def _tensor(array: np.ndarray, device) -> torch.Tensor:
    # Ray hands back read-only arrays: np.require copies those into writable ones.
    return torch.from_numpy(np.require(array, requirements="W")).to(device)


class FlowGRPO:
    """Flow-GRPO (Liu et al. 2025, its `train_sd3.py`): for every recorded step, the PPO-clipped objective on
    exp(log p_theta - log p_old) of the stored transition, plus beta times the KL of the two Gaussian steps."""

    name = "flow_grpo"
    record_means = False

    def __init__(self, recipe):
        self.recipe = recipe
        self.cfg = recipe.cfg.algorithm

    def start(self) -> None:
        """Called once the policy is built (before any rollout)."""

    # ---------------------------------------------------------------- rollouts
    def sampler(self, sampler, update: int, rng):
        """The update's SamplerConfig: a random window of `window_size` steps inside `window_range` (Flow-GRPO-Fast)
        or every step but the last."""
        s = self.recipe.cfg.sampler
        first, stop = s.trained_range
        if s.window_size:
            first = rng.randint(first, stop - s.window_size)
            stop = first + s.window_size
        return dataclasses.replace(sampler, sde_window=(first, stop), record_means=self.record_means)

    def sampling_weights(self):
        """The weights rollouts sample with: None for the current policy."""
        return None

    def terms_per_sample(self, result, sampler) -> int:
        return len(result.steps)

    def after_update(self, optimizer_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- the loss
    def group_loss(self, res, req, sampler, adv, trained, terms: int, stats: dict) -> None:
        """Backward through every recorded step of one group's trained samples, `micro_batch_size` rows at a time;
        each term is divided by the minibatch's number of terms, so the accumulated gradient is the one-pass one."""
        from lance_rl.model.sampling import velocity
        from lance_rl.model.schedule import step

        r, a = self.recipe, self.cfg
        dev = r.device
        x_t, x_next, old, times = (_tensor(x, dev) for x in (res.x_t, res.x_next, res.log_probs, res.timesteps))
        old_means = _tensor(res.means, dev) if self.record_means else None
        adv, trained = adv.to(dev), trained.to(dev)
        shaped_by_training = r.policy.prefix_depends_on_training(req.task)
        for rows, mask, prefix, ref_prefix in self._micro_batches(req, trained, shaped_by_training):
            for j, i in enumerate(res.steps):
                t, t_next = times[i], times[i + 1]
                with r.policy.autocast():
                    v = velocity(r.policy.model, x_t[rows, j], t, prefix, sampler.cfg, uncond_grad=a.cfg_grad == "full")
                out = step(x_t[rows, j], v, t, t_next, sampler.kind, sampler.noise_level, x_next=x_next[rows, j],
                           moving=prefix.moving)  # fmt: skip
                pl = self.policy_loss(out, old[rows, j], adv[rows], None if old_means is None else old_means[rows, j],
                                      float(t - t_next))  # fmt: skip
                loss = (pl.per_sample * mask).sum()
                if a.beta > 0:
                    with torch.no_grad(), r.policy.reference(r.reference_weights), r.policy.autocast():
                        v_ref = velocity(r.policy.model, x_t[rows, j], t, ref_prefix, sampler.cfg)
                    ref = step(x_t[rows, j], v_ref, t, t_next, sampler.kind, sampler.noise_level,
                               x_next=x_next[rows, j], moving=prefix.moving)  # fmt: skip
                    kl = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean,
                                     out.noise_std if a.kl_units == "flow_grpo" else out.std_dev_t)  # fmt: skip
                    loss = loss + a.beta * (kl * mask).sum()
                    keep = mask.bool()
                    stats["kl"].append(kl.detach()[keep].cpu())
                    stats["kl_exact"].append(gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean,
                                                         out.std_dev_t).detach()[keep].cpu())  # fmt: skip
                # A prefix built with gradients is shared by every step: keep its graph until the last one.
                (loss / terms).backward(retain_graph=shaped_by_training and j < len(res.steps) - 1)
                keep = mask.bool().cpu()
                stats["policy_loss"].append(pl.per_sample.detach().cpu()[keep])
                stats["log_ratio"].append(pl.log_ratio.cpu()[keep])
                stats["clipped"].append(pl.clipped.cpu()[keep])
                stats["ratio"].append(pl.ratio.cpu()[keep])
                stats["ratio_by_step"].setdefault(i, []).append(pl.ratio.cpu()[keep])

    def policy_loss(self, out, old_log_prob, adv, old_mean, dt: float):
        return clipped_policy_loss(out.log_prob, old_log_prob, adv, self.cfg.clip_range, self.cfg.clip_range_high)

    def _micro_batches(self, req, trained, shaped_by_training):
        """(rows, mask, prefix, reference prefix) per micro-batch with at least one trained sample. The prefix is
        one row repeated (a view); where trainable weights shape it, it carries gradients and the reference builds
        its own."""
        r, a = self.recipe, self.cfg
        size = a.micro_batch_size or len(trained)
        for start in range(0, len(trained), size):
            rows = slice(start, min(start + size, len(trained)))
            mask = trained[rows].float()
            if not bool(mask.any()):
                continue
            n = rows.stop - rows.start
            prefix = r.prefix(req, grad=shaped_by_training).repeat(n)
            ref_prefix = None
            if a.beta > 0:
                ref_prefix = r.prefix(req, grad=False, reference=True).repeat(n) if shaped_by_training else prefix
            yield rows, mask, prefix, ref_prefix


class MixGRPO(FlowGRPO):
    """MixGRPO (Li et al. 2025, Tencent-Hunyuan/MixGRPO `grpo_states.py`): the SDE window is not random but slides:
    it starts at the first step of `sampler.window_range` (the highest noise) and moves `algorithm.mix.stride`
    steps later every `algorithm.mix.shift_every` updates, wrapping back to the start at the end of the range. ODE
    steps elsewhere; only window steps are trained."""

    name = "mix_grpo"

    def sampler(self, sampler, update: int, rng):
        return dataclasses.replace(sampler, sde_window=self.window(update), record_means=False)

    def window(self, update: int) -> tuple[int, int]:
        s, m = self.recipe.cfg.sampler, self.cfg.mix
        first, stop = s.trained_range
        size = s.window_size or 1
        positions = stop - size - first + 1  # window starts that fit the range
        start = first + (update // m.shift_every * m.stride) % positions
        return start, start + size


class GRPOGuard(FlowGRPO):
    """GRPO-Guard (Wang et al. 2025, flow_grpo's `train_sd3_GRPO_Guard.py`): RatioNorm replaces each step's
    log-ratio with (log p - log p_old + |mu - mu_old|^2 / (2 s^2)) s, removing the bias that puts the ratio below 1
    at low noise, and the clipped loss is divided by |dt|, which weights every step equally (grpo.ratio_norm_log_ratio)."""

    name = "grpo_guard"
    record_means = True

    def policy_loss(self, out, old_log_prob, adv, old_mean, dt: float):
        log_ratio = ratio_norm_log_ratio(out.log_prob, old_log_prob, out.prev_sample_mean, old_mean, out.std_dev_t)
        # clipped_policy_loss exponentiates log_prob - old_log_prob: hand it the normalised log-ratio that way.
        pl = clipped_policy_loss(log_ratio, torch.zeros_like(log_ratio), adv, self.cfg.clip_range, self.cfg.clip_range_high)
        return dataclasses.replace(pl, per_sample=pl.per_sample / abs(dt))


class DiffusionNFT(FlowGRPO):
    """DiffusionNFT (Zheng et al. 2025, NVlabs/DiffusionNFT `train_nft_sd3.py`): rollouts with the ODE (any solver,
    no log-probabilities), sampled by an "old" policy that trails the current one (old <- eta old + (1 - eta) theta,
    eta = min(rate (k - flat), max) over optimizer steps k); each sample is noised again at `sampler.window_size`
    timesteps of the sampling grid (drawn per sample inside `sampler.window_range`; 0: all of it), and the velocity
    is trained with the negative-aware loss (grpo.nft_loss) weighted by the sample's optimality probability r from
    its advantage. beta > 0 adds beta |v - v_ref|^2 toward the reference. The authors sample and train without CFG
    (guidance 1.0 in their configs); with `sampler.cfg_scale` > 1 the guided velocity is the one sampled and trained."""

    name = "diffusion_nft"

    def start(self) -> None:
        self.old = {n: p.detach().clone() for n, p in self.recipe.trainable.items()}

    def sampler(self, sampler, update: int, rng):
        return dataclasses.replace(sampler, kind="ode", sde_window=None, record_means=False)

    def sampling_weights(self):
        return self.old

    def terms_per_sample(self, result, sampler) -> int:
        # The recipe check keeps window_size within the range; 0 trains the whole range.
        return self.recipe.cfg.sampler.window_size or len(self._grid())

    def training_steps(self, num_samples: int, gen: torch.Generator) -> torch.Tensor:
        """[num_samples, terms]: for each sample, `sampler.window_size` distinct steps of the grid drawn at random
        inside `sampler.window_range` (all of them, shuffled, with window_size 0), so a group trains the whole range."""
        grid, k = torch.tensor(self._grid()), self.terms_per_sample(None, None)
        return torch.stack([grid[torch.randperm(len(grid), generator=gen)[:k]] for _ in range(num_samples)])

    def _grid(self) -> list[int]:
        """The steps of the sampling grid whose timesteps a sample may be trained at (`sampler.window_range`)."""
        return list(range(*self.recipe.cfg.sampler.trained_range))

    def after_update(self, optimizer_steps: int) -> None:
        n = self.cfg.nft
        eta = min(max(0.0, n.old_decay_rate * (optimizer_steps - n.old_decay_flat)), n.old_decay_max)
        with torch.no_grad():
            for name, p in self.recipe.trainable.items():
                self.old[name].mul_(eta).add_(p.detach(), alpha=1 - eta)

    def state_dict(self) -> dict:
        return {"old": self.old}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["old"].items():
                self.old[name].copy_(value)

    def group_loss(self, res, req, sampler, adv, trained, terms: int, stats: dict) -> None:
        from lance_rl.model.sampling import velocity
        from lance_rl.policy import swap_parameters

        r, a = self.recipe, self.cfg
        dev = r.device
        x0_all, times = _tensor(res.latents, dev).float(), _tensor(res.timesteps, dev)
        prob = optimality_probability(adv.to(dev), a.adv_clip_max)
        trained = trained.to(dev)
        shaped_by_training = r.policy.prefix_depends_on_training(req.task)
        terms_per_sample = self.terms_per_sample(res, sampler)
        # Per sample its own steps and fresh noise, seeded by (run, update, request).
        seed = (r.cfg.train.seed * 1_000_003 + r.update) * 10_007 + req.request_id
        gen = torch.Generator().manual_seed(seed)
        order = self.training_steps(len(adv), gen)
        noise = torch.randn((terms_per_sample, *x0_all.shape), generator=gen).to(dev)
        for rows, mask, prefix, ref_prefix in self._micro_batches(req, trained, shaped_by_training):
            x0 = x0_all[rows]
            for k in range(terms_per_sample):
                t = times[order[rows, k].to(dev)].float()  # [n]: each row its own timestep
                x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise[k, rows]
                with r.policy.autocast():
                    v = velocity(r.policy.model, x_t, t, prefix, sampler.cfg, uncond_grad=a.cfg_grad == "full")
                with torch.no_grad(), swap_parameters(r.trainable, self.old), r.policy.autocast():
                    v_old = velocity(r.policy.model, x_t, t, prefix, sampler.cfg)
                out = nft_loss(v.float(), v_old.float(), x0, x_t, t, prob[rows], a.nft.beta, a.adv_clip_max)
                loss = (out.per_sample * mask).sum()
                if a.beta > 0:
                    with torch.no_grad(), r.policy.reference(r.reference_weights), r.policy.autocast():
                        v_ref = velocity(r.policy.model, x_t, t, ref_prefix, sampler.cfg)
                    kl = ((v.float() - v_ref.float()) ** 2).mean(dim=(1, 2))
                    loss = loss + a.beta * (kl * mask).sum()
                    stats["kl"].append(kl.detach()[mask.bool()].cpu())
                (loss / terms).backward(retain_graph=shaped_by_training and k < terms_per_sample - 1)
                keep = mask.bool().cpu()
                stats["policy_loss"].append(out.per_sample.detach().cpu()[keep])
                stats["nft_positive"].append(out.positive.cpu()[keep])
                stats["nft_negative"].append(out.negative.cpu()[keep])


ALGORITHMS = {cls.name: cls for cls in (FlowGRPO, MixGRPO, GRPOGuard, DiffusionNFT)}
