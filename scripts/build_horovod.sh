#!/usr/bin/env bash
# Build and install Horovod 0.28.1 from source into the active Python, against the installed torch.
#
#   scripts/build_horovod.sh            build (or reuse a cached wheel) and check
#   scripts/build_horovod.sh --check    only check: exit 0 when Horovod imports and lists PyTorch, MPI and Gloo
#
# Usable on a cluster login node too: activate your environment (conda or venv with torch and numpy), then run it.
# Environment knobs:
#   PYTHON                      interpreter to build for (default: python3 on PATH)
#   HVDTRAIN_NCCL=auto|1|0      NCCL GPU operations: auto = when NCCL headers are found (default auto)
#   HVDTRAIN_REQUIRE_NCCL=1     count a Horovod without NCCL operations as missing (rebuild it; GPU benchmark)
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures to compile for (default 80,90: A100, H100/H200)
#   HVDTRAIN_WHEEL_CACHE        folder for built wheels, reused when torch, Python and options match
#                               (default ~/.cache/hvdtrain/wheels; set empty to always build)
#   MAKEFLAGS                   parallel build (default -j$(nproc))
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python3}
# Absolute, but not through symlinks: a venv's python is a symlink that must keep pointing into the venv.
[[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "build_horovod: $*" >&2; exit 1; }

check() {
    # Horovod needs numpy at run time (broadcast_object) although its wheel does not declare it.
    "$PYTHON" -c "import numpy, horovod.torch" 2>/dev/null || return 1
    local bindir out
    bindir=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
    out=$(PATH="$bindir:$PATH" horovodrun --check-build 2>/dev/null) || return 1
    # Each of these lines must be ticked: "[X] PyTorch", "[X] MPI", "[X] Gloo".
    local need=(PyTorch MPI Gloo)
    [[ "${HVDTRAIN_REQUIRE_NCCL:-0}" == 1 ]] && need+=(NCCL)  # jobs.bench_gpu: rebuild a CPU-only Horovod
    for fw in "${need[@]}"; do
        grep -q "\[X\] $fw" <<<"$out" || return 1
    done
}

if [[ "${1:-}" == "--check" ]]; then
    check
    exit $?
fi

if check; then
    echo "build_horovod: Horovod already built with PyTorch, MPI and Gloo; nothing to do"
    exit 0
fi

# ---- prerequisites -------------------------------------------------------------------------------------------
"$PYTHON" -c "import torch, numpy" 2>/dev/null \
    || die "torch and numpy must be installed in $PYTHON first (numpy before Horovod: it is a hidden run-time need)"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v mpicxx >/dev/null || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null || missing+=(openmpi-bin)
[[ ${#missing[@]} -eq 0 ]] || die "missing system packages: ${missing[*]} (Debian: apt-get install ${missing[*]})"

read -r TORCH_VERSION TORCH_CUDA PYTAG SITE < <("$PYTHON" - <<'EOF'
import sys, sysconfig, torch
print(torch.__version__.split("+")[0], torch.version.cuda or "none",
      f"cp{sys.version_info.major}{sys.version_info.minor}", sysconfig.get_paths()["purelib"])
EOF
)

# ---- CUDA toolkit: a CUDA build of torch makes Horovod's CMake require one --------------------------------------
if [[ "$TORCH_CUDA" != none ]]; then
    cuda_home=${CUDA_HOME:-${HOROVOD_CUDA_HOME:-}}
    if [[ -z "$cuda_home" ]] && command -v nvcc >/dev/null; then
        # nvcc on PATH may be a wrapper script; its dry run names the real toolkit folder (TOP=.../bin).
        here_dir=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
        [[ -n "$here_dir" ]] && cuda_home=$(cd "$here_dir/.." && pwd)
    fi
    [[ -z "$cuda_home" && -x /usr/local/cuda/bin/nvcc ]] && cuda_home=/usr/local/cuda
    [[ -n "$cuda_home" && -x "$cuda_home/bin/nvcc" && -f "$cuda_home/include/cuda_runtime.h" ]] \
        || die "torch $TORCH_VERSION is a CUDA $TORCH_CUDA build, so Horovod needs the CUDA toolkit (nvcc); none found. Set CUDA_HOME, or 'module load cuda' on a cluster"
    export CUDA_HOME=$cuda_home HOROVOD_CUDA_HOME=$cuda_home
    export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
    echo "build_horovod: CUDA toolkit $cuda_home, architectures $HOROVOD_BUILD_CUDA_CC_LIST"
fi

# ---- NCCL: build GPU operations when its headers are present ----------------------------------------------------
nccl=${HVDTRAIN_NCCL:-auto}
work=$(mktemp -d "${TMPDIR:-/tmp}/hvdbuild.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [[ "$TORCH_CUDA" != none && "$nccl" != 0 ]]; then
    nccl_inc=${HOROVOD_NCCL_INCLUDE:-}
    for d in "$SITE/nvidia/nccl/include" "${NCCL_HOME:-/nonexistent}/include" /usr/include /usr/local/cuda/include; do
        [[ -z "$nccl_inc" && -f "$d/nccl.h" ]] && nccl_inc=$d
    done
    if [[ -n "$nccl_inc" ]]; then
        nccl_lib=${HOROVOD_NCCL_LIB:-$(dirname "$nccl_inc")/lib}
        if [[ ! -e "$nccl_lib/libnccl.so" && -e "$nccl_lib/libnccl.so.2" ]]; then
            # The pip NCCL wheel ships only libnccl.so.2: give the linker a libnccl.so to find.
            mkdir -p "$work/nccl" && ln -s "$nccl_lib/libnccl.so.2" "$work/nccl/libnccl.so"
            nccl_lib=$work/nccl
        fi
        export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_INCLUDE=$nccl_inc HOROVOD_NCCL_LIB=$nccl_lib
        export HOROVOD_NCCL_LINK=SHARED
        echo "build_horovod: NCCL GPU operations on (headers $nccl_inc)"
    elif [[ "$nccl" == 1 ]]; then
        die "HVDTRAIN_NCCL=1 but no nccl.h found; set HOROVOD_NCCL_INCLUDE and HOROVOD_NCCL_LIB"
    fi
fi

# ---- a cached wheel built for the same torch, Python and options is reused -----------------------------------
key="${HOROVOD_VERSION}-torch${TORCH_VERSION}-cuda${TORCH_CUDA}-${PYTAG}-nccl${HOROVOD_GPU_OPERATIONS:-none}"
cache=${HVDTRAIN_WHEEL_CACHE-$HOME/.cache/hvdtrain/wheels}
if [[ -n "$cache" && -d "$cache/$key" ]] && ls "$cache/$key"/horovod-*.whl >/dev/null 2>&1; then
    echo "build_horovod: installing cached wheel $cache/$key"
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$cache/$key"/horovod-*.whl
    check && { echo "build_horovod: OK (cached wheel)"; exit 0; }
    echo "build_horovod: cached wheel does not pass the check; rebuilding"
fi

# ---- the C++20 fix: torch >= 2.13 headers need C++20, Horovod's CMake pins C++14/17 --------------------------
# A wrapper compiler swaps the standard flag; nvcc's own -std=c++11 is left alone (it never reaches g++ as gnu++).
cat >"$work/cxx20" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    case "\$a" in
        -std=gnu++14|-std=gnu++17|-std=c++14|-std=c++17) args+=(-std=gnu++20) ;;
        *) args+=("\$a") ;;
    esac
done
exec ${CXX:-g++} "\${args[@]}"
EOF
chmod +x "$work/cxx20"
export CXX=$work/cxx20

# ---- fetch a fresh source tree (the build writes into it) and build a wheel ---------------------------------
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" \
    || die "could not download the horovod==$HOROVOD_VERSION source from the package index"
tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
# CMake 4 dropped compatibility with the vendored gloo's cmake_minimum_required(2.8.12).
export CMAKE_POLICY_VERSION_MINIMUM=3.5
log=$work/build.log
echo "build_horovod: building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION (a few minutes; log kept on failure)"
start=$SECONDS
if ! (cd "$work/horovod-$HOROVOD_VERSION" \
      && "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps . -w "$work/dist") >"$log" 2>&1; then
    keep=${TMPDIR:-/tmp}/horovod-build-$(date +%Y%m%d-%H%M%S).log
    cp "$log" "$keep"
    echo "build_horovod: the build failed. First errors:" >&2
    errors=$(grep -E "error:|CMake Error|#error|fatal" "$log" | grep -v -E "^\s*-- |Werror" | head -n 15)
    echo "${errors:-$(tail -n 15 "$log")}" >&2
    die "full log: $keep"
fi
echo "build_horovod: built in $((SECONDS - start)) s"
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$work"/dist/horovod-*.whl
# Horovod's own run-time needs (horovodrun), installed without letting pip touch torch.
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging cffi
if [[ -n "$cache" ]]; then
    mkdir -p "$cache/$key" && cp "$work"/dist/horovod-*.whl "$cache/$key/"
fi
check || die "Horovod installed but 'horovodrun --check-build' does not list PyTorch, MPI and Gloo"
echo "build_horovod: OK ($(PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH" horovodrun --check-build | grep -c '\[X\]') features ticked)"
