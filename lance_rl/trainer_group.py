"""The RL trainer's ranks: N processes under torchrun (NCCL on GPUs, gloo on CPUs) forming one torch.distributed
group, each updating its share of the groups; or one process alone, where every method is a no-op.

    torchrun --nproc_per_node 8 -m lance_rl.cli rl --config RECIPE train.num_trainers=8

How the update stays the one a single process makes, whatever N:
- every rank plans the same update (prompts, seeds and window come from (seed, update));
- group g belongs to rank g % N; rewards are gathered so every rank computes the same advantages, global std included;
- each rank's loss terms are divided by the number of terms of the whole minibatch, and the gradients are summed
  across ranks (an all-reduce, as DDP does) before the identical optimizer step on every rank;
- in split mode rank 0 drives the Ray rollout workers and the rewards for all groups and sends each rank the
  tensors of its groups (no pickle: shapes, then the arrays); in colocated mode each rank samples its own groups.
Rank 0 alone writes metrics and checkpoints, evaluates and syncs weights to the workers.
"""

from __future__ import annotations

import os

import numpy as np
import torch


class TrainerGroup:
    def __init__(self, num_trainers: int = 1):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != num_trainers:
            raise ValueError(
                f"train.num_trainers is {num_trainers} but {world} process(es) were launched: start the run with "
                f"`torchrun --nproc_per_node {num_trainers} -m lance_rl.cli rl --config ...`"
            )
        self.world = world
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))  # this rank's GPU on its node
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # trainer ranks (GPUs) on this node
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, group: int) -> bool:
        return group % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in one flat buffer (a rank without a gradient adds 0)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def gather_rewards(self, mine: dict[int, list[float | None]], num_groups: int, group_size: int) -> torch.Tensor:
        """[num_groups * group_size] float64 rewards of every rank's groups, NaN where a sample has none."""
        values = torch.zeros(num_groups, group_size, dtype=torch.float64)
        present = torch.zeros(num_groups, group_size, dtype=torch.float64)
        for g, scores in mine.items():
            for j, s in enumerate(scores):
                if s is not None:
                    values[g, j], present[g, j] = s, 1.0
        if self.world > 1:
            torch.distributed.all_reduce(values)
            torch.distributed.all_reduce(present)
        return torch.where(present > 0, values, torch.full_like(values, float("nan"))).reshape(-1)

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """{name: {mean, std, count, max, min}} over every rank's values of each name (a name any rank has), so the
        logged statistics are those of the whole update, not of rank 0's share."""
        names = self._all_names(sorted(values))
        sums, extremes = [], []
        for name in names:
            x = values.get(name, torch.zeros(0)).detach().double().reshape(-1)
            empty = x.numel() == 0
            sums.append([x.sum(), (x * x).sum(), x.numel()])
            extremes.append([-torch.inf if empty else x.max(), -torch.inf if empty else -x.min()])
        sums_t = torch.tensor(sums, dtype=torch.float64).reshape(-1, 3)
        extremes_t = torch.tensor(extremes, dtype=torch.float64).reshape(-1, 2)
        if self.world > 1:
            torch.distributed.all_reduce(sums_t)
            torch.distributed.all_reduce(extremes_t, op=torch.distributed.ReduceOp.MAX)
        out = {}
        for name, (total, squares, count), (high, neg_low) in zip(names, sums_t.tolist(), extremes_t.tolist()):
            if count > 0:
                mean = total / count
                out[name] = {"mean": mean, "std": max(squares / count - mean * mean, 0.0) ** 0.5, "count": count,
                             "max": high, "min": -neg_low}  # fmt: skip
        return out

    def _all_names(self, names: list[str]) -> list[str]:
        """The sorted union of every rank's names (sent as padded UTF-8 bytes, no pickle)."""
        if self.world == 1:
            return names
        encoded = torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)
        length = torch.tensor([encoded.numel()], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        torch.distributed.all_gather(lengths, length)
        longest = int(max(n.item() for n in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: encoded.numel()] = encoded
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, padded)
        union = set()
        for buffer, n in zip(gathered, lengths):
            text = bytes(buffer[: int(n.item())].tolist()).decode()
            union |= set(text.split("\n")) if text else set()
        return sorted(union)

    # ---------------------------------------------------------------- split mode: rank 0 sends each rank its groups
    FIELDS = ("x_t", "x_next", "log_probs", "timesteps", "latents", "means")

    def share_results(self, results: dict, num_groups: int) -> dict:
        """Rank 0 holds every group's RolloutResult; afterwards each rank holds its own groups' (media stay on rank 0,
        which scores them)."""
        from lance_rl.rollout import RolloutResult

        if self.world == 1:
            return results
        if self.main:
            for g in range(num_groups):
                if not self.owns(g):
                    self._send(results[g], g % self.world)
            return {g: r for g, r in results.items() if self.owns(g)}
        received = {}
        for g in range(num_groups):
            if self.owns(g):
                arrays, meta = self._receive()
                received[g] = RolloutResult(request_id=g, weights_version=int(meta[0]), steps=tuple(meta[1:].tolist()),
                                            media=np.zeros((0,), np.uint8), **arrays)  # fmt: skip
        return received

    def _send(self, result, dst: int) -> None:
        arrays = [getattr(result, f) for f in self.FIELDS]
        shapes = [list(a.shape) if a is not None else [] for a in arrays]
        header = [result.weights_version, len(result.steps), *result.steps]
        for a, shape in zip(arrays, shapes):
            header += [len(shape), *shape] if a is not None else [-1]
        torch.distributed.send(torch.tensor([len(header)], dtype=torch.int64), dst)
        torch.distributed.send(torch.tensor(header, dtype=torch.int64), dst)
        for a in arrays:
            if a is not None:
                torch.distributed.send(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), dst)

    def _receive(self):
        size = torch.zeros(1, dtype=torch.int64)
        torch.distributed.recv(size, 0)
        header = torch.zeros(int(size), dtype=torch.int64)
        torch.distributed.recv(header, 0)
        h = header.tolist()
        version, num_steps = h[0], h[1]
        meta = torch.tensor([version, *h[2 : 2 + num_steps]])
        pos, arrays = 2 + num_steps, {}
        for name in self.FIELDS:
            ndim = h[pos]
            if ndim < 0:
                arrays[name], pos = None, pos + 1
                continue
            shape = h[pos + 1 : pos + 1 + ndim]
            pos += 1 + ndim
            buffer = torch.zeros(shape, dtype=torch.float32)
            torch.distributed.recv(buffer, 0)
            arrays[name] = buffer.numpy()
        return arrays, meta

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            # Tear down together: a rank that destroys its group while a peer still talks to it can abort at exit.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
