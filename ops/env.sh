# Sourced by ops/aether and ops/test: makes sure .venv exists and holds what pyproject.toml asks.
# Needs only Python >= 3.11 and access to PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

ensure_venv() {
  local extras="${1:-}"   # e.g. "dev"; empty: the runtime only
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "aether-ledger needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
    exit 2
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
  if [ ! -f "$stamp" ]; then
    local target="$ROOT"
    [ -z "$extras" ] || target="$ROOT[$extras]"
    echo "installing aether-ledger${extras:+[$extras]} into .venv (first run takes a minute)..." >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e "$target" >&2
    touch "$stamp"
  fi
}
