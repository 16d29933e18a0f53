"""Reward models for lance-rl: the contract, the registry, mixing, running, and the built-ins.

Importing this package is light (numpy only): built-ins import their heavy dependencies (open_clip, transformers,
onnxruntime, ray) when they are loaded. See ``lance_rl.rewards.base`` for the contract and ``lance_rl.rewards.mix`` for the recipe form.
"""

from .base import (
    MODALITIES,
    FunctionReward,
    ModalityError,
    Reward,
    RewardError,
    RewardOutput,
    as_reward,
    reward,
)
from .failure import FailurePolicy, score_with_policy
from .mix import Component, RewardMix, as_mix, build_mix
from .registry import REGISTRY, known_rewards, load_reward, register
from .runner import RewardRunner

__all__ = [
    "MODALITIES", "FunctionReward", "ModalityError", "Reward", "RewardError", "RewardOutput", "as_reward", "reward",
    "Component", "RewardMix", "as_mix", "build_mix", "REGISTRY", "known_rewards", "load_reward", "register",
    "FailurePolicy", "RewardRunner", "score_with_policy",
]  # fmt: skip
