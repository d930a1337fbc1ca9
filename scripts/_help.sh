# Sourced by every scripts/*.sh after `cd` to the repository root (not run on its own):
# `-h` / `--help` as the first argument prints the calling script's header comment and exits 0.
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
  exit 0
fi
