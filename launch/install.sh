#!/usr/bin/env bash
# Sets up muse_rec in ./.venv (idempotent; a second run only checks). Picks the fbgemm build by itself:
# CUDA when nvidia-smi sees a GPU, CPU otherwise; MUSE_REC_DEVICE=cpu|cuda overrides.
# All versions live in launch/requirements*.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MUSE_REC_VENV:-.venv}
device=${MUSE_REC_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
case "$device" in cpu|cuda) ;; *) echo "install.sh: MUSE_REC_DEVICE must be cpu or cuda, got '$device'" >&2; exit 2;; esac

stamp="$venv/.muse_rec-installed"
want="$device $(cat launch/requirements.txt launch/requirements-torchrec.txt setup.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "muse_rec: $venv is up to date ($device)" >&2
  exit 0
fi

echo "muse_rec: installing into $venv for $device" >&2
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -r launch/requirements.txt "pytest>=8,<10"
# torchrec and the fbgemm build for this device, without their declared dependencies
grep -E '^torchrec==' launch/requirements-torchrec.txt | cut -d' ' -f1 > "$venv/torchrec-pins.txt"
grep -E "#[[:space:]]*$device\$" launch/requirements-torchrec.txt | cut -d' ' -f1 >> "$venv/torchrec-pins.txt"
"${pip[@]}" install --no-deps -r "$venv/torchrec-pins.txt"
"${pip[@]}" install --no-deps --no-build-isolation -e .
"$venv/bin/python" -c "import torchrec, fbgemm_gpu, muse_rec" 2>/dev/null || {
  echo "muse_rec: the installed stack does not import; see 'pip list' in $venv" >&2; exit 1; }
echo "$want" > "$stamp"
echo "muse_rec: ready ($device). Commands: $venv/bin/muse-rec --help" >&2
