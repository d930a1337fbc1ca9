from models.generate import generate  # noqa: F401  (conditional generation, docs/conditional.md)
