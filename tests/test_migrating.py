"""docs/MIGRATING.md names only vistune keys and values that a config accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from vistune.config import load_config

ROOT = Path(__file__).parents[1]
GUIDE = (ROOT / "docs" / "MIGRATING.md").read_text()


def vistune_cells() -> list[tuple[int, str]]:
    """``(line, cell)``: the last column (vistune's) of every table row in the guide."""
    cells = []
    for number, line in enumerate(GUIDE.splitlines(), 1):
        if line.startswith("| ") and not re.match(r"\| -+ \|", line) and "| vistune" not in line:
            cells.append((number, line.strip().strip("|").split(" | ")[-1]))
    return cells


def test_guide_maps_every_setting_the_migration_needs():
    keys = {key for _, cell in vistune_cells() for span in re.findall(r"`([^`]+)`", cell)
            if ":" in span for key in yaml.safe_load(span)}  # fmt: skip
    expected = {"model", "dataset", "template", "lora_rank", "lora_alpha", "lora_target_modules", "learning_rate",
                "num_train_epochs", "per_device_batch_size", "gradient_accumulation_steps", "max_length", "packing",
                "quantization", "parallel_method", "report_to", "output_dir", "rewards"}  # fmt: skip
    assert expected <= keys, expected - keys
    for tool in ("ms-swift", "TRL", "LLaMA-Factory"):
        assert f"| {tool}" in GUIDE


@pytest.mark.parametrize(("line", "cell"), vistune_cells(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_vistune_cell_is_a_valid_config(line, cell, tmp_path):
    spans = [span for span in re.findall(r"`([^`]+)`", cell) if ":" in span and not span.startswith("vistune ")]
    assert spans, f"docs/MIGRATING.md:{line}: the vistune column names no key: {cell}"
    values = {}
    for span in spans:
        values.update(yaml.safe_load(span))
    path = tmp_path / "row.yaml"
    path.write_text(yaml.safe_dump(values))
    load_config(str(path))  # raises, naming the key, for anything a config does not accept


@pytest.mark.parametrize("block", re.findall(r"^```yaml\n(.*?)^```", GUIDE, re.MULTILINE | re.DOTALL))
def test_every_yaml_example_is_a_valid_config_for_its_command(block, tmp_path):
    task = re.match(r"# vistune (\w+) --config", block).group(1)
    path = tmp_path / "run.yaml"
    path.write_text(block)
    loaded = load_config(str(path), task=task)
    assert loaded.config.task == task and loaded.config.model


def test_reward_examples_are_called_as_their_tools_call_them(tmp_path):
    """The guide's TRL function and ms-swift class, loaded from files as the guide names them."""
    from vistune.plan import RewardUse
    from vistune.rl.rewards import call_reward, load_reward

    trl, swift = re.findall(r"^```python\n(.*?)^```", GUIDE, re.MULTILINE | re.DOTALL)
    (tmp_path / "rewards.py").write_text(trl)
    # ms-swift itself is not installed here: a stand-in with its ORM base class and orms registry
    (tmp_path / "swift").mkdir()
    (tmp_path / "swift" / "__init__.py").write_text("")
    (tmp_path / "swift" / "plugin.py").write_text("class ORM:\n    pass\n\n\norms = {}\n")
    (tmp_path / "plugin.py").write_text(swift)
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        length = load_reward(RewardUse("rewards.py:reward_len", 1.0, {}, file=tmp_path / "rewards.py", attribute="reward_len"))
        accuracy = load_reward(RewardUse("plugin.py:my_accuracy", 2.0, {}, file=tmp_path / "plugin.py",
                                         attribute="my_accuracy"))  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "swift" or m.startswith("swift.")]:
            del sys.modules[name]
    completions, prompts = ["4", "five"], [[{"role": "user", "content": "2 + 2?"}]] * 2
    columns = {"solution": ["4", "4"], "completion_ids": [[1], [2]], "trainer_state": None}
    assert call_reward(length.function, prompts, completions, **columns) == [-19, -16]
    assert call_reward(accuracy.function, prompts, completions, **columns) == [1.0, 0.0]


def test_other_tools_key_names_are_listed_in_the_guide_and_in_help(capsys):
    from vistune.cli import main
    from vistune.config import KEY_ALIASES

    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    help_text = capsys.readouterr().out
    for alias, name in KEY_ALIASES.items():
        assert f"`--{alias}`" in GUIDE
        assert f"{alias} (= {name})" in help_text
