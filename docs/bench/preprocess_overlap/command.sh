# The before/after of docs/BENCHMARKS.md "Stages overlap" (issue 20 item 3): the in-process profile of
# tools/preprocess_profile.py, before the decode lanes and writer thread (/tmp/before20: git archive 2d15ad8,
# with this commit's tools/preprocess_profile.py copied in) and after, alternating, three rounds; the
# record checksums of both must be equal clip for clip (features byte-identical).
set -e
for round in 1 2 3; do
  python /tmp/before20/tools/preprocess_profile.py --corpus /tmp/pp_corpus \
      --out docs/bench/preprocess_overlap/before_$round.txt --checksums /tmp/ck_before_$round.json
  python tools/preprocess_profile.py --corpus /tmp/pp_corpus \
      --out docs/bench/preprocess_overlap/after_$round.txt --checksums /tmp/ck_after_$round.json
  cmp /tmp/ck_before_$round.json /tmp/ck_after_$round.json && echo "round $round: checksums identical"
done
