#!/bin/bash
source /work/main/.venv/bin/activate
base=/work/main/delrec/configs/demo.yaml
variant() {
  name=$1; shift
  python - "$base" "$name.yaml" "$@" <<'PY'
import sys, yaml
src, dst, *edits = sys.argv[1:]
cfg = yaml.safe_load(open(src))
for e in edits:
    key, value = e.split("=", 1)
    sec, k = key.split(".")
    cfg[sec][k] = yaml.safe_load(value)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
  rm -rf "$name"  # the first batch (run.sh, run2.sh) started from a copy of the baseline run folder, so unchanged stages were skipped
  start=$(date +%s)
  delrec run "$name.yaml" --out "$name" > "$name.out" 2>&1
  echo "== $name ($(( $(date +%s) - start )) s): $*" >> results.txt
  grep -E "Popularity|LLM|student SASRec" "$name/report/table.md" >> results.txt
}
variant pre480 llm.pretrain_steps=480
variant listwise stage2.objective=listwise
variant epochs3 stage2.num_train_epochs=3
variant pre480_listwise llm.pretrain_steps=480 stage2.objective=listwise
variant lw_ep3 stage2.objective=listwise stage2.num_train_epochs=3
variant lw_ep6 stage2.objective=listwise stage2.num_train_epochs=6
variant lw_ep3_lr3 stage2.objective=listwise stage2.num_train_epochs=3 stage2.learning_rate=0.003
variant u1000_lw data.synthetic_users=1000 stage2.objective=listwise stage2.max_train_instances=1000
variant small_lw_ep3 llm.size=small stage2.objective=listwise stage2.num_train_epochs=3
variant small llm.size=small  # stopped unfinished: no result
