"""What the benches share without importing torch (bench/cold_start.py times a cold process:
importing torch itself first would warm the OS file cache that process reads)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50258


def inductor_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs (true/false/ints parsed) as inductor options (--inductor)."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor {pair!r}: expected KEY=VALUE")
        extra[key] = {"true": True, "false": False}.get(value.lower(),
                                                        int(value) if value.isdigit() else value)
    return extra
