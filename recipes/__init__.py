"""The recipes, shipped as package data (`lance_rl.recipes`) so that an installed wheel finds them."""

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
