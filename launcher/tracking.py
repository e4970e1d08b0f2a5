"""What a run shows: W&B through Accelerate's tracker API and ``metrics.jsonl``, from rank 0.

W&B runs offline unless the user is logged in (an API key in ``WANDB_API_KEY`` or the netrc
that ``wandb login`` writes): the run is written under ``<run folder>/wandb`` and can be
uploaded later with ``wandb sync <run folder>/wandb/offline-run-*`` (clusters whose nodes have
no internet). ``--no-wandb`` turns W&B off; ``metrics.jsonl`` always holds the same numbers.
The W&B run id is kept in the checkpoint, so a resumed or requeued run continues the same run.
"""

from __future__ import annotations

import json
import netrc
import os
import pathlib
import uuid
from datetime import timedelta

from accelerate import Accelerator


DST_NAMES = {"random": "SET", "gradient": "RigL", "momentum": "sparse momentum"}


def method_line(config: dict) -> str:
    """The run's method in one line, from the configuration tree (``TrainConfig.to_dict()`` or
    a run folder's ``config.yaml``), e.g. "RigL-ITOP: DST, ERK init, density 0.05, magnitude
    death, gradient growth, update every 4000 steps"."""
    if not config.get("sparse"):
        return "dense: no masks"
    s = config["sparsity"]
    method, every = s["method"], s.get("update_frequency")
    if method == "static" or not every:
        name, parts = "static sparse", [f"{s['sparse_init']} init", f"density {s['density']:g}",
                                        "masks fixed"]
    else:
        density = f"density {s['density']:g}"
        if method == "GMP" or s.get("final_density") not in (None, s["density"]):
            start = 1.0 if method == "GMP" else s["density"]
            density = (f"density {start:g} -> {s['final_density']:g} (epochs "
                       f"{s['init_prune_epoch']:g}-{s['final_prune_epoch']:g})")
        init = "dense start" if method == "GMP" else f"{s['sparse_init']} init"
        if method == "DST":
            name = f"{DST_NAMES.get(s['growth'], s['growth'])}-ITOP"
            rules = [f"{s['death']} death", f"{s['growth']} growth"]
        elif method.startswith("GraNet"):
            name, rules = method, ["magnitude death", f"{s['growth']} growth"]
        else:  # GMP, GMP_uniform: pruning only
            name, rules = method, ["magnitude pruning, no regrowth"]
        kind = method if method == "DST" else "layer-wise" if method.endswith("_uniform") else "global"
        parts = [kind, init, density, *rules, f"update every {every} steps"]
        if s.get("update_stop", 1.0) < 1.0:
            parts.append(f"until {s['update_stop']:g} of the run")
    t = config.get("tickets") or {}
    if t.get("enabled"):
        parts.append(f"Sup-tickets {t['superposing']} every {t['cycle']} epochs")
    return f"{name}: " + ", ".join(parts)


def log_line(step: int, last_step: int, epoch: int, record: dict, eta_s: float | None) -> str:
    """The plain training log line (every --log-interval steps; the progress without a bar)."""
    text = (f"step {step}/{last_step} epoch {epoch}: loss {record['train/loss']:.4f} "
            f"lr {record['train/lr']:.4g} images/s {record['perf/images_per_s']:.0f} "
            f"density {record['sparsity/density']:.4f}")
    if "itop/rate" in record:
        text += f" itop {record['itop/rate']:.4f}"
    if eta_s is not None:
        text += f" eta {timedelta(seconds=round(eta_s))}"
    return text


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_mode(requested: str) -> str:
    """``auto``: online when logged in (an API key in WANDB_API_KEY or in the netrc file that
    ``wandb login`` writes), else offline. Looks at no network."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):  # no netrc: not logged in
        return "offline"


class Tracker:
    """Logs one record per call to ``metrics.jsonl`` and, when enabled, to W&B (rank 0 only)."""

    method_line = staticmethod(method_line)
    log_line = staticmethod(log_line)

    def __init__(self, accelerator: Accelerator, run_dir: pathlib.Path, enabled: bool,
                 project: str, mode: str) -> None:
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process
        self.wandb = enabled and wandb_available()
        self.run_dir, self.project = run_dir, project
        self.mode = wandb_mode(mode) if self.wandb else "disabled"
        self.run_id: str | None = None

    def start(self, config: dict, run_id: str | None) -> str | None:
        """Open (or, with the id of a checkpoint, continue) the W&B run."""
        if not self.wandb:
            return None
        self.run_id = run_id or uuid.uuid4().hex[:12]
        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers(self.project, config=config, init_kwargs={"wandb": {
            "id": self.run_id, "resume": "allow", "dir": str(self.run_dir), "mode": self.mode,
            "name": self.run_dir.name}})
        return self.run_id

    def log(self, record: dict, step: int, epoch: int) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **record}) + "\n")
        if self.wandb:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                 step=step)

    def update_config(self, values: dict) -> None:
        """Add values to the W&B run's config (rank 0; e.g. the ``run`` section of the header)."""
        if self.wandb and self.main:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.config.update(values, allow_val_change=True)

    def summary(self, record: dict, step: int, epoch: int) -> None:
        """Run-level values (final figures, world size, ...): a line in ``metrics.jsonl`` and the
        W&B run summary (not its history)."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **record}) + "\n")
        if self.wandb and self.main:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.summary.update({k: v for k, v in record.items() if k != "summary" and v is not None})

    def offline_segments(self) -> list[pathlib.Path]:
        """Every offline W&B segment of this run folder (the first run and each resume)."""
        return sorted((self.run_dir / "wandb").glob("offline-run-*"))

    def log_layers(self, densities: dict[str, float], step: int, key: str = "mask/layer_density") -> None:
        """Per-layer densities as a W&B bar chart (and in metrics.jsonl)."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, key: densities}) + "\n")
        if self.wandb and self.main:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            table = wandb.Table(data=[[n, d] for n, d in densities.items()], columns=["layer", "density"])
            run.log({key: wandb.plot.bar(table, "layer", "density", title=f"layer densities, step {step}"),
                     **{f"density/{n}": d for n, d in densities.items()}}, step=step)

    def rewind(self, step: int) -> int:
        """A run resumed at ``step``: records of later steps (they are trained again) move from
        ``metrics.jsonl`` to ``metrics-rewound.jsonl``, so a reader never sees a step go back.
        Returns how many moved (rank 0; others 0)."""
        if not (self.main and self.path.exists()):
            return 0
        kept, dropped = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                later = json.loads(line).get("step", -1) > step
            except (json.JSONDecodeError, AttributeError, TypeError):
                later = False  # keep what cannot be read; it is not ours to judge
            (dropped if later else kept).append(line)
        if dropped:
            with open(self.path.with_name("metrics-rewound.jsonl"), "a") as f:
                f.writelines(dropped)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        return len(dropped)

    def finish(self) -> None:
        """Close the W&B run; later calls (and later logs) touch W&B no more. An offline run
        ends with the command that uploads every segment of it (W&B's own hint names only the
        last one; a resumed or requeued run has one per start)."""
        if self.wandb:
            self.accelerator.end_training()
            self.wandb = False
            segments = self.offline_segments() if self.main and self.mode != "online" else []
            if segments:
                folder = (self.run_dir / "wandb").resolve()
                print(f"W&B offline run {self.run_id}: {len(segments)} segment(s) under {folder} "
                      f"({', '.join(p.name for p in segments)}); upload them all with:\n"
                      f"  wandb sync {folder}/offline-run-*", flush=True)
