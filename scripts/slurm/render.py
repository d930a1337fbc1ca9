"""Dry run of the SLURM submission: print the sbatch options and the command every task runs.

    python scripts/slurm/render.py [--nodes 2] [--gpus-per-node 8] [--time 24:00:00]
        [--partition P] [--account A] [--template scripts/slurm/train_owt_flm.sbatch] [overrides]
    python scripts/slurm/render.py --submitit trainer.devices=8 trainer.num_nodes=2 [overrides]

No SLURM needed. Paths are printed as they will be: ``--data-dir`` (default $DATA_DIR, else
<repo>/data_cache) and ``--save-root`` (default $SAVE_ROOT, else <repo>/outputs/slurm, the
template's own default). The submit line sets both and changes to the repository root (the
template finds the repository from the directory sbatch is called in). The template runs with FLM_DRY_RUN=1 under a simulated SLURM environment and
prints its srun line; the training script that line starts is then run with a stand-in
``python`` first on PATH, which prints the command python would get. ``--submitit`` composes
the config with hydra/launcher=submitit_slurm_flm and prints the sbatch file that
hydra-submitit-launcher would submit.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO / "scripts" / "slurm" / "train_owt_flm.sbatch"
SBATCH_LINE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:=(.*))?$")
DRY_RUN_JOB_ID = "0"  # the simulated job id
SUBMITIT_LAUNCHER = "submitit_slurm_flm"  # configs/hydra/launcher/<name>.yaml
DEFAULT_DATA_DIR = REPO / "data_cache"  # configs/data/*.yaml: ${oc.env:DATA_DIR,./data_cache}
DEFAULT_SAVE_ROOT = REPO / "outputs" / "slurm"  # the template's SAVE_ROOT default


def sbatch_options(template: Path) -> dict[str, str | None]:
    """``#SBATCH --key=value`` lines of the template, in order (flags map to None)."""
    options: dict[str, str | None] = {}
    for line in template.read_text().splitlines():
        match = SBATCH_LINE.match(line.strip())
        if match:
            options[match.group(1)] = match.group(2)
    return options


STAND_IN_PYTHON = (f"#!{sys.executable}\nimport shlex, sys\n"
                   "print(shlex.join(['python', *sys.argv[1:]]))\n")


def write_stand_in_python(directory: Path) -> Path:
    """``directory/python``: prints the command it is given, shell-quoted (shlex.split reads it
    back), instead of running it. Put ``directory`` first on PATH."""
    stand_in = Path(directory, "python")
    stand_in.write_text(STAND_IN_PYTHON)
    stand_in.chmod(0o755)
    return stand_in


def render(template: Path, options: dict[str, str | None], overrides: list[str],
           data_dir: str, save_root: str) -> tuple[str, str]:
    """(the srun line the template runs, the python command that line ends in) for the given
    (resolved) sbatch options."""
    gpus = int(options["gpus-per-node"])
    env = {**os.environ, "FLM_DRY_RUN": "1", "DATA_DIR": data_dir, "SAVE_ROOT": save_root,
           "SLURM_JOB_ID": DRY_RUN_JOB_ID, "SLURM_JOB_NAME": options["job-name"],
           "SLURM_JOB_NUM_NODES": options["nodes"], "SLURM_NTASKS_PER_NODE": str(gpus),
           "SLURM_SUBMIT_DIR": str(REPO)}
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    result = subprocess.run(["bash", str(template), *overrides], env=env, capture_output=True,
                            text=True, check=True)
    srun = result.stdout.strip()
    task = shlex.split(srun)[2:]  # drop "srun --kill-on-bad-exit=1"
    with tempfile.TemporaryDirectory() as bin_dir:
        write_stand_in_python(bin_dir)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        python = subprocess.run(task, env=env, cwd=REPO, capture_output=True, text=True,
                                check=True)
    return srun, python.stdout.strip()


def render_submitit(overrides: list[str]) -> str:
    """The sbatch file hydra-submitit-launcher writes for ``python -m main -m
    hydra/launcher=submitit_slurm_flm <overrides>`` (its parameter mapping, submitit's writer)."""
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        config = compose(config_name="config", return_hydra_config=True, overrides=[
            f"hydra/launcher={SUBMITIT_LAUNCHER}", "checkpointing.save_dir=$RUN_DIR",
            "eval.output_dir=$RUN_DIR/eval", "hydra.job.name=main", *overrides])
    launcher = config.hydra.launcher
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit <submitit_folder>",
        folder=str(launcher.submitit_folder), job_name=launcher.name,
        partition=launcher.partition, time=launcher.timeout_min, nodes=launcher.nodes,
        ntasks_per_node=launcher.tasks_per_node, cpus_per_task=launcher.cpus_per_task,
        gpus_per_node=launcher.gpus_per_node, qos=launcher.qos, account=launcher.account,
        signal_delay_s=launcher.signal_delay_s, setup=launcher.setup,
        additional_parameters=dict(launcher.additional_parameters))


def submit_line(submit: list[str], data_dir: str, save_root: str) -> str:
    """The shell line that submits: from the repository root, with DATA_DIR and SAVE_ROOT set
    (sbatch passes the environment on to the job)."""
    return (f"cd {shlex.quote(str(REPO))} && DATA_DIR={shlex.quote(data_dir)} "
            f"SAVE_ROOT={shlex.quote(save_root)} {shlex.join(submit)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE)
    parser.add_argument("--submitit", action="store_true",
                        help=f"render hydra/launcher={SUBMITIT_LAUNCHER} instead of the template")
    for key in ("nodes", "gpus-per-node", "time", "job-name", "partition", "account"):
        parser.add_argument(f"--{key}")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(DEFAULT_DATA_DIR)),
                        help="the tokenised-data cache (DATA_DIR; default %(default)s)")
    parser.add_argument("--save-root", default=os.environ.get("SAVE_ROOT", str(DEFAULT_SAVE_ROOT)),
                        help="where run directories go (SAVE_ROOT; default %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    if args.submitit:
        print(render_submitit(overrides))
        return
    options = sbatch_options(args.template)
    cli = {}
    for key in ("nodes", "gpus-per-node", "time", "job-name", "partition", "account"):
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            cli[key] = value
    options.update(cli)
    if "gpus-per-node" in cli:
        cli["ntasks-per-node"] = options["ntasks-per-node"] = cli["gpus-per-node"]
    data_dir, save_root = (str(Path(p).expanduser().resolve()) for p in (args.data_dir,
                                                                           args.save_root))
    submit = ["sbatch", *(f"--{k}={v}" for k, v in cli.items()), str(args.template), *overrides]
    print("# sbatch options (template defaults, then command-line values)")
    for key, value in options.items():
        print(f"#SBATCH --{key}" + (f"={value}" if value is not None else ""))
    print("# submit with")
    print(submit_line(submit, data_dir, save_root))
    srun, python = render(args.template, options, overrides, data_dir, save_root)
    print(f"# every task runs (job id {DRY_RUN_JOB_ID} stands for $SLURM_JOB_ID)")
    print(srun)
    print("# which runs")
    print(python)


if __name__ == "__main__":
    sys.exit(main())
