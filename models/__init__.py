"""Networks and their loading: ``load_backbone`` (any checkpoint this project or the paper
wrote), ``generate`` (unconditional, prompted or infilled sampling; docs/math.md §9) and
``generate_text`` (the same from a text prompt to texts, with the checkpoint's tokenizer)."""

from models.generate import generate, generate_text  # noqa: F401
from models.load import load_backbone  # noqa: F401
