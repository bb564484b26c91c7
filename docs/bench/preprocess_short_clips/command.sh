# The before/after comparison of docs/BENCHMARKS.md "Short clips" (issue 20), rounds 3-5 (1-2 ran before
# plan.balance kept a video's segments together, and on a busier machine).
# /tmp/base: the parent commit's tree (git archive 5c9b179 | tar -x -C /tmp/base) with this
# tools/preprocess_profile.py copied in (its counters read "-" there: the code has none).
cd /work/wt-batch
for round in 3 4 5; do
  nice -n 5 python /tmp/base/tools/preprocess_profile.py --corpus /tmp/pp_corpus --out /tmp/meas/cmp_before_$round.txt --checksums /tmp/meas/ck_cmp_before_$round.json
  nice -n 5 python tools/preprocess_profile.py --corpus /tmp/pp_corpus --out /tmp/meas/cmp_after_$round.txt --checksums /tmp/meas/ck_cmp_after_$round.json
done
