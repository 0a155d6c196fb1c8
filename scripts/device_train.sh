#!/usr/bin/env bash
# The GPU training run in one device command (issue 25).
#
# On a lent GPU (one H200; 15 min of device time in all, start included; 10 min a command):
#   1. here, in the session's checkout (/work/main), once: bash scripts/device_train.sh stage
#      -> .carry/ (git-ignored, 10 MiB: msrs/train as lossless WebP, its captions and embedding
#      cache, 4 wheels the device lacks (array_record: scripts/device_shim), and what fits of an
#      earlier loan's compile cache, step 4); it prints what travels: working tree + .carry, 46
#      MiB of 64 without the cache, which leaves the cache its whole 16 MiB.
#   2. device tool: run(command="bash scripts/device_train.sh run", carry=[".carry"],
#      timeout_s=550): training, BUDGET_S=510 s (a fresh machine's start adds ~35 s).
#   3. at once (a machine stays warm 30 s): run(command="MODE=grid bash scripts/device_train.sh
#      run", carry=[".carry"], timeout_s=260): the speed grid, GRID_S=240 s; then give_back().
#   4. here: keep step 2's compile cache for the next loan (files_at of each command stay):
#      mkdir -p ~/.cache/dtpf_jax && cp FILES_AT/xla_cache.tar ~/.cache/dtpf_jax/device_xla_cache.tar
#   If step 2 failed early, timing.json ("phase", "error") and run.log say why; a second try of
#   it replaces step 3, e.g. BUDGET_S=240 (DTYPE=float32 if bf16 was the trouble).
#   What the first GPU session (2026-12-04) learned, and why the defaults are what they are:
#   the student's train step takes 1.5-4 minutes to compile on the H200 (XLA autotuning and
#   kernel builds; 93 s with autotuning off, which made the steps 3.5x slower: never again),
#   so it is compiled once, at bfloat16 only (the probe of both: bf16 0.054 s/step, fp32 0.077
#   s, side by side 158 and 231 s of compile), the training loop runs the probe's program, and
#   there is no validation (a full-frame program: 50 s) and no grid in the training command.
#
# MODE=student (default): scripts/device_train.py trains the student from scratch on the
# official fusion loss (configs/distill.py:nodistill,gpu: the paper's no-distillation form;
# msrs/train's 32 full-size training frames, batch 16 of 128² crops, AdamW 5e-4, the cosine
# fitted to the time) within BUDGET_S seconds (default 510) of the command's start, the wheels'
# install included. In order (its docstring has the details): timing.json at once, the probe
# (compile s, XLA's planned MB, step s, steps/s, images/s of the bf16 train step, and the input
# pipeline's batches/s) written as measured (DTYPE=float32 forces fp32, DTYPE=auto probes
# both and picks), training in the probe's program until BUDGET_S - 30 s (export), four
# candidates exported. GRID_S=150 would add the speed grid after them (only the smoke form
# does, by default). Back in $OUT (8 files, ~36 MB + the cache): run.log, timing.json,
# candidates.json, student_sNNNNN.msgpack x 4 (float16 params, 8.8 MB each, `fuse --weights FILE`
# loads them) and xla_cache.tar (the compile cache, at most 16 MiB; packed after the probe and
# again at the end). Keep it: cp FILES_AT/xla_cache.tar ~/.cache/dtpf_jax/device_xla_cache.tar;
# the next stage carries what fits of it (XLA_CACHE_TAR= names another file), and run unpacks it
# into /tmp/dtpf_xla_cache, where the train step then loads instead of compiling.
#
# MODE=distill (later runs): the teacher on MSRS, then the student distilled from it, starting
# from the shipped student (dtpf_jax/weights/student_ivf.msgpack); the teacher (80 MB in fp16)
# cannot come back, the student does (student_ivf.msgpack, .json, teacher.log, distill.log).
# MODE=grid: the GPU speed grid (student and teacher, 128² and 480x640, batch 1 and 16, fp32
# and bf16: 16 programs, 8 compiled side by side ahead of the one being timed; no
# configuration started after GRID_S - 40 s, default 240) -> speed.json and run.log. GRID=
# other scripts/benchmark.py arguments. The training steps' figures are timing.json's probe.
#
# What to do with what comes back (here, on the CPU), by the ship rule fixed before any run
# (scripts/select_student.py's docstring: the mean official fusion loss on the held-back
# msrs/train frames and on RoadScene's pairs after the first 40, which no table uses; the
# winner ships only if below both the shipped student and the visible image):
#   python scripts/select_student.py --candidates FILES_AT/student_s*.msgpack \
#       --data ../shared/data --out selection --ship    # ~35 min on 2 cores (rows cached)
#   (--ship copies a winner to dtpf_jax/weights/student_ivf.msgpack with its record .json;
#   python -m pytest tests/test_weights.py checks them.) README's GPU speed rows, shipped or
#   not: python scripts/speed_table.py STEP3_FILES/speed.json STEP2_FILES/timing.json (a
#   markdown table: batch 1 ms, batch 16 images/s, fp32 / bf16; the training step's line from
#   the probe). If it shipped, remake the tables (each fused folder's made_by.json makes the new
#   student's images be fused anew) and the figure:
#   python scripts/reproduce_results.py --data ../shared/data --out results \
#       --student dtpf_jax/weights/student_ivf.msgpack --student-med 'student_{task}'
#   python scripts/make_gallery.py --out docs/gallery.png
#
# Rehearsals on the CPU: the smoke form (tests/test_device_train.py runs it: tiny configs,
# 4 steps, 3 candidates + the compile cache, the grid on a tiny model, then a second run from
# the carried cache; 50-70 s on the shared 2-core machine), and the real configuration cut
# short (the real student, batch 2, 3 steps, one dtype: 129 s here on 2026-12-04, 53 s of it
# the step's compile; 385 s on a busier day):
#   SMOKE=1 OUT=/tmp/device_out bash scripts/device_train.sh run   # needs .carry (stage)
#   DTYPE=float32 BUDGET_S=3600 PROBE_STEPS=3 OUT=/tmp/device_out \
#     TRAIN_ARGS="--config.batch_size=2 --config.steps=3" GRID="--models student,teacher \
#     --sizes 128x128 --batches 1 --dtypes float32 --runs 1 --warmup 0" \
#     bash scripts/device_train.sh run
# Both as the GPU machine has it (Python 3.12, jax 0.11.2, no grain: the carried wheels install
# into /tmp/site and scripts/device_shim stands in for array_record), from a venv of those:
#   ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/devlike && . /tmp/devlike/bin/activate &&
#   pip install jax==0.11.2 jaxlib==0.11.2 flax optax orbax-checkpoint einops pillow \
#     opencv-python-headless transformers tqdm && rm -rf /tmp/site   # then a command above
# (2026-12-04: smoke 85 s, the real student 130 s; both done, 32 WebP pairs read).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
# array_record, which grain imports, is scripts/device_shim there: the training reads no
# ArrayRecord files, and its wheel (3.7 MB) would take the compile cache's room.
WHEELS="grain==0.2.18 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5"

