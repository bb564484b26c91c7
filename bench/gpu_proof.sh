#!/usr/bin/env bash
# The GPU proof (issue "Prove the GPU path on a real GPU"), as one prepared script for a lent GPU machine.
#
# Before the first device call, on the development machine (see docs/GPU.md):
#   pip download --no-deps nvidia-dali-cuda120==2.4.0 av hypothesis sortedcontainers attrs -d /tmp/w
#   python ../shared/tools/split_file.py split /tmp/w/nvidia_dali_cuda120-2.4.0-*.whl .gpu/dali --size 60
#   cp /tmp/w/av-*.whl /tmp/w/hypothesis-*.whl /tmp/w/sortedcontainers-*.whl /tmp/w/attrs-*.whl ../shared/tools/split_file.py .gpu/
#   python -m dali_float.demo .gpu/corpus512 --seconds 120 --size 512     # 2 min of 512x512 H.264 (~13 MB)
#   python -m dali_float.faces_corpus .gpu/faces --clips 8 --seconds 8      # real faces, 720p/1080p H.264 (--crop face)
#   echo .gpu/ >> .git/info/exclude
# Then one device call per part (carry .gpu/dali/part-NNN, the first also .gpu/dali/NAME) that copies it to
# /root/parts/, back to back, and finally: carry .gpu (without dali/), run `bash bench/gpu_proof.sh`.
# Everything the checks print lands in $OUT (at most 8 files come back).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_proof_out}
mkdir -p "$OUT"
export DALI_FLOAT_HOME=/root/dali_float_home PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

log "install"
python3 .gpu/split_file.py join /root/parts /root/wheel || exit 1
python3 -m pip install -q --no-deps /root/wheel/nvidia_dali_cuda120-*.whl .gpu/*.whl || exit 1
{ nvidia-smi; python3 -c "import torch, nvidia.dali, transformers; print(torch.__version__, nvidia.dali.__version__, transformers.__version__)"; } \
  > "$OUT/machine.txt" 2>&1

log "NVDEC: a DALI mixed decode of one H.264 clip"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
from pathlib import Path
import numpy as np
from dali_float import media
clip = sorted(Path(".gpu/corpus512").rglob("*.mp4"))[0]
info = media.probe_video(clip)
decoder = media.FrameDecoder(512, "cuda")
frames = list(decoder.decode(info, np.arange(min(50, info.num_frames))))
print(f"{clip.name}: codec {info.codec}, decoder {decoder.last_decoder}, {sum(len(f) for f in frames)} frames, "
      f"{frames[0].dtype} on {frames[0].device}")
assert decoder.last_decoder == "dali-gpu", "NVDEC was not used"
EOF

log "pytest -m gpu"
python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -40 > "$OUT/pytest_gpu.txt"
tail -3 "$OUT/pytest_gpu.txt" | tee -a "$OUT/summary.txt"

log "preprocess: demo corpus and 2 minutes of 512x512 H.264, float preset, on the GPU"
{ python3 preprocess.py --preset float --device cuda --no_progress
  python3 preprocess.py --preset float --device cuda --no_progress --data_root .gpu/corpus512
  python3 preprocess.py status --json --preset float --data_root .gpu/corpus512; } > "$OUT/preprocess.txt" 2>&1
grep -E "frames/s|cached|failed|decoder" "$OUT/preprocess.txt" | tail -12 | tee -a "$OUT/summary.txt"

log "resident vs pread vs the host-to-device copy ceiling: float preset, cuda (the demo corpus's float cache)"
# Loaders and ceilings only (a few minutes): dali pread (host read + copy to the GPU), dali resident (the
# partition in GPU memory, the windows cut there), python; the ceilings: os.preadv from the page cache, that
# plus pinned host -> GPU, and a gather in GPU memory; the partition's load time and bytes. The full bench
# below measures them again among everything else.
python3 bench/compare.py --device cuda --preset float --strategies_only --json "$OUT/resident.json" --no_progress \
  > /root/resident.md 2>&1
grep -E "^\| (dali|ceiling) |dali resident|resident / pread|Errors|error" /root/resident.md | tee -a "$OUT/summary.txt"
python3 train.py --loader dali --preset float --steps 60 --log_every 20 --no_progress --output_dir /root/run_auto \
  > /root/train_auto.txt 2>&1
grep -E "read strategy|resident partition|done:|error" /root/train_auto.txt | tail -5 | tee -a "$OUT/summary.txt"

log "clip lengths on the GPU: the same frames as long videos, 8-s and 2.4-s files, 2.4-s segments (issue 20)"
# frames/s per shape and the ratio to long videos, NVDEC streams in flight, the encoder's busy fraction
python3 bench/compare.py --device cuda --clip_lengths_only --json "$OUT/clip_lengths.json" --no_progress \
  > /root/clip_lengths.md 2>&1
grep -E "^\| (long|files|--segments)|error" /root/clip_lengths.md | tee -a "$OUT/summary.txt"

log "preprocess: real faces at 720p/1080p, float preset on the GPU, --crop face against --crop center"
{ python3 preprocess.py --preset float --device cuda --no_progress --data_root .gpu/faces --crop center --cache_dir /root/fc
  python3 preprocess.py --preset float --device cuda --no_progress --data_root .gpu/faces --crop face --cache_dir /root/fc
  python3 preprocess.py show hopper_1080p_left.mp4 --json --preset float --data_root .gpu/faces --crop face --cache_dir /root/fc
} > "$OUT/framing.txt" 2>&1
grep -E "frames/s|skipped|crop_box" "$OUT/framing.txt" | tail -8 | tee -a "$OUT/summary.txt"

log "bench/compare.py --device cuda --preset float"
python3 bench/compare.py --device cuda --preset float --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  --no_progress > "$OUT/bench.md" 2>&1
tail -30 "$OUT/bench.md" >> "$OUT/summary.txt"

log "train.py --loader dali --preset float --steps 300"
python3 train.py --loader dali --preset float --steps 300 --log_every 25 --no_progress --output_dir /root/run \
  > "$OUT/train.txt" 2>&1
grep -E "done:|data-wait" "$OUT/train.txt" | tail -5 | tee -a "$OUT/summary.txt"

log "sampler render from that run (float16 decoder, a 50-frame chunk per call)"
clip=$(ls "$DALI_FLOAT_HOME"/demo/*/Actor_01/*.mp4 | head -1)
python3 -m dali_float.sampler render --checkpoint /root/run --ref "$clip" --audio "$clip" --out /root/render.mp4 \
  --device cuda --no_progress > /root/render.txt 2>&1
grep -E "wrote|error" /root/render.txt | tail -3 | tee -a "$OUT/summary.txt"
log "done"
