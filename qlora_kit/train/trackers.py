"""Experiment trackers (`train.report_to: [tensorboard, wandb, mlflow]`) through accelerate's tracker classes.

They receive exactly what metrics.jsonl gets (step, loss, lr, grad_norm, tokens_per_s, peak_memory_bytes,
skipped, val_loss), at the same steps, and the resolved recipe as the run's configuration. Each is an optional
extra (`pip install 'qlora-kit[tensorboard]'`, `[wandb]`, `[mlflow]`), imported only when asked for; a missing one
is a ConfigError before the model loads. Only the main process reports (accelerate's trackers guard themselves).

Where they write, with nothing sent anywhere unless the user configured it:
  tensorboard  RUN_DIR/tensorboard/RUN_NAME/ (event files)
  wandb        RUN_DIR/wandb/ ; online or offline as wandb is configured (WANDB_MODE=offline: nothing sent)
  mlflow       $MLFLOW_TRACKING_URI if set, else a local file store RUN_DIR/mlruns
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import ConfigError

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "qlora-kit"


def check_installed(names: Sequence[str]) -> None:
    """ConfigError naming the extra to install for each tracker whose package is missing."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"train.report_to asks for {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                          f" not installed; pip install 'qlora-kit[{extras}]', or remove "
                          f"{'it' if len(missing) == 1 else 'them'} from train.report_to.")


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists, dicts and None as text (TensorBoard's hparams take
    only scalars and strings)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class Trackers:
    """Started trackers: log(metrics) at each logged step, close() at the end (also after an error)."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict[str, Any]):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        check_installed(names)
        run_dir = Path(run_dir).resolve()
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_dir.name, run_dir / "tensorboard")
            elif name == "wandb":
                tracker = WandBTracker(PROJECT, dir=str(run_dir), name=run_dir.name)
            else:
                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    import mlflow

                    # MLflow 3 keeps the file store but asks for this opt-in; it needs no database or server.
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
                tracker = MLflowTracker(experiment_name=PROJECT, run_name=run_dir.name)
            tracker.start()
            tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, metrics: dict[str, Any]) -> None:
        values = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(values, step=metrics["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


@contextmanager
def reporting(names: Sequence[str], run_dir: Path, config: dict[str, Any]) -> Iterator[Trackers | None]:
    """Trackers for the training loop (None when train.report_to is empty), closed however the loop ends."""
    if not names:
        yield None
        return
    trackers = Trackers(names, run_dir, config)
    try:
        yield trackers
    finally:
        trackers.close()
