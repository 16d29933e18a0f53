"""The Lance model: weight-compatible with the official release, no training logic."""
