#!/usr/bin/env bash
# Set up what is missing, and nothing else: system packages, the .venv, Python packages, Horovod.
# Quick the second time: each stage checks before it works. Called by `make setup` (and so by demo/test).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

say() { echo "setup: $*"; }

# ---- system packages ----------------------------------------------------------------------------------------
# command -> Debian package. Slurm and munge are for the job-template tests (a real one-node cluster).
declare -A need=(
    [mpicxx]=libopenmpi-dev [mpirun]=openmpi-bin [cmake]=cmake [g++]=g++
    [sbatch]=slurm-wlm [munged]=munge
)
missing=()
for cmd in "${!need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("${need[$cmd]}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages; install them and run again:" >&2
        echo "    sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

# ---- virtual environment --------------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    py=${PYTHON:-}
    if [[ -z "$py" ]]; then
        for c in python3.11 python3; do
            if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
                py=$c; break
            fi
        done
    fi
    [[ -n "$py" ]] || { echo "setup: Python 3.11 is required (Horovod 0.28.1 does not build on 3.12+)" >&2; exit 1; }
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    say "installing Python packages (torch is large: a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt
    echo "$want" >"$stamp"
fi

# ---- Horovod ------------------------------------------------------------------------------------------------
PYTHON="$VENV/bin/python" bash scripts/build_horovod.sh
