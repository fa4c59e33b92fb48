#!/usr/bin/env bash
# The Ray executor's scaling on a machine with 2 GPUs (benchmarks/ray_scaling.py), in two calls
# right after one another on the same machine (ignored folders such as cache/ are kept between
# them). The Ray wheel for Python 3.12 (79.3 MB) does not fit in one call's 64 MiB, so it travels
# in two parts in gpu-carry/ (ignored by git), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ray==2.60.0 -d /tmp/w
#   head -c 40000000 /tmp/w/ray-2.60.0-cp312-*.whl > gpu-carry/ray.whl.part00             # call A
#   tail -c +40000001 /tmp/w/ray-2.60.0-cp312-*.whl > gpu-carry/ray.whl.part01            # call B
# and its dependencies the GPU machine lacks, with math-verify's for grading, in gpu-carry/wheels/
# (call A): `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# --platform manylinux_2_17_x86_64 click jsonschema msgpack protobuf math-verify -d gpu-carry/wheels`.
#
#   scripts/gpu_ray.sh A   install the wheels (persistent, cache/gpu-ray/site), keep part 1, print the
#                          versions and GPUs (seconds)
#   scripts/gpu_ray.sh B   join the Ray wheel (sha256 checked), install it, then the 2-GPU
#                          measurement: a sweep and one long run, serial on cuda:0 against Ray on 2
#                          GPUs, scores compared bit for bit (RAY_BENCH_ARGS adds options), to $OUT
# On the CPU (checks this script): OUT=/tmp/out RAY_TINY=1 scripts/gpu_ray.sh A, then ... B
set -euo pipefail
cd "$(dirname "$0")/.."
carry=gpu-carry
state=cache/gpu-ray
site=$PWD/$state/site
out=${OUT:-$PWD/$state/out}
py=${PYTHON:-$(command -v python || command -v python3)}
wheel=$state/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
sha=b951b40965947a63615830916be04f26440d234de1e9a29dbf2155d03fa9ad2a
mkdir -p "$state" "$site" "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_USAGE_STATS_ENABLED=0
case "${1:-}" in
A)
  if compgen -G "$carry/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-deps --no-index --target "$site" "$carry"/wheels/*.whl
  fi
  [ -f "$carry/ray.whl.part00" ] && cp "$carry/ray.whl.part00" "$state/"
  "$py" -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")' \
    | tee "$out/versions.txt"
  ;;
B)
  [ -f "$carry/ray.whl.part01" ] && cp "$carry/ray.whl.part01" "$state/"
  if ! "$py" -c 'import ray' 2>/dev/null; then
    cat "$state/ray.whl.part00" "$state/ray.whl.part01" > "$wheel"
    echo "$sha  $wheel" | sha256sum -c - || { echo "error: the joined Ray wheel has the wrong sha256: carry both parts again" >&2; exit 1; }
    "$py" -m pip install -q --no-deps --no-index --target "$site" "$wheel"
  fi
  if [ "${RAY_TINY:-}" = 1 ]; then
    "$py" benchmarks/ray_scaling.py --tiny --out "$out/ray_scaling_tiny.json" 2>&1 | grep -v "Loading weights" | tee "$out/log_B.txt"
  else
    # ${RAY_BENCH_ARGS} unquoted on purpose: several options
    # shellcheck disable=SC2086
    timeout 570 "$py" benchmarks/ray_scaling.py --gpus 2 --out "$out/ray_scaling.json" ${RAY_BENCH_ARGS:-} 2>&1 \
      | grep -v "Loading weights" | tee "$out/log_B.txt"
  fi
  ;;
*)
  echo "usage: scripts/gpu_ray.sh A|B (see the comments at the top)" >&2
  exit 2
  ;;
esac
