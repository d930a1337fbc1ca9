"""The scripts' interface: every script answers --help without running anything, the shell
scripts find the project's python or say how, ``python -m main --help`` starts with the modes,
and ``scripts/slurm/render.py`` prints real paths and a submit line that runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.sh") if not p.name.startswith("_"))
PYTHON_SCRIPTS = sorted([*(p.relative_to(REPO) for p in (REPO / "scripts").glob("*.py")),
                         Path("scripts/slurm/render.py")])
RUN_MARKER = "python-was-run"
# a `python` first on PATH that records that it ran and fails
TRAP_PYTHON = f"#!/bin/sh\ntouch \"$(dirname \"$0\")/{RUN_MARKER}\"\nexit 99\n"


def trap_path(directory: Path) -> dict[str, str]:
    trap = directory / "python"
    trap.write_text(TRAP_PYTHON)
    trap.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def header(script: Path) -> list[str]:
    """The script's comment lines after the shebang, without the comment marks."""
    lines = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_help_prints_its_header_and_runs_nothing(script, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), "--help"], cwd=tmp_path,
                          env=trap_path(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == header(REPO / "scripts" / script)
    assert len(proc.stdout.splitlines()) >= 1
    assert not (tmp_path / RUN_MARKER).exists()


def test_shell_script_without_the_projects_python_says_how_to_get_it(tmp_path):
    """A `python` on PATH that lacks the packages (it fails every import) and no virtualenv:
    one line naming install.sh, exit 2, nothing run."""
    (tmp_path / "python").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "FLM_VENV": str(tmp_path / "no-venv")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_owt_flm.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "scripts/install.sh" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", PYTHON_SCRIPTS, ids=str)
def test_python_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or "mode=" in proc.stdout, proc.stdout[:500]


def test_main_help_starts_with_the_modes_and_points_to_the_readme():
    proc = subprocess.run([sys.executable, "-m", "main", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("python -m main mode=")
    for mode in ("train", "ppl_eval", "sample_eval", "generate"):
        assert f"mode={mode}" in proc.stdout
    assert "README.md" in proc.stdout
    assert "algo: ar, flm, flm_distill, flm_distill_second, mdlm" in proc.stdout


def test_train_judge_help_states_its_time_on_two_cores():
    proc = subprocess.run([sys.executable, "scripts/train_judge.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    assert "min on 2 CPU cores" in text and "0.32 s a step" in text, proc.stdout


STAND_IN_SBATCH = """#!/usr/bin/env bash
# sbatch stand-in: runs the template as SLURM would start it, in dry-run mode (prints srun)
nodes=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
template=$1; shift
FLM_DRY_RUN=1 SLURM_SUBMIT_DIR="$PWD" SLURM_JOB_ID=0 SLURM_JOB_NAME=flm-owt \\
  SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS_PER_NODE=8 exec bash "$template" "$@"
"""


def test_render_prints_real_paths_and_a_submit_line_that_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "SAVE_ROOT")}
    proc = subprocess.run([sys.executable, "scripts/slurm/render.py", "--nodes", "2",
                           "trainer.log_every_n_steps=50"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    lines = proc.stdout.splitlines()
    assert "$" not in proc.stdout.replace("$SLURM_JOB_ID", "")  # no unexpanded variable
    submit = lines[lines.index("# submit with") + 1]
    srun = lines[lines.index(next(x for x in lines if x.startswith("# every task runs"))) + 1]
    save_root = REPO / "outputs" / "slurm"
    assert f"checkpointing.save_dir={save_root}/flm-owt-0" in srun
    # the submit line, from another directory, with sbatch standing in: the same task line
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(STAND_IN_SBATCH)
    sbatch.chmod(0o755)
    submitted = subprocess.run(["bash", "-c", submit], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60,
                               env={**env, "PATH": f"{tmp_path}{os.pathsep}{env['PATH']}"})
    assert submitted.returncode == 0, submitted.stderr
    assert shlex.split(submitted.stdout) == shlex.split(srun)
