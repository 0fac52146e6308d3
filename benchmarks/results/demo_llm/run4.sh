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
  rm -rf "$name"
  start=$(date +%s)
  delrec run "$name.yaml" --out "$name" > "$name.out" 2>&1
  echo "== $name ($(( $(date +%s) - start )) s): $*" >> results.txt
  grep -E "Popularity|LLM|student SASRec" "$name/report/table.md" >> results.txt
}
variant small_lw_ep3 llm.size=small stage2.objective=listwise stage2.num_train_epochs=3
variant small llm.size=small
