"""Plugin options: declared on specs, set in a section named after the plugin, checked like core keys."""

from __future__ import annotations

import re

import pytest
from vistune import hookimpl
from vistune.cli import main
from vistune.config import build_config, load_config
from vistune.errors import ConfigError
from vistune.specs import Adapter, Option, Reward
from vistune.testing import ContractError, check_options

#: A third-party adapter in the manner of PLUGINS.md's lora-plus: LoRA's options plus one of its own.
RATIO = Option("lr_ratio", "float", 16.0, "learning rate of the B matrices over that of the A matrices", minimum=0)


def lora_plus_spec(**fields):
    from vistune.adapters.options import LORA_OPTIONS

    return Adapter("lora-plus-test", apply="vistune.adapters.lora:apply_lora", merge="vistune.adapters.lora:merge_lora",
                   options=(*LORA_OPTIONS, RATIO), **fields)  # fmt: skip


def SpecPlugin(spec):  # noqa: N802 (it stands for a plugin class)
    """A plugin that registers one spec through the registration hook of its kind."""
    from vistune.specs import Template

    hook = {Adapter: "vistune_register_adapters", Template: "vistune_register_templates",
            Reward: "vistune_register_rewards"}[type(spec)]  # fmt: skip

    def register_one(self, register):
        register(spec)

    return type("SpecPlugin", (), {hook: hookimpl(register_one)})()


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- reading and checking ----------------------------------------------------------------


def test_section_and_flag_values_reach_the_plugin_with_defaults_filled(tmp_path, register_plugin):
    from vistune.options import option_values

    spec = lora_plus_spec()
    register_plugin(SpecPlugin(spec))
    path = write(tmp_path, "adapter: lora-plus-test\nlora-plus-test:\n  rank: 4\n  lr_ratio: 8\n")
    config = load_config(path, ["--lora-plus-test.target-modules", "[q_proj]"], task="sft").config
    values = option_values(config, "lora-plus-test", spec.options)
    assert values["rank"] == 4 and values["lr_ratio"] == 8.0 and isinstance(values["lr_ratio"], float)
    assert values["target_modules"] == ["q_proj"]  # the flag, option part spelled with dashes
    assert values["alpha"] == 16 and values["scope"] == "language_model"  # declared defaults


def test_bad_options_name_the_file_line_and_the_closest_name(tmp_path, register_plugin):
    register_plugin(SpecPlugin(lora_plus_spec()))
    path = write(tmp_path, "adapter: lora\nlora:\n  rank: 8\n  alpah: 32\nlora-plus-test:\n  lr_ratio: fast\n"
                 "lroa: {rank: 4}\n")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_config(path, task="sft")
    message = str(caught.value)
    assert message.startswith("3 problems in the config")  # every one at once
    assert f"{path}:4: adapter lora has no option 'alpah' (did you mean alpha?)" in message
    assert f"{path}:6: lora-plus-test.lr_ratio must be a number, got 'fast'" in message
    assert f"{path}:7: unknown key 'lroa' (did you mean lora?)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora: {rank: 0}", r"run.yaml:1: lora.rank must be at least 1, got 0"),
        ("lora: {scope: everything}", r"lora.scope must be one of language_model, all; got 'everything'"),
        ("lora: 16", r"lora is the options section of adapter lora; give a mapping"),
        ("full: {rank: 4}", r"adapter full has no option 'rank'; its options: none"),
        ("lora_rnak: 4", r"unknown key 'lora_rnak' \(did you mean lora_rank\?\)"),
    ],
)
def test_option_values_are_checked_like_core_keys(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text + "\n"), task="sft")


