"""``itop-report``: a W&B report with the panels a sparse-training paper needs.

    itop-report --entity ME --project itop_dist                  # build and save (logged in)
    itop-report --project itop_dist --layers-from runs/RUN --dry-run   # print it, offline

Panels: accuracy against density (one point per run), ITOP rate over steps, accuracy against
cumulative training FLOPs, training/test FLOPs and ITOP rate per run, and per-layer densities
(the ``density/<layer>`` series each run logs at its mask updates; ``--layers-from`` names the
layers from a local run folder, otherwise the per-update density table is shown).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import wandb_workspaces.reports.v2 as wr


def layer_names(run_dir: pathlib.Path) -> list[str]:
    """Masked layer names as the run logged them (its first per-layer density record)."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "mask/layer_density" in record:
            return list(record["mask/layer_density"])
    raise ValueError(f"--layers-from: {run_dir} has no per-layer densities (a dense run?)")


def build_report(entity: str, project: str, title: str, layers: list[str]) -> wr.Report:
    runs = [wr.Runset(entity=entity, project=project, name="all runs")]
    panels = [
        wr.ScatterPlot(title="Accuracy vs density", x="sparsity/density", y="val/acc"),
        wr.LinePlot(title="ITOP rate (explored / masked weights)", x="Step", y=["itop/rate"]),
        wr.LinePlot(title="Accuracy vs training FLOPs", x="flops/train_cumulative", y=["val/acc"]),
        wr.BarPlot(title="FLOPs vs dense and ITOP rate",
                   metrics=["flops/train_rel", "flops/test_rel", "itop/rate"]),
    ]
    if layers:
        panels.append(wr.BarPlot(title="Per-layer density", metrics=[f"density/{n}" for n in layers]))
    else:
        panels.append(wr.WeavePanelSummaryTable(table_name="mask/layer_density_table"))
    return wr.Report(
        entity=entity, project=project, title=title,
        description="Accuracy, sparsity, ITOP rate and FLOPs of itop_dist runs.",
        blocks=[
            wr.H1(title),
            wr.P("Each run logs val/acc, sparsity/density, itop/rate, flops/* and, at every "
                 "mask update, the density of every layer."),
            wr.PanelGrid(runsets=runs, panels=panels),
        ],
    )


def describe(report: wr.Report) -> str:
    """The report's structure as indented text (no W&B connection needed)."""
    lines = [f"report {report.title!r} for {report.entity}/{report.project}"]
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            lines.append(f"  panel grid over {', '.join(r.project for r in block.runsets)}:")
            for panel in block.panels:
                axes = {k: getattr(panel, k) for k in ("x", "y", "metrics", "table_name")
                        if getattr(panel, k, None)}
                lines.append(f"    {type(panel).__name__} {getattr(panel, 'title', '') or ''!r} {axes}")
        else:
            lines.append(f"  {type(block).__name__}: {getattr(block, 'text', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itop-report", description=__doc__.split("\n")[0])
    parser.add_argument("--entity", default="your-entity", help="W&B entity (user or team)")
    parser.add_argument("--project", default="itop_dist")
    parser.add_argument("--title", default="Sparse training with itop_dist")
    parser.add_argument("--layers-from", type=pathlib.Path, help="a local run folder naming the layers")
    parser.add_argument("--dry-run", action="store_true", help="print the report; save nothing")
    args = parser.parse_args(argv)
    try:
        layers = layer_names(args.layers_from) if args.layers_from else []
    except (OSError, ValueError) as err:
        print(f"itop-report: {err}", file=sys.stderr)
        return 2
    report = build_report(args.entity, args.project, args.title, layers)
    print(describe(report))
    if args.dry_run:
        return 0
    try:
        report.save()
    except Exception as err:  # noqa: BLE001 - W&B's errors: not logged in, no network, ...
        print(f"itop-report: could not save the report ({str(err).splitlines()[0]}); "
              f"log in with `wandb login`, or use --dry-run", file=sys.stderr)
        return 1
    print(f"saved: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
