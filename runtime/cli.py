"""What every entry point (``main.py``, ``scripts/*.py``) does the same way at the command line.

* A user's mistake (``USER_ERRORS``: a value that cannot work, an unreachable resource named
  by its config key, a corrupt checkpoint, a run directory another run holds; an override
  Hydra cannot parse, ``check_overrides``) is one line on stderr and exit status
  ``EXIT_USER_ERROR``; any other exception is a bug and keeps its traceback (``user_errors``).
* A normal run's log holds the run's own lines: third-party tips, hardware banners and
  deprecation warnings that say nothing about the run are filtered (``quiet_third_party``).
* A sampling seed left unset is drawn fresh for each run and printed (``fresh_seed``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import warnings
from collections.abc import Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from runtime.checkpointing import CorruptCheckpointError
from runtime.config import ConfigError
from runtime.reliability import RunLockedError

EXIT_USER_ERROR = 2  # argparse's status for a bad command line
USER_ERRORS = (ConfigError, CorruptCheckpointError, RunLockedError)

# Messages of Lightning and PyTorch that are advice or internal deprecations, not about the run.
# Each pattern is matched at the start of the warning's message.
QUIET_WARNINGS = (
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch pytree, inside Lightning
    # The run directory's checkpoints/ holds the run id (checkpointing.write_run_id) before the
    # first save, and resume reads last.ckpt from it: a non-empty directory is the design.
    r"Checkpoint directory .* exists and is not empty",
    r"The '(train|val)_dataloader' does not have many workers",  # loader.num_workers is chosen
)
# Lightning's rank_zero_info goes through these loggers: banners (GPU/TPU/HPU available,
# LOCAL_RANK), "💡 Tip" advertisements and "`Trainer.fit` stopped"; their warnings stay.
# The checkpoint connector says "`weights_only` was not set" at every save (main.py logs the
# restores it does itself: "resuming from ...").
QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda",
                 "pytorch_lightning.trainer.connectors.checkpoint_connector")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with ' | ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn one of ``USER_ERRORS`` raised inside into ``error: <message>`` on stderr and exit
    status 2, no traceback; everything else propagates unchanged."""
    try:
        yield
    except USER_ERRORS as error:
        logging.shutdown()  # flush the log files before the process ends
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def check_overrides(argv: list[str]) -> None:
    """Parse the command line's overrides as Hydra will, before Hydra runs: one that cannot be
    parsed (``generate.prompt=To be, or``: an unquoted comma is a sweep) is ``error: ...`` on
    one line and exit status 2 instead of Hydra's message and status 1. Flags (``--help``,
    ``-m``, ...) and their values are left to Hydra."""
    overrides = [arg for arg in argv if not arg.startswith("-") and "=" in arg]
    hint = "quote a value holding commas or spaces, e.g. 'generate.prompt=\"To be, or\"'"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        message = f"{one_line(error)} ({hint})"
    else:
        multirun = any(arg in ("-m", "--multirun") for arg in argv)
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if not sweeps or multirun:
            return
        message = (f"{sweeps[0]!r} is a sweep (an unquoted comma or a range) outside --multirun: "
                   f"{hint}")
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def quiet_third_party() -> None:
    """Filter the warnings in ``QUIET_WARNINGS`` and the INFO banners of ``QUIET_LOGGERS``."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fresh_seed() -> int:
    """A seed for a run that was given none: 31 random bits from the OS."""
    return secrets.randbits(31)