def test_a_flat_alias_and_its_section_may_not_disagree(tmp_path):
    path = write(tmp_path, "adapter: lora\nlora:\n  rank: 16\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: lora_rank sets lora.rank to 8, but lora.rank "
                                                    f"({path}:3) sets it to 16")):  # fmt: skip
        load_config(path, task="sft")
    agreeing = load_config(write(tmp_path, "lora:\n  rank: 16\nlora_rank: 16\n", "same.yaml"), task="sft").config
    assert agreeing.options["lora"]["rank"] == 16
    # the flat key sets the option of every adapter that declares it, so --adapter dora keeps it
    assert load_config(None, ["--lora_rank", "4", "--adapter", "dora"], task="sft").config.options["dora"]["rank"] == 4


def test_a_flag_replaces_the_files_section_value(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 16\n  alpha: 8\n")
    config = load_config(path, ["--lora.rank", "4"], task="sft").config
    assert config.options["lora"] == {"rank": 4, "alpha": 8}


def test_algorithm_options_are_the_algorithms_section(tmp_path):
    from vistune.plugins import get_plugin_manager
    from vistune.specs import load_ref

    path = write(tmp_path, "algorithm: grpo\nalgorithm_options:\n  scale_rewards: false\n  num_iteration: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: algorithm_options: algorithm grpo has no option "
                                                    "'num_iteration' (did you mean num_iterations?)")):  # fmt: skip
        load_config(path, task="rl")
    config = load_config(write(tmp_path, "algorithm_options: {scale_rewards: false}\ngrpo: {num_iterations: 2}\n",
                               "ok.yaml"), task="rl").config  # fmt: skip
    grpo = load_ref(get_plugin_manager().registries.algorithms.get("grpo").factory)(config)
    assert grpo.scale_rewards is False and grpo.num_iterations == 2


# -- the plan and --help -----------------------------------------------------------------


def test_dry_run_shows_the_chosen_plugins_options_and_warns_about_the_others(tmp_path, tiny_llama, register_plugin,
                                                                            capsys):  # fmt: skip
    register_plugin(SpecPlugin(lora_plus_spec()))
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    path = write(tmp_path, f"model: {tiny_llama}\ndataset: {data}\nadapter: lora-plus-test\nlora-plus-test:\n"
                 "  lr_ratio: 4\nlora:\n  rank: 32\ngalore_rank: 64\nmax_steps: 1\n")  # fmt: skip
    assert main(["sft", "--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("  lora-plus-test  rank=8 alpha=16 dropout=0.05 target_modules=[q_proj, v_proj] scope=language_model "
            "lr_ratio=4.0\n") in out  # fmt: skip
    assert f"warning: lora ({path}:6) sets options of adapter lora, which this run does not use" in out
    assert f"warning: galore_rank ({path}:8) sets an option of galore, which this run does not use" in out


def test_task_help_lists_the_plugins_options(register_plugin, capsys):
    register_plugin(SpecPlugin(lora_plus_spec()))
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "plugin options (a YAML section named after the plugin" in out
    assert "  lora (adapter lora):\n    rank: LoRA rank r (int, default 8; flat key lora_rank)" in out
    assert "  galore (adapter galore):" in out
    assert ("    lr_ratio: learning rate of the B matrices over that of the A matrices (float, default 16.0)"
            in out.split("  lora-plus-test (adapter lora-plus-test):")[1])  # fmt: skip
    assert "(algorithm grpo)" not in out  # rl's options are for `vistune rl --help`
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    assert "  grpo (algorithm grpo):\n    loss_normalisation [sequence|token|constant]" in capsys.readouterr().out
    assert main(["list", "adapters", "--json"]) == 0
    listed = {row["name"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert listed["lora-plus-test"]["options"][-1] == {"name": "lr_ratio", "type": "float", "default": 16.0,
                                                       "help": RATIO.help, "alias": None}  # fmt: skip
    assert "options" not in listed["full"]


# -- rewards -----------------------------------------------------------------------------


def scaled(factor=1.0, floor=0.0):
    def reward(prompts, completions, **columns):
        return [max(floor, factor * len(c)) for c in completions]

    return reward


def test_reward_options_come_from_its_section_and_each_entry(tmp_path, register_plugin):
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    register_plugin(SpecPlugin(Reward("scaled-test", factory=scaled, options=(
        Option("factor", "float", 1.0, "multiplies the length"), Option("floor", "float", 0.0, "lowest score")))))  # fmt: skip
    config = {"task": "infer", "model": str(tmp_path), "dataset": str(tmp_path), "scaled-test": {"factor": 2},
              "rewards": [{"name": "scaled-test", "options": {"floor": 1}}, "scaled-test"]}  # fmt: skip
    plan = make_plan(build_config(config), get_plugin_manager())
    assert [use.options for use in plan.rewards] == [{"factor": 2.0, "floor": 1}, {"factor": 2.0, "floor": 0.0}]
    bad = make_plan(build_config({**config, "rewards": [{"name": "scaled-test", "options": {"flor": 1}}]}),
                    get_plugin_manager())  # fmt: skip
    assert any("reward scaled-test has no option 'flor' (did you mean floor?)" in p.message for p in bad.problems)


# -- the contract check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (Option("ratio", "float", "16", "ratio"), r"option 'ratio': its default '16' is not a float value as the config "
         r"reads it \(it would read as 16.0\)"),
        (Option("ratio", "int", 1.5, "ratio"), r"option 'ratio': its default 1.5 is not valid"),
        (Option("ratio", "float", 16, "ratio"), r"its default 16 is not a float value as the config reads it"),
        (Option("ratio", "float", 16.0, " "), r"option 'ratio': help must be one non-empty line"),
        (Option("ratio", "str", "a", "ratio", choices=("b", "c")), r"its default 'a' is not valid: .*one of b, c"),
        (Option("ratio", "float", 1.0, "ratio", minimum=2), r"its default 1.0 is not valid: .*at least 2"),
        (Option("ratio", "float", 1.0, "ratio", alias="learning_rate"), r"its alias 'learning_rate' is a core config key"),
    ],
)
def test_check_options_catches_unusable_declarations(option, message):
    with pytest.raises(ContractError, match=message):
        check_options(Adapter("toy", apply="vistune.adapters.full:apply_full", options=(option,)))


