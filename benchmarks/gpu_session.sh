#!/usr/bin/env bash
# One lent GPU session's checks, in priority order, each under its own time limit, for a
# machine with torch but no Kedro (see docs/benchmarks.md, "On a GPU"). Run from the
# repository root:  bash benchmarks/gpu_session.sh OUT_DIR
#
# It expects, beside the tracked source (prepared here with a local `kedro run`):
#   .whl/          Optuna and its dependencies (+ deepctr-torch), and Kedro 1.7 with the
#                  dependencies the machine lacks (stage kedro), as wheels for the
#                  machine's Python (docs/gpu/README.md lists them)
#   .gpu/suite/    `python benchmarks/suite_on_device.py export --to .gpu/suite`
#   data/05_model_input/movielens_latest/   the encoded data the throughput benchmark reads
# Writes to OUT_DIR: env_and_tests.log, pytest_gpu.log, throughput.log, throughput.jsonl,
# train_loop.json, profile.json, suite_cuda.json, table5.log, with stage multidomain
# multidomain.log (benchmarks/multidomain_step.py on the GPU: issue 14's step-time targets),
# and with stage kedro kedro.log and kedro_<suite>_summary.json. STAGES="tests throughput"
# (say) runs a subset (the default leaves multidomain and kedro out, for a second call: the
# default stages fill one call's 600 s); T_* set each stage's time limit
# in seconds; KEDRO_PIPELINES names what `kedro run` runs (default data,apg).
set -u
OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 MPLBACKEND=Agg KEDRO_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
T_TESTS_CUDA=${T_TESTS_CUDA:-90} T_TESTS=${T_TESTS:-150} T_TP=${T_TP:-160} T_SUITE=${T_SUITE:-70} T_T5=${T_T5:-25}
T_MD=${T_MD:-120} T_KEDRO=${T_KEDRO:-240} KEDRO_PIPELINES=${KEDRO_PIPELINES:-data,apg}
STAGES=${STAGES:-"tests throughput suite table5"}  # a subset reruns only those
stage() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
NO_KEDRO="--ignore tests/training/test_workers.py"  # it runs `kedro run`

{
  stage "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  python3 -c "import optuna, pandas, pyarrow, sklearn; print('optuna', optuna.__version__, 'pandas', pandas.__version__)"
  if want tests; then
    stage "CUDA tests (pytest -m cuda)"
    timeout "$T_TESTS_CUDA" python3 -m pytest -m cuda -p no:cacheprovider -q -o addopts="" -rA --tb=short \
      --timeout 60 tests/models tests/training $NO_KEDRO 2>&1 | tail -60
    stage "model, training and folding tests on the GPU machine (pytest -n 14; each test's verdict in pytest_gpu.log)"
    # -v names every verdict as it comes, so a run cut short still says what failed;
    # --timeout turns a hung test (a DDP rendezvous, say) into a named failure.
    timeout "$T_TESTS" python3 -m pytest -m "not cuda" -p no:cacheprovider -v -o addopts="" -rfE --tb=short -n 14 \
      --timeout 60 tests/models tests/training tests/test_significance.py $NO_KEDRO 2>&1 | grep -v Benchmark \
      > "$OUT_DIR/pytest_gpu.log"
    grep -E "FAILED|ERROR|Timeout|passed|failed" "$OUT_DIR/pytest_gpu.log" | grep -v "^\[gw[0-9]*\] PASSED" | tail -40
  fi
} 2>&1 | tee "$OUT_DIR/env_and_tests.log"
want throughput || T_TP=0
want suite || T_SUITE=0
want table5 || T_T5=0
want multidomain || T_MD=0
want kedro || T_KEDRO=0

[ "$T_TP" -gt 0 ] && stage "throughput" | tee "$OUT_DIR/throughput.log" &&
timeout "$T_TP" python3 benchmarks/train_throughput.py --device cuda --budget-s $((T_TP - 50)) --quiet 0 --out "$OUT_DIR" 2>&1 \
  | tee -a "$OUT_DIR/throughput.log"

[ "$T_SUITE" -gt 0 ] && stage "the apg suite through the project's tuning code" &&
timeout "$T_SUITE" python3 benchmarks/suite_on_device.py train --from .gpu/suite --device cuda --suites apg \
  --out "$OUT_DIR/suite_cuda.json" 2>&1 | grep -v "INFO\|^ " | tail -25

[ "$T_T5" -gt 0 ] && stage "APG Table 5 on the GPU" | tee "$OUT_DIR/table5.log" &&
timeout "$T_T5" python3 benchmarks/apg_table5.py --device cuda --max-hidden-mb 8192 --repeats 5 --no-memory --quiet 0 2>&1 \
  | tee -a "$OUT_DIR/table5.log" | tail -30
[ "$T_MD" -gt 0 ] && stage "multi-domain step times on the GPU" | tee "$OUT_DIR/multidomain.log" &&
timeout "$T_MD" python3 benchmarks/multidomain_step.py --device cuda --repeats 5 --min-block-ms 100 --quiet 0 2>&1 \
  | tee -a "$OUT_DIR/multidomain.log" | tail -30
# the pipeline itself, through Kedro, on the GPU (training.device auto picks CUDA); its
# versioned summaries come back as kedro_<suite>_summary.json
if [ "$T_KEDRO" -gt 0 ]; then
  stage "kedro run --pipelines $KEDRO_PIPELINES" | tee "$OUT_DIR/kedro.log"
  timeout "$T_KEDRO" python3 -m kedro run --pipelines "$KEDRO_PIPELINES" >>"$OUT_DIR/kedro.log" 2>&1
  status=$?
  echo "kedro run exit status: $status (124: cut at ${T_KEDRO}s)" | tee -a "$OUT_DIR/kedro.log"
  grep -E "Completed [0-9]+ out of|cuda|ERROR|Error" "$OUT_DIR/kedro.log" | tail -15
  for suite_dir in data/08_reporting/*/*/summary.json; do  # versioned: the newest version of each
    newest=$(ls -d "$suite_dir"/*/summary.json 2>/dev/null | sort | tail -1)
    [ -n "$newest" ] && cp "$newest" "$OUT_DIR/kedro_$(basename "$(dirname "$suite_dir")")_summary.json"
  done
fi
stage "done"
