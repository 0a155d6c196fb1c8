#!/usr/bin/env bash
# The GPU training run in one device command (issue 25). Two steps, and a rehearsal:
#
#   bash scripts/device_train.sh stage [DATA]   # here, on the CPU, once: writes .carry/ (the
#       MSRS train split, its captions and their embedding cache, the wheels the device lacks)
#   device tool, from the session's checkout, with .carry staged there:
#       run(command="bash scripts/device_train.sh run", carry=[".carry"], timeout_s=560)
#   SMOKE=1 OUT=/tmp/device_out bash scripts/device_train.sh run   # the same command, tiny
#       (tests/test_device_train.py runs it on every CI run)
#
# MODE=student (default): scripts/device_train.py trains the student from scratch on the
# official fusion loss (configs/distill.py:nodistill,gpu: the paper's no-distillation form;
# msrs/train's full-size frames, batch 16 of 128² crops), within BUDGET_S seconds (default 480)
# of the command's start, the wheels' install included. Its docstring gives the phases; in short:
# timing.json at once (device, then compile s, step s, steps/s, images/s of the train step at
# float32 and at bfloat16, the input pipeline's batches/s), the dtype picked from those (DTYPE=
# float32|bfloat16 forces one), training until BUDGET_S - 180 s, four candidate students, then
# the GPU speed grid (student and teacher, 128² and 480×640, batch 1 and 16, fp32 and bf16).
# What comes back in $OUT (8 files at most, 35 MB): run.log, timing.json, candidates.json,
# speed.json and student_sNNNNN.msgpack x 4 (float16 params, ~8.8 MB each, loadable by
# `fuse --weights`). Leave the timeout at 560: a cut run still returns what it wrote.
#
# MODE=distill (later runs): the teacher on MSRS, then the student distilled from it, starting
# from the shipped student (dtpf_jax/weights/student_ivf.msgpack); the teacher (80 MB in fp16)
# cannot come back, the student does (student_ivf.msgpack, .json, teacher.log, distill.log).
#
# What to do with what comes back (here, on the CPU), by the ship rule fixed before any run
# (scripts/select_student.py's docstring: the mean official fusion loss on the held-back
# msrs/train frames and on RoadScene's pairs after the first 40, which no table uses):
#   python scripts/select_student.py --candidates /work/.device/.../student_s*.msgpack \
#       --data ../shared/data --out selection      # about 40 min on 2 cores; prints the verdict
#   if it ships: cp the winner to dtpf_jax/weights/student_ivf.msgpack and its record (from
#   selection/decision.json) to dtpf_jax/weights/student_ivf.json, update the sha256 in
#   dtpf_jax/weights/README.md, then remake the tables and the figure:
#   python scripts/reproduce_results.py --data ../shared/data --out results \
#       --student dtpf_jax/weights/student_ivf.msgpack --student-med 'student_{task}'
#   python scripts/make_gallery.py --out docs/gallery.png
#   and README's GPU speed rows from speed.json (records with "kind": "train_step" are the
#   student's training steps at batch 16; the others ms per call and images/s).
#
# Rehearsals on the CPU (RESULTS/README give their times): the smoke form above, and the real
# configuration cut short (real model sizes, a CPU-sized batch, one dtype):
#   DTYPE=float32 BUDGET_S=1500 GRID_S=420 TRAIN_ARGS="--config.batch_size=2" \
#     PROBE_STEPS=3 OUT=/tmp/device_out bash scripts/device_train.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
WHEELS="grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5"

stage() {
  local data=${1:-../shared/data}
  [ -d "$data/msrs/train" ] || { echo "error: $data/msrs/train not found; pass DATA" >&2; exit 2; }
  rm -rf "$CARRY"
  mkdir -p "$CARRY/data/msrs" "$CARRY/whl"
  cp -r "$data/msrs/train" "$CARRY/data/msrs/train"
  python -m dtpf_jax.text caption "$CARRY/data" --out "$CARRY/captions"
  local clip=${CLIP:-}
  if [ -z "$clip" ]; then
    clip=$CARRY/random_clip
    python -m dtpf_jax.text make-random-clip "$clip" --size base
  fi
  HF_HUB_OFFLINE=1 python -m dtpf_jax.text embed "$CARRY/data" --captions "$CARRY/captions" \
    --clip "$clip"
  rm -rf "$CARRY/random_clip"
  # shellcheck disable=SC2086
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/whl" $WHEELS
  du -sh "$CARRY"
  # What travels: tracked and untracked-not-ignored files, plus the carried folder (64 MiB).
  local tree carry
  tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- | tail -1 | cut -f1)
  carry=$(du -sb "$CARRY" | cut -f1)
  echo "travels: working tree $((tree / 1048576)) MiB + $CARRY $((carry / 1048576)) MiB of 64 MiB"
  [ $((tree + carry)) -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB" >&2; exit 2; }
}

