"""Reward models for lance-rl (the reward contract, registry and built-ins)."""