def test_check_options_passes_every_registered_plugin(plugin_manager):
    from vistune.options import OPTION_KINDS, specs_of

    declared = [spec for kind in OPTION_KINDS for spec in specs_of(plugin_manager.registries, kind) if spec.options]
    assert {"lora", "dora", "qlora", "galore", "grpo", "dapo", "nf4", "int8"} <= {spec.name for spec in declared}
    for spec in declared:
        assert check_options(spec) == spec.options
    with pytest.raises(ContractError, match="its options section would be the config key 'seed'"):
        check_options(Adapter("seed", apply="vistune.adapters.full:apply_full", options=(RATIO,)))
    with pytest.raises(ValueError, match="declares lr_ratio more than once"):
        Adapter("toy", apply="vistune.adapters.full:apply_full", options=(RATIO, RATIO))


# -- what the spec says instead of the name ------------------------------------------------


@pytest.mark.parametrize("peft_adapter", [True, False])
def test_rl_reference_model_follows_the_adapters_spec(tmp_path, tiny_llama, register_plugin, peft_adapter):
    """A third-party LoRA adapter that says it is a peft adapter gets "adapter disabled" as its reference."""
    pytest.importorskip("peft")
    from vistune.pipelines.rl import load_policy
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    register_plugin(SpecPlugin(lora_plus_spec(peft_adapter=peft_adapter)))
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    loaded = build_config({"task": "rl", "model": str(tiny_llama), "dataset": str(data), "adapter": "lora-plus-test",
                           "device": "cpu", "dtype": "float32", "beta": 0.1, "rewards": ["bleu"],
                           "output_dir": str(tmp_path / "out")})  # fmt: skip
    plan = make_plan(loaded, get_plugin_manager())
    model, _, _, ref_adapter, ref_model = load_policy(plan, needs_reference=True)
    assert hasattr(model, "disable_adapter")  # LoRA was applied either way
    assert ref_adapter is None
    if peft_adapter:
        assert ref_model is None  # the policy with its adapter disabled: no second copy of the weights
    else:
        assert ref_model is not None and not any(p.requires_grad for p in ref_model.parameters())


