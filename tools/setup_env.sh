#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv with the exact pinned package set.
#
# Why two pip calls: torch/torchvision must come from the package index itself. A local
# CPU-only torch wheel that pip may be pointed at (find-links) breaks torchvision, and so
# `import streaming`, with "operator torchvision::nms does not exist". --isolated ignores
# such machine-wide pip settings for that one step. Everything else resolves against
# constraints.txt, so a fresh install next month gets the same set, fast (no backtracking).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PMP_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.pmp_installed"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pin() { grep -E "^$1==" constraints.txt; }
cert=()
[ -n "${PIP_CERT:-}" ] && cert=(--cert "$PIP_CERT")
[ -f /etc/ssl/certs/ca-certificates.crt ] && [ ${#cert[@]} -eq 0 ] && cert=(--cert /etc/ssl/certs/ca-certificates.crt)
"$VENV/bin/pip" install -q --disable-pip-version-check --isolated "${cert[@]}" \
    -c constraints.txt "$(pin torch)" "$(pin torchvision)"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e '.[dev,eval]'
# The import check writes torch's caches (torchinductor_<user>) to TMPDIR: give it its own, so
# an install leaves /tmp as it found it.
check_tmp=$(mktemp -d)
trap 'rm -rf "$check_tmp"' EXIT
TMPDIR="$check_tmp" "$VENV/bin/python" - "$(pin torch | cut -d= -f3)" <<'PY'
import sys
import streaming, transformers, deepspeed, torch  # noqa: F401  (the import that the torchvision trap breaks)
if torch.__version__.split("+")[0] != sys.argv[1]:
    sys.exit(f"torch {torch.__version__} is installed but constraints.txt pins {sys.argv[1]}")
PY
echo "$want" > "$stamp"
