"""Every command line of README.md runs, or at least parses, as written.

The README's fenced ``bash`` blocks are read line by line. A line tagged ``# needs: gpu``,
``network``, ``slurm`` or ``hours`` is only parsed: its Hydra overrides go through Hydra's own
override parser (so quoting mistakes still fail) and must not be sweeps unless the line is a
multirun. Every other line is also run, from a directory outside the repository, with tiny
settings put in place of the README's (a tiny model, a few steps, the CPU) and ``$CKPT`` set to a
tiny checkpoint trained once for this module. The ``python`` block runs the same way, with its
checkpoint path replaced by the tiny one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NEEDS = re.compile(r"#\s*needs:\s*(gpu|network|slurm|hours)\b")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
# placeholders the parse-only lines expand (their values only have to be well-formed)
PLACEHOLDER_ENV = {"DATA_DIR": "/path/to/cache", "CKPT_PATH": "/path/to/last.ckpt"}
# Tiny settings per mode of `python -m main`: each replaces the README's value of its key, or is
# appended. The quickstart preset's own model keys are replaced too.
TINY_TRAIN = [*TINY_MODEL, "loader.global_batch_size=4", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "lr_scheduler.num_warmup_steps=1", "trainer.enable_progress_bar=false",
              "sampling.steps=[2]", "sampling.print_samples=1"]
TINY = {
    "train": TINY_TRAIN,
    "generate": ["sampling.steps=[2]", "generate.num_samples=1"],
    "ppl_eval": ["trainer.limit_val_batches=1", "loader.global_batch_size=4"],
    "sample_eval": ["sampling.steps=[2]", "eval.num_samples=2", "sampling.batch_size=2",
                    "eval.reference_row=false", "eval.perplexity_batch_size=2"],
}
TINY_JUDGE = ["--steps", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
              "--context", "64", "--batch-size", "2", "--text-file", "tiny_corpus.txt"]
TINY_CORPUS = "To be, or not to be, that is the question.\n\n" * 40  # ~20 blocks of 64


def fenced_blocks_raw(language: str) -> list[list[str]]:
    """The README's fenced blocks in ``language``, each as its lines as written."""
    blocks, current, inside = [], [], None
    for line in README.read_text().splitlines():
        fence = FENCE.match(line)
        if fence and inside is None:
            inside, current = fence.group(1), []
        elif fence:
            if inside == language:
                blocks.append(current)
            inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def fenced_blocks(language: str) -> list[list[str]]:
    """Like ``fenced_blocks_raw``, stripped, continuation lines joined, comment lines and
    empty lines left out: one command a line."""
    joined = []
    for block in fenced_blocks_raw(language):
        lines, pending = [], ""
        for line in (raw.strip() for raw in block):
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        joined.append([line for line in lines if line and not line.startswith("#")])
    return joined


def command_lines() -> list[str]:
    return [line for block in fenced_blocks("bash") for line in block]


def split_line(line: str, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """A shell line -> (its leading VAR=value assignments, argv with $VARs expanded)."""
    tokens = shlex.split(line, comments=True)
    assignments = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        assignments[key] = value
    scope = {**env, **assignments}
    expanded = [re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: scope.get(m.group(1), m.group(0)),
                       token) for token in tokens]
    return assignments, expanded


def hydra_overrides(argv: list[str]) -> list[str]:
    """The argv entries a Hydra app reads as overrides (key=value, not --options)."""
    return [a for a in argv[1:] if "=" in a and not a.startswith("-")
            and not a.endswith((".sh", ".py", ".sbatch"))]


def test_the_readme_has_runnable_and_tagged_lines():
    lines = command_lines()
    runnable = [line for line in lines if not NEEDS.search(line)]
    assert len(lines) >= 15 and len(runnable) >= 8, lines


@pytest.mark.parametrize("line", command_lines())
def test_command_line_parses(line):
    _, argv = split_line(line, PLACEHOLDER_ENV)
    overrides = hydra_overrides(argv)
    parsed = OverridesParser.create().parse_overrides(overrides)  # raises on a quoting error
    app_args = argv[argv.index("main") + 1:] if "main" in argv else argv
    multirun = "-m" in app_args or "--multirun" in app_args  # after `python -m main`
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    assert multirun or not sweeps, f"Hydra reads these as sweeps (quote the value): {sweeps}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory outside the repository with ``scripts`` linked in (the README's relative
    script paths), where every command runs."""
    work = tmp_path_factory.mktemp("readme")
    (work / "scripts").symlink_to(REPO / "scripts")
    (work / "tiny_corpus.txt").write_text(TINY_CORPUS)  # the stand-in judge's tiny corpus
    return work


@pytest.fixture(scope="module")
def tiny_checkpoint(workdir) -> Path:
    run = workdir / "tiny-run"
    proc = subprocess.run([sys.executable, "-m", "main", *TINY_TRAIN, f"hydra.run.dir={run}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def tiny_argv(argv: list[str], run_dir: Path) -> list[str]:
    """The README's command with tiny settings in place of its own."""
    if argv[:3] == ["python", "-m", "main"] or argv[:4] == ["python", "-u", "-m", "main"]:
        mode = next((a.split("=", 1)[1] for a in argv if a.startswith("mode=")), "train")
        tiny = [*TINY[mode], f"hydra.run.dir={run_dir}", f"checkpointing.save_dir={run_dir}"]
        keys = {t.split("=", 1)[0] for t in tiny}
        kept = [a for a in argv if not ("=" in a and a.split("=", 1)[0] in keys)]
        return [sys.executable, *kept[1:], *tiny]
    if argv[:2] == ["python", "scripts/train_judge.py"]:
        return [sys.executable, *argv[1:], *TINY_JUDGE]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def runnable_lines() -> list[str]:
    return [line for line in command_lines() if not NEEDS.search(line)]


def test_runnable_lines_run(workdir, tiny_checkpoint):
    """In README order (the stand-in judge is trained before it is used)."""
    env = {**os.environ, "CKPT": str(tiny_checkpoint), "PYTHONPATH": str(REPO)}
    for index, line in enumerate(runnable_lines()):
        assignments, argv = split_line(line, env)
        if argv[0] == "export":  # a shell builtin: run it in a shell
            argv = ["bash", "-c", shlex.join(argv)]
        command = tiny_argv(argv, workdir / f"run{index}")
        proc = subprocess.run(command, cwd=workdir, env={**env, **assignments},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n-> {shlex.join(command)}\n{proc.stderr[-3000:]}"
        if "mode=generate" in line and "generate.prompt=" in line:
            assert "To be, or" in proc.stdout  # the prompt is the known prefix of each sample


def test_python_example_runs_outside_the_repository(workdir, tiny_checkpoint):
    (code,) = ["\n".join(block) for block in fenced_blocks_raw("python")]
    path = re.findall(r'"[^"]*\.ckpt"', code)
    assert len(path) == 1, code
    code = code.replace(path[0], repr(str(tiny_checkpoint)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the README's one set-up step
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = proc.stdout.strip().split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("To be, or") for s in samples), proc.stdout

