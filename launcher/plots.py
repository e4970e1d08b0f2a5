"""PNG plots of a finished run, drawn from its ``metrics.jsonl`` (rank 0, at the end).

``itop_rate.png``: ITOP rate over steps; ``acc_vs_flops.png``: validation accuracy against
cumulative training FLOPs; ``layer_density.png``: per-layer density, initial vs final;
``loss_lr.png``: training loss and learning rate over steps; ``density.png``: overall density
over steps, for runs whose density changes (dense-to-sparse: GraNet, GMP). Every plot carries
the run's name and method (from ``config.yaml`` beside ``metrics.jsonl``) in its title.
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402

from launcher.tracking import method_line  # noqa: E402


def read_records(path: pathlib.Path) -> list[dict]:
    """The records of a run; a step logged twice (re-run after a resume) keeps the last."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seen: dict[tuple, dict] = {}
    for r in records:
        seen[(r.get("step"), tuple(sorted(k for k in r if k not in ("step", "epoch"))))] = r
    return sorted(seen.values(), key=lambda r: r.get("step", 0))


def _series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    points = [(r[x], r[y]) for r in records if x in r and y in r]
    return [p[0] for p in points], [p[1] for p in points]


def run_title(folder: pathlib.Path) -> str:
    """"<run name> - <method line>" from the run folder's ``config.yaml`` (the name only
    when there is none)."""
    config = folder / "config.yaml"
    if not config.is_file():
        return folder.name
    try:
        return f"{folder.name} - {method_line(yaml.safe_load(config.read_text()))}"
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        return folder.name


def write_plots(metrics: pathlib.Path, folder: pathlib.Path, title: str | None = None) -> list[pathlib.Path]:
    """Write the plots the run has data for; returns their paths. ``title``: the run's name
    and method (default: from ``folder``'s name and ``config.yaml``)."""
    records = read_records(metrics)
    run = title if title is not None else run_title(folder)
    written = []

    steps, rates = _series(records, "step", "itop/rate")
    if rates:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, rates, marker=".")
        ax.set(xlabel="optimizer step", ylabel="ITOP rate (explored / masked weights)",
               title="In-time over-parameterisation rate", ylim=(0, max(1.0, max(rates))))
        written.append(_save(fig, folder / "itop_rate.png", run))

    flops, acc = _series([r for r in records if "val/acc" in r], "flops/train_cumulative", "val/acc")
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(flops, acc, marker="o")
        ax.set(xlabel="cumulative training FLOPs", ylabel="validation accuracy",
               title="Accuracy against training cost")
        written.append(_save(fig, folder / "acc_vs_flops.png", run))

    train = [r for r in records if "train/loss" in r]
    if train:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        top.plot(*_series(train, "step", "train/loss"), marker=".")
        top.set(ylabel="training loss", title="Training loss and learning rate")
        bottom.plot(*_series(train, "step", "train/lr"), color="tab:orange")
        bottom.set(xlabel="optimizer step", ylabel="learning rate")
        written.append(_save(fig, folder / "loss_lr.png", run))

    steps, densities = _series(records, "step", "sparsity/density")
    if densities and max(densities) - min(densities) > 1e-9:  # dense-to-sparse (GraNet, GMP)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, densities, marker=".")
        ax.set(xlabel="optimizer step", ylabel="density (non-zero / masked weights)",
               title="Density over training", ylim=(0, max(1.0, max(densities)) * 1.02))
        written.append(_save(fig, folder / "density.png", run))

    layers = [r["mask/layer_density"] for r in records if "mask/layer_density" in r]
    if layers:
        names = list(layers[0])
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4.5))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [layers[0][n] for n in names], width=0.4, label="initial")
        ax.bar([i + 0.2 for i in x], [layers[-1][n] for n in names], width=0.4, label="final")
        ax.set_xticks(list(x), [n.removesuffix(".weight") for n in names], rotation=90, fontsize=7)
        ax.set(ylabel="density", title="Per-layer density")
        ax.legend()
        written.append(_save(fig, folder / "layer_density.png", run))
    return written


def _save(fig, path: pathlib.Path, run: str = "") -> pathlib.Path:
    if run:  # the run's name and method above the plot's own title
        width = max(40, int(fig.get_figwidth() * 13))  # characters that fit at 8 pt
        fig.suptitle("\n".join(textwrap.wrap(run, width)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
