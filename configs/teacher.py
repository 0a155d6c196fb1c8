"""Teacher (text-guided, dim 48, ~40.3 M params) on infrared-visible fusion (MSRS).

  python -m dtpf_jax.train --config configs/teacher.py                 # paper defaults
  python -m dtpf_jax.train --config configs/teacher.py:official        # the official switches
  python -m dtpf_jax.train --config configs/teacher.py:smoke           # tiny, CI
  python -m dtpf_jax.summary --config configs/teacher.py               # parameter table

Variants after the colon, combinable (`:official,smoke`):
  official  FiLM gamma*F+beta and the per-iteration cosine of period 1000 (DESIGN decision 2).
  smoke     tiny model (dim 8, one block per level), 64² crops, 4 steps on msrs_128, 2
            validation pairs; about 30 s on a 2-core CPU after compile (compile about 60 s
            cold, a few seconds from the compilation cache). Result: it runs end to end.

Workdir: runs/<config.name> (`--workdir` overrides); a rerun resumes from its last checkpoint.
Expected time: 30k steps at global batch 16 (4 per GPU x 4 GPUs, as the paper) on GPUs; see
scripts/benchmark_train.py for the steps/s of a given machine. On this 2-core CPU (24 GiB) a
teacher step at batch 4 takes 37 s and 15 GiB, and batch 16 does not fit (XLA plans 48.9 GB: the
run stops with one error line before its first step), so CPU runs are smoke tests or short
experiments only, at --config.batch_size=4.
Expected result: validation quality ("clean" convention, DESIGN decision 8 formula) rising
from about 0.4 to above 0.8; the official code reports its best student at 0.9368 with its own
(dtpf_table) metric convention, which gives other values.
Text priors: without `data.captions` every pair gets a zero embedding and the default task
weights; real runs first write captions and their CLIP embedding cache:
  python -m dtpf_jax.text caption ../shared/data --out captions
  python -m dtpf_jax.text embed ../shared/data --captions captions --clip PATH_OR_HUB_ID
  python -m dtpf_jax.train --config configs/teacher.py --config.data.captions=captions
"""

import ml_collections

from dtpf_jax import config_lib
from dtpf_jax.datasets import default_config as data_config
from dtpf_jax.networks import model_config

VARIANTS = {"official", "smoke"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = config_lib.parse_variants(arg, VARIANTS)
    config = ml_collections.ConfigDict()
    config.name = "_".join(["teacher", *sorted(variants)])  # default workdir runs/<name>
    config.stage = "teacher"  # 'teacher' | 'student' | 'distill': which step train.py runs
    config.model = model_config("teacher")
    config.init_weights = ""  # params-only teacher file to start from (fresh optimizer)

    # Data (dtpf_jax/datasets.py documents every field). Pairs whose name is in the validation set
    # are dropped from training: 16 of the 34 msrs/train scenes also lie in msrs_128/train.
    config.data = data_config("ivf")
    config.data.train = ("msrs/train", "msrs_128/train")  # first 95 % of each (train_split)
    config.data.val = config.data.train  # last 5 % of each (val_split): 2 + 25 pairs
    config.data.read_threads = 8  # PNG decoding threads: 16 full-size MSRS frames per step

    config.batch_size = 16  # global batch (official: 4 per GPU x 4 GPUs); divisible by devices
    config.steps = 30_000  # optimizer steps (~1000 epochs of the ~500 training pairs)
    # Wall-clock limit: the step at which this many seconds have passed since the training loop
    # began (the step's compile included) is treated as the last (validated, saved); 0 = off.
    config.max_train_s = 0.0
    config.seed = 3407  # init, shuffling and augmentation (official seed)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # 'adamw' | 'sgd' (plain SGD; tests use it)
    config.optimizer.lr = 1e-4  # peak learning rate
    config.optimizer.lr_min = 1e-6  # cosine floor (official eta_min: 1e-6 teacher)
    config.optimizer.weight_decay = 1e-4  # decoupled, on every parameter (as the official)
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    # 'cosine': one decay from lr to lr_min over `steps`; 'official_cosine': the official
    # CosineAnnealingLR(T_max=500) stepped every iteration, a cosine of period 1000 steps
    # between lr and lr_min, again and again; 'time_cosine': one decay whose length is fitted
    # to end when max_train_s does (at most `steps`; train.LearningRates).
    config.schedule = "cosine"
    config.official_t_max = 500  # half-period of 'official_cosine' in steps
    config.grad_clip = 0.0  # global-norm clipping; 0 = off (official: off)
    # Weight of a squared-error intensity term beside the official loss (losses.fusion_loss);
    # 0 = official. Teacher and text-free student steps only (not read by the distill step).
    config.intensity_l2 = 0.0

    config.eval_every = 1000  # validate (and save a ranked checkpoint) every N steps and at
    #   the end; 0 = never (checkpoints are then kept by recency only)
    config.val_mode = "full"  # 'full': whole images padded to a (coarse) shape bucket | 'tiles':
    #   the official 128² sliding window
    config.val_convention = "clean"  # metrics.CONVENTIONS; named in logs and tensorboard tags
    config.checkpoint_every = 500  # unranked checkpoint every N steps (0 = only at validation)
    config.keep_best = 3  # best checkpoints kept by validation quality, plus the latest
    config.log_every = 50  # progress line and tensorboard scalars every N steps

    if "official" in variants:
        config.model.film_form = "official"
        config.schedule = "official_cosine"
    if "smoke" in variants:
        config_lib.apply_smoke(config, [config.model])
    return config
