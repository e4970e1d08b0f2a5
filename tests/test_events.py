"""The loop's named events and plug-ins: a phase is a new file and a registry entry, the loop
fires every event at its point, plug-ins' state is checkpointed and resumed."""

import json
import shlex

import pytest

from launcher.checkpoint import CheckpointError
from launcher.config import parse_config
from launcher.events import PLUGINS, Event, Plugin
from launcher.trainer import Trainer
from test_train import read_metrics

RUN = ("--sparse --density 0.1 --data digits --model digits-mlp --epochs 2 --batch-size 64 "
       "--lr 0.05 --update-frequency 10 --no-wandb --no-plots --no-progress --device cpu")


class Recorder(Plugin):
    """Writes down every event with the step it saw; checkpointed."""

    state_key = "recorder"
    flags = "the tests' recorder plug-in"

    def __init__(self) -> None:
        self.seen: list[list] = []

    def on_event(self, event, run):
        self.seen.append([event.value, run.state.step])

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, sd):
        self.seen = [list(e) for e in sd["seen"]]


class LateExplore(Plugin):
    """A small custom phase: from epoch 1 on the LR is 0.3 x the recipe's, and at the end of
    epoch 1 the masks get one extra prune-and-regrow update."""

    def __init__(self, start: int) -> None:
        self.start = start

    def lr_factor(self, step, recipe):
        return recipe(step) * (0.3 if step >= self.start else 1.0)

    def on_event(self, event, run):
        if event is Event.EPOCH_END and run.state.epoch == 1:
            run.record_mask_update(run.sparsifier.update())


def fit(args: str, tmp_path, name="run"):
    trainer = Trainer(parse_config(shlex.split(f"{RUN} {args} --output-dir {tmp_path / name}")))
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


@pytest.mark.slow
def test_the_loop_fires_every_event_at_its_point(monkeypatch, tmp_path):
    recorder = Recorder()
    monkeypatch.setitem(PLUGINS, "recorder", lambda cfg, run: recorder)
    trainer, summary = fit("", tmp_path)
    n, spe = trainer.total_steps, trainer.steps_per_epoch
    assert n == 2 * spe and spe == 22  # 1437 training samples // 64
    expected = [["init", 0]]
    for step in range(1, n + 1):  # the optimizer step is counted between the step's two events
        expected += [["after_backward", step - 1], ["after_optimizer_step", step]]
        if step % spe == 0:
            expected.append(["epoch_end", step])
    expected.append(["fit_end", n])
    assert recorder.seen == expected
    assert summary["step"] == n


@pytest.mark.slow
def test_a_plugged_in_phase_changes_the_run_without_touching_the_loop(monkeypatch, tmp_path):
    monkeypatch.setitem(PLUGINS, "late_explore", lambda cfg, run: LateExplore(run.steps_per_epoch))
    trainer, _ = fit("--log-interval 2 --lr-schedule constant", tmp_path, "phase")
    monkeypatch.delitem(PLUGINS, "late_explore")
    fit("--log-interval 2 --lr-schedule constant", tmp_path, "plain")
    spe = trainer.steps_per_epoch
    ours = {r["step"]: r for r in read_metrics(tmp_path / "phase") if "train/lr" in r}
    theirs = {r["step"]: r for r in read_metrics(tmp_path / "plain") if "train/lr" in r}
    # The recipe's LR (constant 0.05) until epoch 1; 0.3 x it after (the LR logged at a step
    # is the one the next step uses).
    assert ours[spe - 2]["train/lr"] == theirs[spe - 2]["train/lr"] == pytest.approx(0.05)
    assert ours[spe]["train/lr"] == pytest.approx(0.015) and theirs[spe]["train/lr"] == pytest.approx(0.05)
    assert ours[2 * spe]["train/lr"] == pytest.approx(0.015)
    # One extra mask update at the end of epoch 1 (step 22), beside the scheduled ones.
    updates = [r["step"] for r in read_metrics(tmp_path / "phase") if "mask/pruned" in r]
    plain_updates = [r["step"] for r in read_metrics(tmp_path / "plain") if "mask/pruned" in r]
    assert plain_updates == [10, 20, 30, 40] and updates == [10, 20, 22, 30, 40]


@pytest.mark.slow
def test_a_plugins_state_is_checkpointed_and_resumed(monkeypatch, tmp_path):
    recorder = Recorder()
    monkeypatch.setitem(PLUGINS, "recorder", lambda cfg, run: recorder)
    fit("--max-steps 27", tmp_path)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000027" / "recorder.json").read_text())
    assert saved["seen"][-1] == ["after_optimizer_step", 27]
    recorder = Recorder()  # a new process: the state comes from the checkpoint
    monkeypatch.setitem(PLUGINS, "recorder", lambda cfg, run: recorder)
    fit("--resume auto", tmp_path)
    optimizer_steps = [s for e, s in recorder.seen if e == "after_optimizer_step"]
    assert optimizer_steps == list(range(1, 45))  # every step once, across the resume
    assert [e for e, _ in recorder.seen].count("init") == 2
    # A run without the plug-in refuses that checkpoint, naming what turned it on.
    monkeypatch.delitem(PLUGINS, "recorder")
    with pytest.raises(CheckpointError, match="holds the recorder state .* but this run has it off"):
        fit("--resume auto", tmp_path)
