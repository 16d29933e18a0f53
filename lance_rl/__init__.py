"""lance-rl: SFT and flow-GRPO post-training for Lance."""

__version__ = "0.1.0"