stage() {
  local data=${1:-../shared/data}
  [ -d "$data/msrs/train" ] || { echo "error: $data/msrs/train not found; pass DATA" >&2; exit 2; }
  rm -rf "$CARRY"
  mkdir -p "$CARRY/data/msrs" "$CARRY/whl"
  cp -r "$data/msrs/train" "$CARRY/data/msrs/train"
  # lossless WebP, each file checked to decode to the same pixels: 14.5 -> 9.8 MiB, room for
  # the compile cache (scripts/device_train.py webp_tree; run decodes them once, to BMP)
  python -c 'import sys; sys.path.insert(0, "scripts"); import device_train as d; d.webp_tree()' \
    "$CARRY/data"
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
  tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | du -cb --files0-from=- | tail -1 | cut -f1)
  carry=$(du -sb "$CARRY" | cut -f1)
  # An earlier run's compile cache (xla_cache.tar, brought back by a lent session): its entries
  # in the order packed (autotuning results, the train step, the rest), each that still fits in
  # what travels with 1 MiB to spare.
  local cache_tar=${XLA_CACHE_TAR:-$HOME/.cache/dtpf_jax/device_xla_cache.tar}
  if [ -f "$cache_tar" ]; then
    python -c 'import sys; sys.path.insert(0, "scripts"); import device_train as d; d.trim_cache_tar()' \
      "$cache_tar" "$CARRY/xla_cache.tar" $((63 * 1048576 - tree - carry)) || true
    carry=$(du -sb "$CARRY" | cut -f1)
  fi
  echo "travels: working tree $((tree / 1048576)) MiB + $CARRY $((carry / 1048576)) MiB of 64 MiB"
  [ $((tree + carry)) -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB" >&2; exit 2; }
}

