#!/usr/bin/env bash
# The same jaxft commands in this checkout and in another one (e.g. the commit before a refactor), and a
# byte-for-byte comparison of what they write: for changes that must not change behaviour.
#
#   bash scripts/same_outputs.sh OTHER_CHECKOUT [WORK_DIR]
#
# Each checkout runs its own ./.venv/bin/jaxft (create it with `bash scripts/quickstart.sh` or
# `. scripts/_venv.sh test` there first). Small runs of every verb that writes files, on the shipped configs
# with a few overrides: task-data, train (sft, reward, dpo, grpo, ppo), eval, export (peft, merged, gguf,
# gguf-lora), score, merge-adapters, cai revise / label. Files that hold times (metrics, TensorBoard, plots,
# checkpoints, cai summaries' timings) are not compared; everything else must be identical. Prints one line per
# file and exits 1 on a difference.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
other=$(cd "${1:?usage: same_outputs.sh OTHER_CHECKOUT [WORK_DIR]}" && pwd)
work=${2:-$(mktemp -d /tmp/jaxft-same-XXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_all() {  # $1: checkout, $2: its output directory
  local co=$1 w=$2 jx="$1/.venv/bin/jaxft"
  mkdir -p "$w"
  cd "$co"
  local d="$w/data" small="train.eval_every=0 train.save_every=0"
  "$jx" task-data "$d" --train 48 --validation 8 --test 8 --pairs > "$w/task-data.out"
  local sft=(configs/quickstart.yaml train.steps=2 $small data.train="$d/train.jsonl"
             data.validation="$d/validation.jsonl" eval.file="$d/test.jsonl" eval.max_examples=4
             eval.max_new_tokens=16 train.out_dir="$w/sft")
  "$jx" train "${sft[@]}" > "$w/sft.out" 2> /dev/null
  "$jx" eval "${sft[@]}" > "$w/eval.out" 2> /dev/null
  for fmt in peft merged gguf gguf-lora; do
    "$jx" export "$w/sft" --format "$fmt" --out "$w/export-$fmt" --gguf-type q8_0 2> /dev/null >> "$w/export.out"
  done
  local pairs=(data.train="$d/train_pairs.jsonl" data.validation="$d/validation_pairs.jsonl" train.steps=2 $small)
  "$jx" train configs/reward_lora.yaml "${pairs[@]}" train.out_dir="$w/reward" > "$w/reward.out" 2> /dev/null
  "$jx" score "$w/reward" --input "$d/validation_pairs.jsonl" --out "$w/scores.jsonl" > "$w/score.out"
  "$jx" train configs/dpo_lora.yaml "${pairs[@]}" eval.file="$d/test.jsonl" train.out_dir="$w/dpo" > "$w/dpo.out" 2> /dev/null
  "$jx" export "$w/dpo" --format peft --out "$w/dpo-peft" 2> /dev/null >> "$w/export.out"
  "$jx" merge-adapters "$w/sft" "$w/dpo" --weights 1 -0.5 --method cat --out "$w/merged-adapter" 2> /dev/null \
    > "$w/merge.out"
  local rl=(data.train="$d/train.jsonl" data.validation="$d/validation.jsonl" rollout.max_completion_length=8)
  "$jx" train configs/grpo_lora.yaml "${rl[@]}" train.steps=1 train.save_every=0 train.out_dir="$w/grpo" \
    eval.file="$d/test.jsonl" > /dev/null 2>&1
  "$jx" export "$w/grpo" --format peft --out "$w/grpo-peft" 2> /dev/null >> "$w/export.out"
  "$jx" train configs/ppo_lora.yaml "${rl[@]}" train.steps=1 train.save_every=0 train.out_dir="$w/ppo" \
    ppo.reward_model="$w/reward" eval.file="$d/test.jsonl" > /dev/null 2>&1
  "$jx" export "$w/ppo" --format peft --out "$w/ppo-peft" 2> /dev/null >> "$w/export.out"
  local cai=(configs/cai_task.yaml cai.prompts="$d/train.jsonl" cai.heldout="$d/test.jsonl" cai.max_prompts=2
             cai.batch_size=2 cai.label_batch_size=2 cai.max_new_tokens=8 cai.out_dir="$w/cai")
  "$jx" cai revise "${cai[@]}" 2> /dev/null > "$w/cai-revise.out"
  "$jx" cai label "${cai[@]}" 2> /dev/null > "$w/cai-label.out"
}

echo "work: $work"
run_all "$other" "$work/other"
run_all "$here" "$work/this"
# Text files are compared with each side's work directory replaced by W (a run's config.json, scores.jsonl's
# file:line column hold paths); the JSON lines a command prints lose their timings (elapsed, tokens_per_s).
python3 - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
SKIP = ("checkpoints", "tensorboard", "rollouts")
TIMES = ("elapsed", "tokens_per_s", "time/")
def files(side):
    root = work / side
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
            and not any(s in p.parts for s in SKIP) and p.name not in ("metrics.jsonl", "manifest.json")
            and p.suffix != ".png" and not (p.name == "summary.json" and "cai" in p.parts)}
def norm(side, rel):
    raw = (work / side / rel).read_bytes()
    if pathlib.Path(rel).suffix not in (".json", ".jsonl", ".out", ".sh", ".yaml", ".txt", ".md"):
        return raw
    text = raw.decode("utf-8").replace(str(work / side), "W")
    lines = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if not any(k.startswith(t) for t in TIMES)}
        lines.append(json.dumps(row, sort_keys=True))
    return "\n".join(lines).encode()
a, b = files("other"), files("this")
bad = 0
for rel in sorted(a | b):
    if rel not in a or rel not in b:
        print(f"ONLY IN {'other' if rel in a else 'this'}  {rel}")
        bad = 1
    elif norm("other", rel) == norm("this", rel):
        print(f"same     {rel}")
    else:
        print(f"DIFFERS  {rel}")
        bad = 1
print(f"{len(a | b)} files compared: {'all the same' if not bad else 'DIFFERENCES'}")
sys.exit(bad)
PY