install_wheels() {
  if ! python3 -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

run_student() {
  local out=$1 t0=$2 install_s=$3 variant="nodistill,gpu" probe=${PROBE_STEPS:-30}
  local grid_s=${GRID_S:-150} grid=()
  if [ -n "${SMOKE:-}" ]; then
    variant+=",smoke" probe=${PROBE_STEPS:-3} grid_s=${GRID_S:-60}
    grid=("--grid=--tiny --models student --sizes 64x64 --batches 1 --runs 2 --warmup 1")
  fi
  [ -z "${GRID:-}" ] || grid=("--grid=$GRID")  # scripts/benchmark.py arguments
  # shellcheck disable=SC2206
  local extra=(${TRAIN_ARGS:-})  # more --config.x=y overrides
  python3 scripts/device_train.py --config "configs/distill.py:$variant" --out "$out" \
    --t0 "$t0" --install_s "$install_s" --budget_s "${BUDGET_S:-480}" --grid_s "$grid_s" \
    --dtype "${DTYPE:-auto}" --probe_steps "$probe" --scratch "${SCRATCH:-/tmp/dtpf_device}" \
    "--config.data.root=$CARRY/data" "--config.data.captions=$CARRY/captions" \
    '--config.data.train=("msrs/train",)' '--config.data.val=("msrs/train",)' \
    "--config.data.val_split=(0.95, 1.0)" "${grid[@]}" "${extra[@]}"
}

run_distill() {
  local out=$1 t0=$2 budget=${BUDGET_S:-480} remaining variant=""
  local teacher_steps=4000 distill_steps=8000
  if [ -n "${SMOKE:-}" ]; then variant=":smoke" teacher_steps=6 distill_steps=6; fi
  local common=(
    "--config.data.root=$CARRY/data"
    "--config.data.captions=$CARRY/captions"
    '--config.data.train=("msrs/train",)'
    '--config.data.val=("msrs/train",)'
    "--config.data.val_split=(0.95, 1.0)"
    "--config.checkpoint_every=0"
    "--config.schedule=time_cosine"
  )
  # shellcheck disable=SC2206
  common+=(${TRAIN_ARGS:-})
  local init=()
  [ -n "$variant" ] || init=("--config.init_weights=dtpf_jax/weights/student_ivf.msgpack")
  rm -rf runs/device_teacher runs/device_distill
  python3 -m dtpf_jax.train --config "configs/teacher.py$variant" --workdir runs/device_teacher \
    "${common[@]}" --config.steps="${TEACHER_STEPS:-$teacher_steps}" --config.eval_every=500 \
    --config.max_train_s="${TEACHER_S:-$((budget * 2 / 5))}" 2>&1 | tee "$out/teacher.log"
  remaining=$((t0 + budget - $(date +%s) - ${RESERVE_S:-60}))
  echo "teacher done; distillation gets $remaining s" | tee "$out/timing.txt"
  python3 -m dtpf_jax.train --config "configs/distill.py$variant" --workdir runs/device_distill \
    "${common[@]}" "${init[@]}" --config.teacher_workdir=runs/device_teacher \
    --config.steps="${DISTILL_STEPS:-$distill_steps}" --config.eval_every=500 \
    --config.max_train_s="$((remaining > 30 ? remaining : 30))" 2>&1 | tee "$out/distill.log"
  python3 -m dtpf_jax.export runs/device_distill "$out/student_ivf.msgpack" --dtype float16 \
    --record "$out/student_ivf.json"
}

run_grid() {  # the speed grid alone (a second command, if the first one's ran out of time)
  # shellcheck disable=SC2086
  python3 scripts/benchmark.py --json "$1/speed.json" --no-flops --cli-images 0 \
    ${GRID:---models student,teacher --sizes 128x128,480x640 --batches 1,16 --runs 10 --budget 3}
}

run() {
  local out=${OUT:?OUT must name the output folder} t0 t1
  t0=$(date +%s)
  mkdir -p "$out"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  # This process trains in 40 % of the GPU's memory; the speed grid after it gets 50 %.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.4}
  install_wheels
  t1=$(date +%s)
  case "${MODE:-student}" in
    student) run_student "$out" "$t0" "$((t1 - t0))" 2>&1 | tee "$out/run.log" ;;
    distill) run_distill "$out" "$t0" ;;
    grid) run_grid "$out" 2>&1 | tee "$out/run.log" ;;
    *) echo "error: MODE=${MODE} is not student, distill or grid" >&2; exit 2 ;;
  esac
  echo "all done after $(($(date +%s) - t0)) s"
}

case "${1:-}" in
  stage) stage "${2:-}" ;;
  run) run ;;
  *)
    echo "usage: bash scripts/device_train.sh stage [DATA] | run   (see the header)" >&2
    exit 2
    ;;
esac
