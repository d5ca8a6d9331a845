#!/usr/bin/env bash
# Every existing defense against the Bypass records, then one Markdown table of their summary figures.
#
#   bash bench/bypass_defenses.sh                                  # record/bypass_badnet_demo, record/bypass_blend_demo
#   bash bench/bypass_defenses.sh bypass_badnet_demo badnet_demo   # any attack records
#   FORCE=1 bash bench/bypass_defenses.sh                          # re-run defenses whose output already exists
#   EXTRA="--epochs 1" bash bench/bypass_defenses.sh               # extra options for every defense (quick checks)
#
# Jobs whose script does not exist (yet) are skipped; a failing job is reported and the others go on.
set -u
cd "$(dirname "$0")/.."
records=("$@")
[ ${#records[@]} -eq 0 ] && records=(bypass_badnet_demo bypass_blend_demo)

# job = "output folder|script|options"
jobs=(
  "pdb|defense/pdb.py|"
  "sau|defense/sau.py|"
  "fmp|defense/fmp.py|"
  "ft|defense/ft.py|--ft_mode ft"
  "lp|defense/ft.py|--ft_mode lp"
  "fe-tuning|defense/ft.py|--ft_mode fe-tuning"
  "ft-init|defense/ft.py|--ft_mode ft-init"
  "fst|defense/fst.py|"
)
# any other defense script that appears later runs with its defaults
for f in defense/*.py; do
  n=$(basename "$f" .py)
  case "$n" in __init__|pdb|sau|fmp|ft|fst) ;; *) jobs+=("$n|$f|") ;; esac
done

failed=()
for rec in "${records[@]}"; do
  if [ ! -f "record/$rec/summary.json" ] && [ ! -f "$rec/summary.json" ]; then
    echo "== $rec: no complete attack record, skipped"; continue
  fi
  recdir="record/$rec"; [ -d "$rec" ] && recdir="$rec"
  for job in "${jobs[@]}"; do
    IFS='|' read -r out script opts <<< "$job"
    if [ ! -f "$script" ]; then echo "== $rec / $out: $script does not exist, skipped"; continue; fi
    flag=""
    if [ -f "$recdir/defense/$out/summary.json" ]; then
      if [ "${FORCE:-0}" = 1 ]; then flag="--overwrite"; else echo "== $rec / $out: done already (FORCE=1 re-runs)"; continue; fi
    fi
    echo "== $rec / $out: python $script --result_file $rec $opts ${EXTRA:-} $flag"
    start=$(date +%s)
    # shellcheck disable=SC2086
    if python "$script" --result_file "$rec" $opts ${EXTRA:-} $flag > "/tmp/bypass_defense_${out}_$(basename "$rec").log" 2>&1; then
      echo "   ok in $(( $(date +%s) - start ))s"
    else
      echo "   FAILED (log: /tmp/bypass_defense_${out}_$(basename "$rec").log):"; tail -n 3 "/tmp/bypass_defense_${out}_$(basename "$rec").log"
      failed+=("$rec/$out")
    fi
  done
done

python - "${records[@]}" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from utils.record import record_path
f = lambda v: f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-"
print("\n| attack record | defense | ACC | ASR | RA | attack ACC | attack ASR | attack RA | DER | RIR | seconds |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for rec in sys.argv[1:]:
    root = record_path(rec) / "defense"
    for s in sorted(root.glob("*/summary.json")) if root.exists() else []:
        d = json.loads(s.read_text())
        print(f"| {Path(rec).name} | {s.parent.name} | {f(d.get('test_acc'))} | {f(d.get('test_asr'))} | {f(d.get('test_ra'))} | "
              f"{f(d.get('attack_test_acc'))} | {f(d.get('attack_test_asr'))} | {f(d.get('attack_test_ra'))} | "
              f"{f(d.get('der'))} | {f(d.get('rir'))} | {d.get('seconds', '-')} |")
print("\n(percent; DER and RIR x100; PDB's ACC/ASR/RA are its defended model's)")
EOF
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
