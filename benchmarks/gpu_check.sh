#!/usr/bin/env bash
# Everything GPU-related in one run on a GPU node, in about 8 minutes on one H200:
#   1. the CUDA tests (pytest -m gpu: fp16 GradScaler, bf16, CUDA RNG + exact resume, pinned
#      memory, CAM export on CUDA vs CPU);
#   2. benchmarks/gpu_bench.py: ResNet-50 224² training images/s fp32 vs bf16 + channels_last,
#      CAM (Grad-CAM) vs forward-only images/s and peak memory;
#   3. the scale benchmark's 10^5-image export on the GPU (benchmarks/scale.py).
#
# The node's python needs torch, torchvision, h5py, matplotlib, rich, pyyaml and pillow; it may have
# no pip.  What it lacks (submitit, pytest) comes as wheels in .whl/, fetched beforehand on a machine
# with pip access:
#
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here: pip download into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh                     # there: results into $OUT or benchmarks/gpu-results/
#   bash benchmarks/gpu_check.sh --smoke             # anywhere: tiny sizes on the CPU, checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# submitit in the range cnncam is tested with (pyproject; cnncam/launch/submitit_api.py uses its private API).
WHEELS=('submitit>=1.5,<1.6' cloudpickle typing_extensions pytest pluggy iniconfig packaging pytest-timeout pyyaml)

if [[ ${1:-} == --fetch-wheels ]]; then
    mkdir -p .whl
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
fi
SMOKE=0
[[ ${1:-} == --smoke ]] && SMOKE=1

RESULTS=${OUT:-benchmarks/gpu-results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
say() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$LOG"; }

# Unpack the wheels (pure Python) into a private folder rather than importing from zips:
# pytest's assertion rewriting and importlib.resources behave best on real files.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE" "${SCALE_WORK:-}"' EXIT
shopt -s nullglob
for w in .whl/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    [[ $mod == pyyaml ]] && mod=yaml  # the one distribution here whose module has another name
    # Only what the node lacks: its own packages (built for its torch) stay in charge.
    "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null && continue
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$SITE"
    say "using wheel $(basename "$w")"
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, never stop the script
    local name=$1 limit=$2; shift 2
    say "start $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$RESULTS/$name.txt" | tee -a "$LOG"
    say "end $name: exit $rc after $((SECONDS - t0)) s"
}

{
    date -u +%FT%TZ
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
} >"$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt" | tee -a "$LOG"

SCALE_WORK=$(mktemp -d)
SCALE=("$PY" benchmarks/scale.py --work "$SCALE_WORK" --export-only)  # steps cached in results.json
if ((SMOKE)); then
    stage gpu_bench 300 "$PY" benchmarks/gpu_bench.py --smoke --device cpu --out "$RESULTS/gpu_bench.json"
    stage scale_gpu 300 "${SCALE[@]}" --sizes 1000 --shards 1 --set train.device=cpu
    cp "$SCALE_WORK/results.json" "$RESULTS/scale_gpu.json"
    exit 0
fi
STAGES=${GPU_CHECK_STAGES:-pytest_gpu gpu_bench scale_gpu demo_gpu}  # a subset reruns only those
want() { [[ " $STAGES " == *" $1 "* ]]; }
want pytest_gpu && stage pytest_gpu 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
want gpu_bench && stage gpu_bench 150 "$PY" benchmarks/gpu_bench.py --out "$RESULTS/gpu_bench.json"
if want scale_gpu; then
    # Decoding 10^5 PNGs feeds the GPU: 8 loader workers of the node's 16 cores.
    stage scale_gpu 180 "${SCALE[@]}" --sizes 100000 --shards 1 --set cam.num_workers=8 train.device=cuda
    cp "$SCALE_WORK/results.json" "$RESULTS/scale_gpu.json"
    stage scale_gpu_part 60 "$PY" benchmarks/gpu_inspect.py part "$SCALE_WORK/cams/n100000-s1/part-00000-of-00001.h5"
fi
if want demo_gpu; then
    # The demo recipe trained on the GPU in both mixed precisions (channels_last), then its CAMs.
    DEMO=$(mktemp -d)
    "$PY" -m cnncam.data.synthetic --out "$DEMO/shapes" --classes 4 --per-class 150 --size 64 --seed 0 >/dev/null
    for prec in fp16 bf16; do
        sets=()
        for kv in data.root="$DEMO/shapes" runs_dir="$DEMO/runs" name=demo-$prec train.device=cuda \
            train.precision=$prec train.channels_last=true data.num_workers=4; do sets+=(--set "$kv"); done
        stage "demo_${prec}_train" 150 "$PY" jobs/launch.py train --config configs/demo.yaml --executor inline "${sets[@]}"
        stage "demo_${prec}_cam" 90 "$PY" jobs/launch.py cam --run "$DEMO/runs/demo-$prec" --executor inline
        stage "demo_${prec}_summary" 60 "$PY" benchmarks/gpu_inspect.py run "$DEMO/runs/demo-$prec"
    done
fi
say "done; results in $RESULTS"
