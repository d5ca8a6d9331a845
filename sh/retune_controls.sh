#!/bin/sh
# The re-tuning attack's reference points for the 3-seed demo grid (config/sweep/demo_seeds.yaml, run first with
# its `retune: true`): a clean model per seed, the clean-model control on every attack record (the ASR that the
# re-tuning set's 15 poisoned samples teach a model that never had the backdoor) and the undefended model
# re-tuned; then the universal reactivation (--qra universal) on every seed-0 defense record. Results:
# record/sweep_demo_seeds/summary/ (rows control+retune, none+retune, <defense>+retune with variant qra=universal).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=${ROOT:-sweep_demo_seeds}
# once: a complete record is kept (rerunning the script goes on where it stopped)
once() { out=$1; shift; [ -f "record/$out/summary.json" ] || "$PY" "$@" --resume; }
for s in 0 1 2; do
  clean=clean_fashion_mnist_cnn_s$s
  once $clean attack/badnet.py --p_num 1 --random_seed $s --save_folder_name $clean
  for a in badnet blend; do
    rec=$ROOT/${a}_fashion_mnist_cnn_p0.1_t0_s$s
    once "$rec/retune_control" analysis/retune.py --result_file "$rec" --start_model $clean --random_seed $s
    once "$rec/retune" analysis/retune.py --result_file "$rec" --random_seed $s
  done
done
for a in badnet blend; do
  rec=$ROOT/${a}_fashion_mnist_cnn_p0.1_t0_s0
  for d in record/"$rec"/defense/*/; do
    d=$rec/defense/$(basename "$d")
    once "$d/retune_qra" analysis/retune.py --result_file "$d" --qra universal \
      --qra_clean_model clean_fashion_mnist_cnn_s0 --out_suffix _qra
  done
done
"$PY" analysis/summarize.py record/$ROOT --html
