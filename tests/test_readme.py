"""The README's promises: the own-loop snippet runs, and the set-up commands match CI."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_own_loop_snippet_trains_a_model_the_zoo_does_not_have(capsys, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "Sparsifier(" in b)
    block = block.replace("/tmp/sparse_state.pt", str(tmp_path / "state.pt"))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    sparsifier = scope["sparsifier"]
    out = capsys.readouterr().out
    assert out.count("The percentage of the total fired weights is") == 6  # 300 / 50 updates
    assert abs(sparsifier.density - 0.2) < 0.01
    assert sparsifier.itop_rate > 1.5 * sparsifier.density
    assert (tmp_path / "state.pt").stat().st_size > 0


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


@pytest.mark.slow
def test_every_itop_train_command_in_the_readme_parses(monkeypatch):
    """Each one-line ``itop-train``/``launcher.train`` command of the README (the papers' spellings
    included) gives a configuration; ``...`` and ``<recipe>`` stand for more and are left out."""
    import shlex

    from launcher.config import parse_config

    monkeypatch.chdir(REPO)  # the commands name configs/ relative to the repository
    commands = re.findall(r"(?:itop-train|-m launcher\.train)((?: [^`\n]*)?)", README)
    commands = [c for c in commands if "..." not in c and "<" not in c]
    assert len(commands) >= 12
    for command in commands:
        cfg = parse_config(shlex.split(command))
        assert cfg.sparse == ("--sparse" in command or "rigl_itop" in command), command
    pre_train = next(c for c in commands if "--pre_train" in c)
    tickets = parse_config(shlex.split(pre_train)).tickets
    assert tickets.enabled and tickets.no_mask_updates and tickets.update_bn and tickets.cycle == 2
