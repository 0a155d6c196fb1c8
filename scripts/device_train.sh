#!/usr/bin/env bash
# The GPU run of RESULTS.md in one device command: train the IVF teacher on MSRS, distil the
# student from it, and bring the student back. Two steps:
#
#   bash scripts/device_train.sh stage [DATA]   # here, on the CPU, once: writes .carry/ (the
#       MSRS train split, its captions and their embedding cache, the wheels the device lacks)
#   device tool: run(command="bash scripts/device_train.sh run", carry=[".carry"], timeout_s=600)
#
# Rehearsals on the CPU: the tiny configs end to end (4 minutes here), and the real configs
# cut after one step each (about 10 minutes, at a CPU-sized batch):
#   SMOKE=1 OUT=/tmp/device_out bash scripts/device_train.sh run
#   TEACHER_S=1 BUDGET_S=1 TRAIN_ARGS=--config.batch_size=4 OUT=/tmp/device_out \
#     bash scripts/device_train.sh run
#
# What comes back in $OUT: student_ivf.msgpack (float16 params of the distilled student's best
# validation checkpoint, loadable by `fuse --weights`), student_ivf.json (its record: sha256,
# config, step, quality), teacher.log, distill.log and timing.txt.
#
# Time: the whole run ends about BUDGET_S (default 480 s) after it starts: the teacher trains for
# TEACHER_S seconds (default 40 % of the budget; `config.max_train_s`, compile included), the
# distillation gets what is left minus RESERVE_S (export and exit). Both use the 'time_cosine'
# schedule: the learning rate's decay is fitted, step by step, to the measured step rate and the
# time left, so that it ends with the time limit on whatever device; TEACHER_STEPS /
# DISTILL_STEPS only cap it (a device fast enough to reach a cap ends early, fully decayed).
#
# Text: no real CLIP is reachable from the development machine, so `stage` embeds the captions
# with a random CLIP text tower (as the CPU runs did, RESULTS.md); with real CLIP weights at
# hand, pass CLIP=PATH to `stage`.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
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
}

run() {
  local out=${OUT:?OUT must name the output folder}
  local t0 budget common remaining
  t0=$(date +%s)
  budget=${BUDGET_S:-480}
  mkdir -p "$out"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  if ! python3 -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # Step caps, far above what an H200 should reach in the time (fp32, batch 16, 128²; guessed:
  # teacher ~0.3-0.4 s/step from its 120 GFLOPs forward, distillation ~0.15-0.2 s/step).
  local variant="" teacher_steps=4000 distill_steps=8000
  if [ -n "${SMOKE:-}" ]; then variant=":smoke" teacher_steps=6 distill_steps=6; fi
  common=(
    "--config.data.root=$CARRY/data"
    "--config.data.captions=$CARRY/captions"
    '--config.data.train=("msrs/train",)'
    '--config.data.val=("msrs/train",)'
    "--config.data.val_split=(0.95, 1.0)"
    "--config.checkpoint_every=0"
    "--config.schedule=time_cosine"
  )
  # shellcheck disable=SC2206
  common+=(${TRAIN_ARGS:-})  # more --config.x=y overrides for both stages
  rm -rf runs/device_teacher runs/device_distill
  python3 -m dtpf_jax.train --config "configs/teacher.py$variant" --workdir runs/device_teacher \
    "${common[@]}" --config.steps="${TEACHER_STEPS:-$teacher_steps}" --config.eval_every=500 \
    --config.max_train_s="${TEACHER_S:-$((budget * 2 / 5))}" 2>&1 | tee "$out/teacher.log"
  remaining=$((t0 + budget - $(date +%s) - ${RESERVE_S:-60}))
  echo "teacher done after $(($(date +%s) - t0)) s; distillation gets $remaining s" \
    | tee "$out/timing.txt"
  python3 -m dtpf_jax.train --config "configs/distill.py$variant" --workdir runs/device_distill \
    "${common[@]}" --config.teacher_workdir=runs/device_teacher \
    --config.steps="${DISTILL_STEPS:-$distill_steps}" --config.eval_every=500 \
    --config.max_train_s="$((remaining > 30 ? remaining : 30))" 2>&1 | tee "$out/distill.log"
  python3 -m dtpf_jax.export runs/device_distill "$out/student_ivf.msgpack" --dtype float16 \
    --record "$out/student_ivf.json"
  echo "all done after $(($(date +%s) - t0)) s" | tee -a "$out/timing.txt"
}

case "${1:-}" in
  stage) stage "${2:-}" ;;
  run) run ;;
  *)
    echo "usage: bash scripts/device_train.sh stage [DATA] | run   (see the header)" >&2
    exit 2
    ;;
esac
