# Sourced by the scripts/*.sh that run python (not run on its own), after `cd` to the
# repository root: answers --help (scripts/_help.sh), then makes sure the python the scripts call
# by name has the project's packages: when the `python` on PATH lacks them, the project's
# virtualenv (${FLM_VENV:-.venv}, made by scripts/install.sh) is activated; without one, one line
# says how to make it.
# shellcheck disable=SC1091
source scripts/_help.sh
flm_has_packages() {
  python -c "import importlib.util as u, sys
sys.exit(0 if u.find_spec('torch') and u.find_spec('hydra') else 1)" >/dev/null 2>&1
}
if ! flm_has_packages; then
  if [[ -f "${FLM_VENV:-.venv}/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "${FLM_VENV:-.venv}/bin/activate"
  fi
  if ! flm_has_packages; then
    echo "$(basename "$0"): no python with the project's packages: run 'bash scripts/install.sh' once" \
         "(it makes ${FLM_VENV:-.venv}), or 'source ${FLM_VENV:-.venv}/bin/activate'" >&2
    exit 2
  fi
fi
