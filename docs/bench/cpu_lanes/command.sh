# Does a decode lane pay on 2 CPU cores? (issue 20 item 3; docs/BENCHMARKS.md "Stages overlap")
# Whole `preprocess.py` runs (forced, tiny, --crop center, one worker) on the clip-length probe's corpus
# (bench/compare.py --clip_lengths_only builds it), three ways alternating, two rounds:
#   before: /tmp/before20 (git archive 2d15ad8: no lanes, no writer thread)
#   lanes0: this checkout, --clips_in_flight 0 (prepare, decode and encode in turn; the writer thread)
#   lanes1: this checkout, --clips_in_flight 1 (one decode lane thread beside the encoder)
# Prints one line per run: round, shape, variant, wall seconds, frames/s.
C=${CORPUS:-$HOME/.cache/dali_float/bench/clip_lengths-4x60s-128px-seed20}
run() {  # variant, shape args...
  local variant=$1; shift
  local code=. extra=()
  case $variant in before) code=/tmp/before20;; lanes0) extra=(--clips_in_flight 0);; lanes1) extra=(--clips_in_flight 1);; esac
  rm -rf /tmp/lanes_cache
  local t0=$(date +%s.%N)
  python $code/preprocess.py --preset tiny --crop center --force_preprocess --no_progress --workers 1 \
      --cache_dir /tmp/lanes_cache "$@" "${extra[@]}" 2>/tmp/lanes_run.log || { tail -3 /tmp/lanes_run.log; exit 1; }
  local t1=$(date +%s.%N)
  python -c "import sys; w=$t1-$t0; print(f'{sys.argv[1]} {sys.argv[2]} {sys.argv[3]} {w:.2f} s {6000/w:.1f} frames/s')" "$round" "$shape" "$variant"
}
for round in 1 2; do
  for shape in long segments_2.4s; do
    if [ $shape = long ]; then args=(--data_root $C/long); else args=(--data_root $C/long --segments $C/segments_2.4s.csv); fi
    for variant in before lanes0 lanes1; do run $variant "${args[@]}"; done
  done
done
