#!/usr/bin/env bash
# GPU readiness in one go (issue 18, target 4), for a CUDA machine:
#   1. the CUDA-marked tests (pytest -m cuda), at most 3 minutes;
#   2. the CIFAR-10 timing of the airbench recipe (`bench/cifar10.py --recipe fast`: 10 epochs
#      at batch 1024 on a GPU, test accuracy after each epoch outside the timed training),
#      at most 4 minutes; target >= 94% in <= 3.0 s of training on an H200.
# The whole script stops itself at 8 minutes. It writes gpu_check.json (+ the logs) under
# $OUT when set, else bench/results/. `--dry-run` checks the machinery without a GPU: it
# prints the commands, runs nothing heavy and writes the JSON with "dry_run": true.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run    # anywhere
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONPATH=$PWD
START=$(date +%s)
DEADLINE=$((START + 470))  # 7 min 50 s: the JSON is written before 8 minutes

left() { echo $((DEADLINE - $(date +%s))); }
run_step() {  # run_step NAME LIMIT_S CMD... -> NAME.log, NAME.rc
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  echo "== $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then echo "dry run" > "$DEST/$name.log"; echo 0 > "$DEST/$name.rc"; return; fi
  if [ "$limit" -le 5 ]; then echo "no time left" > "$DEST/$name.log"; echo 124 > "$DEST/$name.rc"; return; fi
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  echo $? > "$DEST/$name.rc"
  tail -3 "$DEST/$name.log"
}

"$PY" - <<'EOF' > "$DEST/gpu_env.json" 2>/dev/null || echo '{"torch": "not importable"}' > "$DEST/gpu_env.json"
import json, torch
d = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
if torch.cuda.is_available():
    d["device"] = torch.cuda.get_device_name(0)
    d["bf16"] = torch.cuda.is_bf16_supported()
print(json.dumps(d))
EOF
CUDA=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1])).get('cuda_available', False)))" "$DEST/gpu_env.json" 2>/dev/null || echo 0)
if [ "$CUDA" != 1 ] && [ "$DRY" = 0 ]; then
  echo "no CUDA device visible to torch: nothing to check (use --dry-run to test this script)" >&2
fi

if [ "$CUDA" = 1 ] || [ "$DRY" = 1 ]; then
  run_step cuda_tests 180 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
  run_step cifar10_airbench 240 "$PY" bench/cifar10.py --recipe fast -- --device cuda
fi

"$PY" - "$DEST" "$DRY" "$CUDA" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

dest, dry, cuda, start = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])

def step(name):
    rc_file = dest / f"{name}.rc"
    if not rc_file.is_file():
        return None
    log = (dest / f"{name}.log").read_text(errors="replace") if (dest / f"{name}.log").is_file() else ""
    return {"rc": int(rc_file.read_text().strip() or 1), "log_tail": log.strip().splitlines()[-5:]}

out = {"bench": "gpu_check", "dry_run": dry, "cuda": cuda, "env": json.loads((dest / "gpu_env.json").read_text()),
       "cuda_tests": step("cuda_tests"), "cifar10": step("cifar10_airbench")}
c = out["cifar10"]
if c and c["rc"] == 0 and not dry:
    log = (dest / "cifar10_airbench.log").read_text()
    try:  # bench/cifar10.py prints one indented JSON object after the per-epoch lines
        res = json.loads(log[log.index("{\n"):])
        out["cifar10"].update({k: res.get(k) for k in ("train_time_s", "test_accuracy", "time_to_94_s",
                                                        "time_to_90_s", "epochs", "peak_rss_mb")})
        out["cifar10"]["meets_target"] = bool(res["test_accuracy"] >= 0.94 and res["train_time_s"] <= 3.0)
    except (ValueError, KeyError) as exc:
        out["cifar10"]["parse_error"] = str(exc)
out["wall_s"] = round(time.time() - start, 1)
out["ok"] = bool(cuda and all(s and s["rc"] == 0 for s in (out["cuda_tests"], out["cifar10"]))) if not dry else None
(dest / "gpu_check.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
EOF
