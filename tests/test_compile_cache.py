"""training.compile_cache (speed.compile.use_cache_dir): a second process finds what the first
compiled in the directory, which is what a restarted run gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# compiles a tiny function with inductor on the CPU and reports the FX-graph cache counters
COMPILE_ONCE = """
import json, sys
import torch
from torch._dynamo.utils import counters
from speed.compile import use_cache_dir
use_cache_dir(sys.argv[1])
fn = torch.compile(lambda x: (x.sin() * 3 + x).sum(), dynamic=False)
x = torch.arange(6, dtype=torch.float32)
assert torch.allclose(fn(x), (x.sin() * 3 + x).sum())
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "inductor_dir": __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"],
                  "triton_dir": __import__("os").environ["TRITON_CACHE_DIR"]}))
"""


def compile_in_a_process(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(cache)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "compiled"
    first = compile_in_a_process(cache)
    assert first["inductor_dir"] == str(cache.resolve())
    assert first["triton_dir"] == str(cache.resolve() / "triton")
    assert first["miss"] >= 1 and first["hit"] == 0
    assert any(cache.rglob("*"))  # written there
    second = compile_in_a_process(cache)
    assert second["hit"] >= 1 and second["miss"] == 0
    elsewhere = compile_in_a_process(tmp_path / "empty")  # another directory: compiled anew
    assert elsewhere["miss"] >= 1 and elsewhere["hit"] == 0
