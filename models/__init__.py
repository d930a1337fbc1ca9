"""Networks and their loading: ``load_backbone`` (any checkpoint this project or the paper
wrote) and ``generate`` (unconditional, prompted or infilled sampling; docs/math.md §9)."""

from models.generate import generate  # noqa: F401
from models.load import load_backbone  # noqa: F401
