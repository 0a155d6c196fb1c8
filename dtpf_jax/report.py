"""Training reports: metrics read one step late, the non-finite check, progress, tensorboard."""

from __future__ import annotations

import contextlib
import math
import pathlib
import time
from collections.abc import Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/inf loss or gradient; the message names the last good checkpoint."""


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Reporter:
    """Receives each step's device metrics and reports them once they are ready.

    `push` keeps a step's metrics and reads the previous step's, so the host never waits for
    the step it just dispatched; `flush` reads the pending one (before a checkpoint).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        start: int,
        n_pairs: int,
    ):
        self.total, self.log_every = config.steps, config.log_every  # total: the planned end
        self.convention, self.start = config.val_convention, start
        self.epoch_steps = n_pairs / config.batch_size
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # only the training CLI needs it

            self.writer = SummaryWriter(str(workdir / "tensorboard"))
        self.pending: tuple[int, Mapping] | None = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t_interval, self.paused_s = time.perf_counter(), 0.0
        self.last: dict[str, float] = {}
        self.lr = float("nan")

    @contextlib.contextmanager
    def timed_dispatch(self, step: int) -> Iterator[None]:
        """Time the first dispatch (tracing and compilation) and keep it out of steps/s."""
        if step != self.start + 1:
            yield
            return
        t = time.perf_counter()
        yield
        compile_s = time.perf_counter() - t
        self.paused_s += compile_s
        logging.info("compiled the train step in %.1f s", compile_s)
        self.last["compile_s"] = compile_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent here (validation, checkpoints) does not count against steps/s."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def push(self, step: int, step_metrics: Mapping, last_good: str, lr: float) -> None:
        """Keep step's metrics (and the learning rate it used); record the previous step's."""
        if self.pending is not None:
            self._record(*self.pending, last_good)
        self.pending = (step, step_metrics, lr)

    def flush(self, last_good: str) -> None:
        if self.pending is not None:
            self._record(*self.pending, last_good)
            self.pending = None

    def _record(self, step: int, step_metrics: Mapping, lr: float, last_good: str) -> None:
        m = {k: float(v) for k, v in jax.device_get(dict(step_metrics)).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise NonFiniteLossError(
                f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                f"{step}; last good checkpoint: {last_good}. A rerun resumes from it; lower "
                "optimizer.lr or set grad_clip if it recurs"
            )
        for k, v in m.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.lr = lr
        if step % self.log_every == 0 or step == self.total:
            self._log(step)

    def _log(self, step: int) -> None:
        now = time.perf_counter()
        rate = self.count / max(now - self.t_interval - self.paused_s, 1e-9)
        means = {k: v / self.count for k, v in self.sums.items()}
        lr = self.lr  # the rate the last update used
        logging.info(
            "step %d/%d (epoch %.1f)  loss %.4f  lr %.3g  %.3f steps/s  ETA %s",
            step,
            self.total,
            step / self.epoch_steps,
            means["loss"],
            lr,
            rate,
            _duration((self.total - step) / rate),
        )
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/steps_per_s", rate, step)
            self.writer.flush()
        self.last.update(means, lr=lr, steps_per_s=rate, step=step)
        self.sums, self.count = {}, 0
        # Writing the logs is host time between steps: it belongs to the next interval only
        # from here on (tensorboardX's first flush takes seconds).
        self.t_interval, self.paused_s = time.perf_counter(), 0.0

    def validation(
        self, step: int, scores: Mapping[str, float], quality: float, grid: np.ndarray, n: int
    ) -> None:
        tag = f"val_{self.convention}"
        logging.info(
            "step %d validation (%s convention, %d pairs): quality %.4f  %s",
            step,
            self.convention,
            n,
            quality,
            "  ".join(f"{k} {v:.4f}" for k, v in scores.items()),
        )
        if self.writer is not None:
            self.writer.add_scalar(f"{tag}/quality", quality, step)
            for k, v in scores.items():
                self.writer.add_scalar(f"{tag}/{k}", v, step)
            self.writer.add_image("val/vis_ir_fused", grid, step, dataformats="HWC")
            self.writer.flush()
        self.last.update({f"{tag}/{k}": float(v) for k, v in scores.items()}, quality=quality)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