def test_core_plan_pipelines_and_trainers_never_name_a_registered_plugin(plugin_manager):
    """Core asks specs what a plugin is; a registered name as a string constant there means it decides by name.

    Docstrings may name plugins; the defaults live in the config, which is not scanned.
    """
    import ast
    from pathlib import Path

    import vistune

    names = {spec.name for registry in plugin_manager.registries.by_kind.values() for spec in registry}
    assert {"lora", "qlora", "galore", "transformers", "grpo"} <= names
    root = Path(vistune.__file__).parent
    files = [root / "plan.py", root / "loading.py", *root.glob("pipelines/*.py"), *root.glob("training/*.py"),
             *root.glob("rl/*.py")]  # fmt: skip
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}  # fmt: skip
        found += [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]  # fmt: skip
    assert not found, found


def test_a_templates_options_reach_its_factory(register_plugin):
    from vistune.loading import make_encoder
    from vistune.plan import Plan
    from vistune.specs import Template

    made = []

    def factory(processor, options):
        made.append(options)
        return object()

    spec = Template("system-test", factory=factory,
                    options=(Option("system", "str", "", "system prompt put before every conversation"),))  # fmt: skip
    register_plugin(SpecPlugin(spec))
    plan = Plan(build_config({"task": "sft", "system-test": {"system": "Be brief."}, "max_length": 64}))
    plan.template = spec
    make_encoder(plan, processor=None)
    plan_defaults = Plan(build_config({"task": "sft"}))
    plan_defaults.template = spec
    make_encoder(plan_defaults, processor=None)
    assert [(o.max_length, o.plugin_options) for o in made] == [(64, {"system": "Be brief."}), (2048, {"system": ""})]


def test_plugin_names_with_dots_take_sections_and_flags(register_plugin):
    from vistune.specs import Template

    register_plugin(SpecPlugin(Template("chat-v2.5", factory=lambda processor, options: None,
                                        options=(Option("system", "str", "", "system prompt"),))))  # fmt: skip
    assert build_config({"chat-v2.5": {"system": "hi"}}).config.options == {"chat-v2.5": {"system": "hi"}}
    assert load_config(None, ["--chat-v2.5.system", "yo"]).config.options == {"chat-v2.5": {"system": "yo"}}


def test_quantization_schemes_declare_options_that_reach_bitsandbytes(tmp_path, tiny_llama, capsys):
    from vistune.loading import load_options
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager
    from vistune.quantization import get_scheme

    path = write(tmp_path, f"model: {tiny_llama}\nquantization: nf4\nadapter: qlora\nnf4:\n  double_quant: false\n"
                 "int8: {threshold: 4}\n")  # fmt: skip
    plan = make_plan(load_config(path, task="serve"), get_plugin_manager())
    assert ("nf4", "double_quant=False") in plan.lines
    assert any(f"int8 ({path}:6) sets options of quantization int8, which this run does not use" in w
               for w in plan.warnings)  # fmt: skip
    options = load_options(plan, for_training=False)
    # transformers.BitsAndBytesConfig's own field names and values
    assert get_scheme("nf4").bnb_kwargs(options.quantization_options)["bnb_4bit_use_double_quant"] is False
    assert get_scheme("q4_k_m").bnb_kwargs()["bnb_4bit_use_double_quant"] is True  # QLoRA's recipe by default
    assert get_scheme("int8").bnb_kwargs({"threshold": 4.0})["llm_int8_threshold"] == 4.0
    with pytest.raises(ConfigError, match=r"run.yaml:2: q8_0.threshold must be at least 0, got -1"):
        load_config(write(tmp_path, "quantization: q8_0\nq8_0: {threshold: -1}\n"), task="sft")
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    assert "  nf4 (quantization nf4):\n    double_quant: quantize the quantization constants" in capsys.readouterr().out
