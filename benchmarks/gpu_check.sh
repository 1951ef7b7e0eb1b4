#!/usr/bin/env bash
# The GPU check, as one prepared run on a machine with a CUDA GPU and no network:
#
#     bash benchmarks/gpu_check.sh        # from the repo root; results in $OUT (default ./gpu_check_out)
#
# It needs gpu_wheels/ (made here by benchmarks/gpu_wheels.sh, carried along) and uses the
# machine's own python3 with its CUDA torch; GPU_PYTHON names another interpreter (here, to try
# the script on a CPU machine: GPU_PYTHON=.venv/bin/python, and the cuda tests skip).
#
# Steps, each under `timeout` and allowed to fail without stopping the others:
#   1. versions: python, torch, CUDA, the GPU;
#   2. install the carried wheels into a private folder put first on PYTHONPATH (no venv: the
#      image's python3 is itself a venv, so `venv --system-site-packages` would not see its torch);
#   3. pytest tests/tasks/test_cuda.py and tests/mpc/test_device.py (training LR / MLP / DP-SGD,
#      resume, inference with runtime.device: cuda);
#   4. benchmarks/suite.py on cuda (TTP): W1 at 65,536 (profiled) and 4,096 rows (raw CrypTen and mpcfl),
#      W2/W3 inference (raw, raw+patches, mpcfl); each writes $OUT/<step>.json;
#   5. the breast-cancer demo job on cuda (W4): seconds per epoch, test accuracy, traffic
#      (GPU_DEMO_CPU=1 also runs it on the cpu first);
#   6. transformers: the cuda transformer tests (dealer truncation of CUDA shares and a Hugging Face
#      BERT with three parties; two steps of secure ViT training), then benchmarks/transformer_shapes.py
#      on cuda, one launch per way so that each finished way is kept: BERT-base at sequence length 128
#      (GPU_BERT_SIZE, GPU_BERT_LENGTH), first inference timed (no warm-up);
#   7. transformer_grid: BERT-tiny and -mini at 32 and 128 on cuda (a warm-up and one timed inference of each
#      way; the median of 3 did not fit its slot on an H200), and a GPT-2-small-shaped decoder.
# GPU_STEPS picks steps 3-7 by name (default "tests suite demo"; "transformers" is step 6 and
# "transformer_grid" step 7), as a device's 15 minutes hold about one of them at the full sizes;
# GPU_BERT_WAYS the ways of step 6.
# $OUT/gpu_results.json is written whatever happens (on exit), with every step's exit status, the
# tail of every log and every JSON a step wrote (folded in: the device tool brings back 8 files at
# most); the default steps' limits add up to 590 s and their usual run takes about 450 s; a step
# past its limit is killed and the rest go on.
set -u
set -x
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
PY=${GPU_PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/mpcfl-gpu-site}
WORK=$(mktemp -d /tmp/mpcfl-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1
declare -A STATUS=()

step() {  # step NAME SECONDS COMMAND...: runs it under timeout, its output in $OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    STATUS[$name]="$rc $((SECONDS - started))"
    echo "== step $name: exit $rc after $((SECONDS - started)) s"
    tail -n 25 "$OUT/$name.log"
    return 0
}

write_results() {
    local statuses=""
    for name in "${!STATUS[@]}"; do statuses+="$name ${STATUS[$name]}"$'\n'; done
    STATUSES="$statuses" WORK="$WORK" OUT="$OUT" "$PY" - <<'EOF' || echo "could not write gpu_results.json"
import json, os, re, statistics, xml.etree.ElementTree as ET
from pathlib import Path

out, work = Path(os.environ["OUT"]), Path(os.environ["WORK"])
results = {"steps": {}}
for line in os.environ["STATUSES"].splitlines():
    name, rc, seconds = line.split()
    results["steps"][name] = {"exit": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")}
versions = out / "versions.log"
if versions.exists():
    results["versions"] = [l for l in versions.read_text().splitlines() if not l.startswith("+")][-12:]
junit = out / "pytest_cuda.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                cases[f"{case.get('name')}"] = {"outcome": outcome, "seconds": float(case.get("time", 0)),
                                                "message": (found.get("message") or "")[:500]}
                break
        else:
            cases[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    results["pytest"] = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} | {"cases": cases}
elif (out / "pytest_cuda.log").exists():  # cut short: what -v printed before the end
    lines = re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", (out / "pytest_cuda.log").read_text())
    results["pytest"] = {"cut_short": True, "cases": {name: {"outcome": outcome.lower()} for name, outcome in lines}}
for device in ("cpu", "cuda"):
    record = {}
    metrics = work / f"demo_{device}" / "out" / "hospital_b" / "latest" / "metrics.json"
    if metrics.exists():
        data = json.loads(metrics.read_text())
        seconds = [row["seconds"] for row in data["history"]]
        record = {
            "epochs": len(seconds),
            "seconds_per_epoch_median": statistics.median(seconds[1:] or seconds),
            "seconds_first_epoch": seconds[0],
            "test_accuracy": data["final"].get("test_accuracy"),
            "train_loss": data["final"].get("loss"),
            "rounds_per_epoch_hospital_b": data["history"][-1].get("rounds"),
            "bytes_per_epoch_hospital_b": data["history"][-1].get("bytes"),
        }
    log = out / f"demo_{device}.log"
    if log.exists():
        text = log.read_text()
        record["computing_on"] = sorted(set(re.findall(r"computing on (\S+)", text)))
        errors = [l for l in text.splitlines() if "error" in l.lower()][-3:]
        if errors:
            record["errors"] = errors
    if device in results["steps"] or record:
        record["job_seconds"] = results["steps"].get(f"demo_{device}", {}).get("seconds")
        results[f"demo_{device}"] = record
for path in sorted(out.glob("*.json")):  # folded in here: the device tool brings back 8 files at most
    if path.name != "gpu_results.json":
        try:
            results.setdefault("json", {})[path.stem] = json.loads(path.read_text())
        except ValueError as err:
            results.setdefault("json", {})[path.stem] = f"unreadable: {err}"
        path.unlink()
for log in sorted(out.glob("*.log")):
    results.setdefault("logs", {})[log.stem] = log.read_text(errors="replace").splitlines()[-40:]
    log.unlink()
(out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps(results, indent=2))
junit.unlink(missing_ok=True)  # read into gpu_results.json; the device tool brings back 8 files at most
EOF
    rm -rf "$WORK"
}
trap write_results EXIT

# 1. What this machine has.
step versions 30 bash -c "
    set -x; uname -m; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    command -v '$PY'; '$PY' -c 'import sys; print(sys.version)'
    '$PY' -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'
    '$PY' -m pip --version; ls gpu_wheels"

# 2. The carried wheels, into a folder of their own, first on the path (the repo itself second).
rm -rf "$SITE"
step install 60 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" --find-links gpu_wheels -r gpu_wheels/requirements.txt
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
step imports 45 "$PY" -c "import mpcfl, torch; from mpcfl.mpc.engine import import_crypten; c = import_crypten(); import transformers; print(mpcfl.__file__, c.__version__, torch.__version__, torch.cuda.is_available(), transformers.__version__)"

STEPS=" ${GPU_STEPS:-tests suite demo} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# 3. The cuda tests (they skip where torch sees no GPU).
wanted tests && step pytest_cuda 200 "$PY" -m pytest -v -p no:cacheprovider -o addopts="" -rA --timeout 200 \
    --junitxml="$OUT/pytest_cuda.xml" tests/mpc/test_device.py tests/tasks/test_cuda.py

# 4. The benchmark suite on cuda: W1 at two sizes (the issue's 65,536-row target), W2/W3.
suite() {  # suite NAME SECONDS ARGS...: one suite.py run, its JSON in $OUT/NAME.json
    local name=$1 seconds=$2
    shift 2
    step "$name" "$seconds" "$PY" benchmarks/suite.py --providers ttp --device cuda --json "$OUT/$name.json" "$@"
}
if wanted suite; then
    suite w1_cuda_65k 100 --workloads w1 --rows 65536 --quick --ways raw mpcfl --profile  # where the gap to raw goes
    suite w1_cuda_4k 50 --workloads w1 --quick --ways raw mpcfl
    suite w23_cuda 90 --workloads w2 w3 --repeats 2
fi

# 5. The demo job, on cuda (and first on the cpu if asked): the same job but for runtime.device.
demo_devices=""
wanted demo && demo_devices="${GPU_DEMO_CPU:+cpu} cuda"
for device in $demo_devices; do
    mkdir -p "$WORK/demo_$device"
    "$PY" - "$device" "$WORK/demo_$device" <<'EOF'
import sys
from pathlib import Path
import yaml

device, folder = sys.argv[1], Path(sys.argv[2])
config = Path("configs/breast_cancer_lr.yaml").resolve()
spec = yaml.safe_load(config.read_text())
for party in spec["parties"]:
    party["data"] = {k: str((config.parent / v).resolve()) for k, v in party["data"].items()}
spec["outputs"]["dir"] = str(folder / "out")
spec["runtime"]["device"] = device
(folder / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
    step "demo_$device" 60 "$PY" -m mpcfl run "$WORK/demo_$device/job.yaml"
done

# 6. Transformers: the cuda tests, then BERT-base on cuda, one way per launch (friendly first: the goal's numerator).
if wanted transformers; then
    step pytest_transformers 150 "$PY" -m pytest -v -p no:cacheprovider -o addopts="" -rA --timeout 140 \
        "tests/tasks/test_cuda.py::test_dealer_truncation_and_a_huggingface_bert_on_cuda" \
        "tests/models/test_transformer_training.py::test_two_parties_and_the_dealer_train_a_vit_like_plaintext_torch[cuda]"
    for way in ${GPU_BERT_WAYS:-mpc_friendly raw exact}; do
        step "bert_$way" "${GPU_BERT_SECONDS:-120}" "$PY" benchmarks/transformer_shapes.py --device cuda --threads 4 \
            --sizes "${GPU_BERT_SIZE:-base}" --lengths "${GPU_BERT_LENGTH:-128}" --repeats 1 --no-warm-up --ways "$way" \
            --point-timeout 110 --json "$OUT/bert_$way.json"
    done
fi

# 7. The transformer grid on cuda: BERT-tiny and -mini at 32 and 128 (every way, one timed after a
#    warm-up), then a GPT-2-small-shaped decoder (12 x 768, GPT-2's vocabulary): seconds per token.
if wanted transformer_grid; then
    step transformer_grid 110 "$PY" benchmarks/transformer_shapes.py --device cuda --threads 4 --sizes tiny mini --repeats 1 \
        --lengths 32 128 --point-timeout 50 --json "$OUT/transformer_grid.json"
    step gpt_small 120 "$PY" benchmarks/transformer_shapes.py --device cuda --threads 4 --sizes --gpt \
        --gpt-shape 12 768 --prompt 8 --generate 4 --point-timeout 110 --json "$OUT/gpt_small.json"
fi