install_wheels() {
  if ! python3 -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import array_record" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/scripts/device_shim
  fi
}

run_student() {
  local out=$1 t0=$2 install_s=$3 variant="nodistill,gpu" probe=${PROBE_STEPS:-30}
  local grid_s=${GRID_S:-0} grid=()
  if [ -n "${SMOKE:-}" ]; then
    variant+=",smoke" probe=${PROBE_STEPS:-3} grid_s=${GRID_S:-60}
    grid=("--grid=--tiny --models student --sizes 64x64 --batches 1,2 --dtypes float32 --runs 2
      --compile-threads 2")
  fi
  [ -z "${GRID:-}" ] || grid=("--grid=$GRID")  # scripts/benchmark.py arguments
  # shellcheck disable=SC2206
  local extra=(${TRAIN_ARGS:-})  # more --config.x=y overrides
  local caps=()  # the captions set the per-pair task weights ('default' without them)
  [ ! -d "$CARRY/captions" ] || caps=("--config.data.captions=$CARRY/captions")
  # The compile cache: a folder holding the carried one's entries if any; it comes back as
  # OUT/xla_cache.tar (device_train.py, --bring_back_cache). Keep its path the same from one
  # session to the next: jax's cache key holds it (XLA's autotuning folder lies under it).
  local cache=${XLA_CACHE:-/tmp/dtpf_xla_cache}
  mkdir -p "$cache"
  if [ -f "$CARRY/xla_cache.tar" ]; then
    tar -xf "$CARRY/xla_cache.tar" -C "$cache" || echo "warning: carried compile cache unreadable"
  fi
  # Training takes at most 40 % of the GPU's memory, as it needs it; the speed grid after it
  # (a process of its own) up to 55 %.
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.4} \
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/device_train.py \
    --config "configs/distill.py:$variant" --out "$out" --t0 "$t0" --install_s "$install_s" \
    --compile_cache "$cache" \
    --budget_s "${BUDGET_S:-510}" --grid_s "$grid_s" \
    --dtype "${DTYPE:-bfloat16}" --probe_steps "$probe" --scratch "${SCRATCH:-/tmp/dtpf_device}" \
    "--config.data.root=$CARRY/data" "${caps[@]}" \
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

run_grid() {  # the speed grid: the second command of a session
  local grid_s=${GRID_S:-240}
  # shellcheck disable=SC2086
  python3 scripts/benchmark.py --json "$1/speed.json" --no-flops --cli-images 0 \
    --max-s "$((grid_s > 80 ? grid_s - 40 : grid_s / 2))" \
    ${GRID:---models student,teacher --sizes 480x640,128x128 --batches 1,16 \
      --dtypes bfloat16,float32 --runs 10 --warmup 2 --budget 3 --compile-threads 8}
}

run() {
  local out=${OUT:?OUT must name the output folder} t0 t1
  t0=$(date +%s)
  mkdir -p "$out"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
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
