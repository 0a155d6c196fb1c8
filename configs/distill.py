"""Student (text-free, dim 16, ~4.37 M params) distilled from the frozen teacher (MSRS).

  python -m dtpf_jax.train --config configs/distill.py                 # paper defaults
  python -m dtpf_jax.train --config configs/distill.py:official        # the official switches
  python -m dtpf_jax.train --config configs/distill.py:smoke           # tiny, CI
  python -m dtpf_jax.export runs/distill student.msgpack               # best student -> file
  python -m dtpf_jax.summary --config configs/distill.py               # parameter table

The teacher is read from `teacher_workdir` (its best checkpoint by validation quality, or
`teacher_step`), or from a params-only file `teacher_weights`; its model settings come from
there and must match `teacher_model`. Only the student (and, in the paper form, the Down
adapters) is trained and checkpointed.

Variants after the colon, combinable (`:official,smoke`):
  official  the official code: teacher FiLM gamma*F+beta, SmoothL1 on L2-normalised features
            with frozen random adapters, per-iteration cosine of period 1000 to 1e-7; reads the
            teacher of configs/teacher.py:official (runs/teacher_official).
  nodistill the student on the fusion loss alone, no teacher (the paper's no-distillation
            ablation; with --config.init_weights=FILE, fine-tuning of a student file).
  gpu       the settings of the GPU run (scripts/device_train.py, which sets max_train_s and
            the checkpoint interval from the step rate it measures): msrs/train full-size
            frames only (its last 5 % held back), batch 16 of 128² crops, AdamW 5e-4 (from
            scratch; the CPU runs' rate for it) with global-norm clip 1.0, no remat, the
            'time_cosine' schedule (at most 20k steps), 16 reading threads.
  smoke     tiny student and teacher, 64² crops, 4 steps on msrs_128, 2 validation pairs; reads
            runs/teacher_smoke. About 30 s on a 2-core CPU after compile. Result: it runs.

Expected time: 30k steps at global batch 16 on GPUs (scripts/benchmark_train.py gives the
steps/s; the step includes the teacher's forward pass).
Expected result: validation quality (clean convention) rising towards the teacher's.
"""

import ml_collections

from dtpf_jax import config_lib
from dtpf_jax.datasets import default_config as data_config
from dtpf_jax.networks import model_config

VARIANTS = {"gpu", "nodistill", "official", "smoke"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = config_lib.parse_variants(arg, VARIANTS)
    config = ml_collections.ConfigDict()
    config.name = "_".join(["distill", *sorted(variants)])  # default workdir runs/<name>
    config.stage = "distill"  # 'teacher' | 'student' | 'distill': which step train.py runs
    config.model = model_config("student")
    # Beside the teacher's forward, dropping the student's remat gains nothing here (step at
    # batch 4, 128²: 17.9 s with it, 18.6 s without) and costs 1.4 GiB: keep it.
    config.model.remat = True
    config.teacher_model = model_config("teacher")  # must match the teacher read below

    config.teacher_workdir = "runs/" + "_".join(["teacher", *sorted(variants)])
    config.teacher_step = 0  # teacher checkpoint step; 0 = best by validation quality
    config.teacher_weights = ""  # params-only teacher file; overrides teacher_workdir if set

    config.init_weights = ""  # params-only student file to start from (fresh optimizer)

    config.distill_form = "paper"  # 'paper': L1, learnable adapters | 'official': SmoothL1 on
    #   L2-normalised features, adapters frozen random (saved in the state, never optimised)
    config.feature_weight = 0.1  # weight of the 4-level decoder-feature term
    config.result_weight = 1.0  # weight of the student-vs-teacher output term

    # Data (dtpf_jax/datasets.py documents every field); validation names are kept out of training.
    config.data = data_config("ivf")
    config.data.train = ("msrs/train", "msrs_128/train")
    config.data.val = config.data.train
    config.data.read_threads = 8

    config.batch_size = 16  # global batch (official: 4 per GPU x 4 GPUs)
    config.steps = 30_000
    # Wall-clock limit: the step at which this many seconds have passed since the training loop
    # began (the step's compile included) is treated as the last (validated, saved); 0 = off.
    config.max_train_s = 0.0
    config.seed = 3407

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # 'adamw' | 'sgd'
    config.optimizer.lr = 1e-4
    config.optimizer.lr_min = 1e-7  # official eta_min of the student
    config.optimizer.weight_decay = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    # 'cosine' (one decay) | 'official_cosine' (period 2*t_max) | 'time_cosine' (one decay that
    # ends when max_train_s does, at most config.steps)
    config.schedule = "cosine"
    config.official_t_max = 500
    config.grad_clip = 0.0  # 0 = off
    # Weight of a squared-error intensity term beside the official loss (losses.fusion_loss);
    # 0 = official. Teacher and text-free student steps only (not read by the distill step).
    config.intensity_l2 = 0.0

    config.eval_every = 1000  # 0 = never
    config.val_mode = "full"  # 'full' | 'tiles'
    config.val_convention = "clean"
    config.checkpoint_every = 500
    config.keep_best = 3
    config.log_every = 50

    if "official" in variants:
        config.teacher_model.film_form = "official"
        config.distill_form = "official"
        config.schedule = "official_cosine"
    if "nodistill" in variants:
        config.stage = "student"
    if "gpu" in variants:
        config.model.remat = False  # a GPU has the memory; recomputing costs step time
        config.data.train = config.data.val = ("msrs/train",)
        config.data.read_threads, config.data.prefetch = 16, 32
        config.optimizer.lr, config.grad_clip = 5e-4, 1.0
        config.schedule, config.max_train_s, config.steps = "time_cosine", 300.0, 20_000
        config.log_every = 100
    if "smoke" in variants:
        config_lib.apply_smoke(config, [config.model, config.teacher_model])
    return config
