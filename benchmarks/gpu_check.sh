#!/usr/bin/env bash
# The GPU checks in one go, sized for about twenty minutes on one H100/H200-class GPU:
#   1. the tests that train on the GPU (every test trains on CUDA where one is present);
#   2. step_speed.py at both scales with bf16 autocast (the CUDA default) and peak memory;
#   3. step_speed.py in float32 (TF32), with the plain dense loop and its CUDA-graphed copy;
#   4. the compiled step (HSAEConfig.compile "reduce-overhead": CUDA graphs): step_speed.py
#      with it, one process a scale (each prints its compile time), then its GPU tests;
#   5. step_profile.py at both scales: launches, syncs and kernel time against the wall;
#   6. step_profile.py of the compiled step at d = 2304: its kernels by GPU time.
# Needs hsae and sae-lens importable (pip install -e '.[bench]', or PYTHONPATH). Each part has
# its own time limit, so one that hangs does not take the others with it. Logs go to $1; the
# parts to run (tests, bf16, fp32, compiled, profile, compiled-profile) may follow, all of
# them by default (together up to about 25 minutes: run them in parts where a call is limited
# to 10; "compiled" took about 2 minutes on an H200, "compiled-profile" takes up to 4).
#
#     bash benchmarks/gpu_check.sh gpu-check-out
#     bash benchmarks/gpu_check.sh gpu-check-out tests compiled
set -u
out=${1:-gpu-check-out}
shift || true
parts=" ${*:-tests bf16 fp32 compiled profile compiled-profile} "
want() { [[ "$parts" == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
started=$(date +%s)
part() { echo "== [$(($(date +%s) - started)) s] $*"; }

part "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

if want tests; then
part "tests on the GPU (names as they finish, then the failures' tracebacks)"
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "${HSAE_GPU_TEST_WORKERS:-8}")
timeout 300 python3 -m pytest -v -p no:cacheprovider -W ignore::UserWarning --tb=short -rfE \
    --junitxml="$out/tests.xml" "${workers[@]}" \
    "$root"/tests/test_gpu.py "$root"/tests/test_model.py "$root"/tests/test_training.py \
    "$root"/tests/test_forest.py "$root"/tests/test_levels.py "$root"/tests/test_fidelity.py \
    "$root"/tests/test_checkpoint.py "$root"/tests/test_matryoshka.py \
    >"$out/tests.txt" 2>&1
grep -E "(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/tests.txt" | tail -20
fi

if want bf16; then
part "step_speed, bf16 autocast, with peak memory"
timeout 240 python3 "$here/step_speed.py" --scale both --steps 20 --rounds 5 --settle 30 \
    2>&1 | tee "$out/step_speed_bf16.txt" | grep -v "Warning\|sparse_coo"
fi

if want fp32; then
part "step_speed, float32 (TF32), with the dense loop and its CUDA-graphed copy"
timeout 150 python3 "$here/step_speed.py" --scale both --steps 20 --rounds 5 --settle 30 \
    --autocast off --no-memory --dense-loop 2>&1 | tee "$out/step_speed_fp32.txt" |
    grep -v "Warning\|sparse_coo"
fi

if want compiled; then
part "compiled step: step_speed with mode reduce-overhead (CUDA graphs), one process a scale"
for scale in small large; do
    timeout "$([[ $scale == small ]] && echo 210 || echo 240)" python3 "$here/step_speed.py" \
        --scale "$scale" --steps 10 --rounds 3 --settle 20 --no-memory \
        --compile reduce-overhead 2>&1 | tee "$out/step_speed_compiled_$scale.txt" |
        grep -v "Warning\|sparse_coo\|W[0-9]"
done
part "compiled step: its GPU tests (names as they finish)"
timeout 120 python3 -m pytest -v -p no:cacheprovider -W ignore::UserWarning --tb=short -rfE \
    --junitxml="$out/tests_compiled.xml" -k "compiled or does_not_wait" "$root"/tests/test_gpu.py \
    >"$out/tests_compiled.txt" 2>&1
grep -E "(PASSED|FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/tests_compiled.txt" | tail -12
fi

if want profile; then
part "step_profile"
for scale in small large; do
    timeout 90 python3 "$here/step_profile.py" --scale "$scale" >"$out/profile_$scale.txt" 2>&1
    grep -E "^###|wall clock|dispatched|launched|syncs|kernel time" "$out/profile_$scale.txt"
done
fi

if want compiled-profile; then
# Mode "default" (no CUDA graphs), so the profiler lists each generated kernel: where the
# compiled HSAE's time beyond its compiled independent stack goes (docs/scale.md).
part "step_profile of the compiled step at d = 2304, kernels by GPU time"
timeout 200 python3 "$here/step_profile.py" --scale large --compile default --top 30 \
    >"$out/profile_compiled_large.txt" 2>&1
grep -v "Warning\|sparse_coo\|W[0-9]" "$out/profile_compiled_large.txt" | tail -90
fi
part "done"
