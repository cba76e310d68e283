"""Resolving a validated config into a Plan: every name looked up, every path found.

The plan is what ``--dry-run`` prints.  Resolution never imports torch or loads weights,
and collects *all* problems instead of stopping at the first, so one dry run tells
the user everything that is missing.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Any

import attrs

from vistune import reporting, specs
from vistune.config import FIELDS, LoadedConfig, RunConfig, Source
from vistune.data.locate import DatasetLocation, locate_dataset
from vistune.errors import VistuneError
from vistune.hardware import visible_gpu_count
from vistune.model_hub import describe_download, download_blocker, looks_like_repo_id, manual_download_hint
from vistune.models import alias_locations, detect_model_type, hf_cache_dir, hf_cache_snapshot
from vistune.outputs import unwritable_reason
from vistune.plugins import PluginManager
from vistune.provenance import adapter_base_type, fits_model, recorded_template
from vistune.options import describe as describe_options
from vistune.options import option_values, spec_option_values, unused_warnings
from vistune.quantization import SCHEMES, QuantizationScheme, get_scheme


@attrs.define
class Problem:
    """Something that stops the run: which field, what is wrong, how to fix it."""

    field: str
    where: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.where}: {self.field}: {self.message}"
        return text + (f"\n      fix: {self.hint}" if self.hint else "")


@attrs.define
class RewardUse:
    """A reward as the run will call it."""

    name: str
    weight: float
    options: dict[str, Any]
    spec: specs.Reward | None = None
    #: ``path/to/file.py:Name`` references are loaded from that file; ``attribute`` is None for
    #: ``path/to/file.py`` alone (the one entry of the file's ms-swift ``orms`` dict).
    file: Path | None = None
    attribute: str | None = None


@attrs.define
class Launch:
    """How many processes the run starts, on what device, and how they share the work (``method``)."""

    processes_per_node: int
    nnodes: int
    method: str
    device: str

    @property
    def distributed(self) -> bool:
        return self.processes_per_node * self.nnodes > 1


@attrs.define
class Plan:
    loaded: LoadedConfig
    model_dir: Path | None = None
    model_type: specs.ModelType | None = None
    template: specs.Template | None = None
    adapter: specs.Adapter | None = None
    quantization: QuantizationScheme | None = None
    dataset: DatasetLocation | None = None
    eval_dataset: DatasetLocation | None = None
    algorithm: specs.Algorithm | None = None
    rewards: list[RewardUse] = attrs.field(factory=list)
    backend: specs.Backend | None = None
    launch: Launch | None = None
    #: Hub repo id of a checkpoint with no local copy, which the run downloads before it loads anything.
    model_download: str | None = None
    lines: list[tuple[str, str]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    #: settings the run will ignore (a plugin's options where another plugin is chosen), with their file:line
    warnings: list[str] = attrs.field(factory=list)
    problems: list[Problem] = attrs.field(factory=list)

    @property
    def config(self) -> RunConfig:
        return self.loaded.config

    @property
    def ready(self) -> bool:
        return not self.problems

    def problem(self, field: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(field, self.loaded.where(field), message, hint))

    def render(self) -> str:
        width = max((len(k) for k, _ in self.lines), default=0)
        out = [f"vistune {self.config.task} plan" + (f" ({self.loaded.path})" if self.loaded.path else "")]
        out += [f"  {key.ljust(width)}  {value}" for key, value in self.lines]
        out += [f"  note: {note}" for note in self.notes]
        out += [f"  warning: {warning}" for warning in self.warnings]
        if self.problems:
            out.append(f"not ready: {len(self.problems)} problem(s)")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("ready")
        return "\n".join(out)

    def raise_if_not_ready(self) -> None:
        if self.problems:
            raise VistuneError(
                "the run cannot start:\n" + "\n".join(f"  - {p}" for p in self.problems),
                hint=f"`vistune {self.config.task} --config ... --dry-run` shows the whole plan",
            )


def _lookup(plan: Plan, registry, field: str, name: str, *, show_options: bool = True):
    try:
        spec = registry.get(name)
    except VistuneError as exc:
        plan.problem(field, exc.message, exc.hint)
        return None
    owner = registry.owner(name)
    plan.lines.append((field, f"{name}  [{owner.distribution}]"))
    if show_options and getattr(spec, "options", ()):
        plan.lines.append((name, describe_options(spec_option_values(plan.config, spec))))
    return spec


def _check_adapter(plan: Plan, adapter: specs.Adapter) -> None:
    """What the adapter's spec says it needs: quantization, one learning rate."""
    config = plan.config
    methods = adapter.quantization_methods
    if methods and (plan.quantization is None or plan.quantization.method not in methods):
        # found here rather than after the full-precision model has loaded
        schemes = [name for name, scheme in SCHEMES.items() if scheme.method in methods]
        plan.problem("adapter", f"adapter {adapter.name} needs a base model loaded with quantization "
                     f"{' or '.join(schemes) or ' or '.join(methods)}, but quantization is {config.quantization}",
                     hint=f"set quantization: {schemes[0] if schemes else methods[0]} next to adapter: {adapter.name}")  # fmt: skip
    if not adapter.part_learning_rates:
        for field in ("vision_tower_lr", "projector_lr"):
            if getattr(config, field) not in (None, config.learning_rate):
                # the adapter's optimizer (GaLore's, from transformers) builds its own parameter groups
                plan.problem(field, f"adapter {adapter.name} trains with one learning rate, so {field} cannot differ",
                             hint=f"remove {field}, or use an adapter with per-part learning rates (full)")  # fmt: skip


def _check_requirements(
    plan: Plan, field: str, what: str, requires: tuple[str, ...], requires_cuda: bool, cpu_option: str
) -> None:
    missing = [module for module in requires if importlib.util.find_spec(module) is None]
    if missing:
        plan.problem(field, f"{what} needs the Python package(s) {', '.join(missing)}, which are not installed",
                     hint=f"pip install {' '.join(missing)}")  # fmt: skip
    if requires_cuda and (plan.config.device == "cpu" or visible_gpu_count() == 0):
        plan.problem(field, f"{what} needs a CUDA GPU and this run has none",
                     hint=f"run on a machine with an NVIDIA GPU, or set {cpu_option} to run without one")  # fmt: skip


def _plan_download(plan: Plan, repo_id: str, model_type: str | None, pm: PluginManager, tried: str,
                   env_var: str | None = None) -> None:
    """A checkpoint with no local copy: the run downloads it (the plan only says so), or a problem says why not."""
    config = plan.config
    blocker = download_blocker()
    if blocker:
        named = f"the Hugging Face checkpoint {repo_id}" if repo_id != config.model else "a Hugging Face repo id"
        hint = manual_download_hint(repo_id) + (f" in the config, or export {env_var}=DIR" if env_var else "")
        plan.problem("model", f"{config.model!r} is {named}, which is not on this machine ({tried}), and {blocker}",
                     hint=hint)  # fmt: skip
    else:
        plan.model_download = repo_id
        shown = config.model if repo_id == config.model else f"{config.model} -> {repo_id}"
        plan.lines.append(("model", f"{shown}  ({describe_download(repo_id)})"))
    if model_type in pm.registries.models:
        plan.model_type = pm.registries.models.get(model_type)
        how = "model_type in the config" if config.model_type else "the alias"
        plan.lines.append(("model_type", f"{model_type}  ({how})"))
    elif model_type is None and not blocker:
        plan.lines.append(("model_type", "read from its config.json after the download"))


def _resolve_model(plan: Plan, pm: PluginManager) -> None:
    config = plan.config
    if not config.model:
        plan.problem("model", "no model given", hint="set model: to a checkpoint alias or a local directory")
        return
    path = Path(config.model).expanduser()
    explicit_type = config.model_type
    if config.model in pm.registries.checkpoints:
        try:
            alias = pm.registries.checkpoints.get(config.model)
        except VistuneError as exc:  # a name two distributions registered
            plan.problem("model", exc.message, exc.hint)
            return
        explicit_type = explicit_type or alias.model_type
        found = [(how, d) for how, d in alias_locations(alias, config.model_path) if d is not None]
        existing = [(how, d) for how, d in found if (d / "config.json").is_file()]
        if not existing:
            tried = "; ".join(f"{how}: {d} has no config.json" for how, d in found) or "nothing points at a local copy"
            if config.model_path or os.environ.get(alias.env_var):  # the user named a copy, and it is not there
                plan.problem(
                    "model",
                    f"{config.model!r} is the Hugging Face checkpoint {alias.hf_repo_id}, which is not on this machine ({tried})",
                    hint=f"{manual_download_hint(alias.hf_repo_id)} in the config, or export {alias.env_var}=DIR",
                )
                if explicit_type in pm.registries.models:
                    plan.model_type = pm.registries.models.get(explicit_type)
                    plan.lines.append(("model_type", f"{explicit_type}  (from the alias)"))
            else:
                _plan_download(plan, alias.hf_repo_id, explicit_type, pm, tried, alias.env_var)
            return
        how, plan.model_dir = existing[0]
        plan.lines.append(("model", f"{config.model} -> {plan.model_dir}  ({how})"))
    elif path.is_dir():
        plan.model_dir = path
        plan.lines.append(("model", str(path)))
    # owner/name whose owner is no local folder (a folder would make it a mistyped local path)
    elif not path.exists() and looks_like_repo_id(config.model) and not path.parent.is_dir():
        local = Path(config.model_path).expanduser() if config.model_path else None
        cached = hf_cache_snapshot(config.model)
        if local is not None and not (local / "config.json").is_file():
            plan.problem("model_path", f"{local} has no config.json, so it is not a copy of {config.model}",
                         hint=manual_download_hint(config.model))  # fmt: skip
            return
        if local is None and cached is None:
            _plan_download(plan, config.model, explicit_type, pm, f"not in the Hugging Face cache ({hf_cache_dir()})")
            return
        plan.model_dir = local or cached
        how = "model_path in the config" if local else f"Hugging Face cache ({hf_cache_dir()})"
        plan.lines.append(("model", f"{config.model} -> {plan.model_dir}  ({how})"))
    else:
        hint = ("set model: to a registered alias (`vistune list models`) or to a local Hugging Face directory, "
                "or install the plugin that registers the alias")  # fmt: skip
        if path.exists():
            message = f"{config.model} is a file, not a model directory"
        else:
            close = pm.registries.checkpoints.unknown_message(config.model)
            message = f"{config.model!r} is neither a local directory nor a registered alias ({close})"
        plan.problem("model", message, hint)
        return
    try:
        plan.model_type, how = detect_model_type(plan.model_dir, pm.registries.models, explicit_type)
        if explicit_type and not config.model_type:
            how = f"the alias {config.model!r}"
        owner = pm.registries.models.owner(plan.model_type.name)
        plan.lines.append(("model_type", f"{plan.model_type.name}  [{owner.distribution}] ({how})"))
    except VistuneError as exc:
        plan.problem("model_type", exc.message, exc.hint)


def _resolve_template(plan: Plan, pm: PluginManager) -> None:
    """The config's template, else the one the trained output records, else the model type's default.

    A template recorded in ``vistune_run.json`` (of ``adapter_path``, else of the model
    directory) becomes the run's ``template``, so that every engine encodes prompts as the
    model was trained; a config that asks for another one gets a note saying so.
    """
    config = plan.config
    adapter_dir = Path(config.adapter_path) if config.adapter_path and Path(config.adapter_path).is_dir() else None
    try:
        recorded = recorded_template([adapter_dir, plan.model_dir])
    except VistuneError as exc:
        plan.problem("model", exc.message, exc.hint)
        recorded = None
    if config.template:
        if recorded and recorded.value != config.template:
            plan.notes.append(f"{recorded.file} records that the model was trained with template {recorded.value!r}, "
                              f"but {plan.loaded.where('template')} sets template {config.template!r}")  # fmt: skip
        name = config.template
    elif recorded:
        # the engines read the template from the config: put the recorded one there, with where it came from
        config.template = name = recorded.value
        plan.loaded.sources["template"] = Source(file=str(recorded.file))
    else:
        name = plan.model_type.default_template if plan.model_type else None
    if name:
        plan.template = _lookup(plan, pm.registries.templates, "template", name)
        if plan.template and recorded and name == recorded.value and plan.lines and plan.lines[-1][0] == "template":
            plan.lines[-1] = ("template", f"{plan.lines[-1][1]} (recorded in {recorded.file})")


def _check_adapter_base(plan: Plan, pm: PluginManager) -> None:
    """A problem for an ``adapter_path`` trained on another model type than the run's model."""
    if plan.model_type is None:
        return
    adapter_dir = Path(plan.config.adapter_path)
    try:
        base, how = adapter_base_type(adapter_dir, pm.registries)
    except VistuneError as exc:
        plan.problem("adapter_path", exc.message, exc.hint)
        return
    if base is None:
        plan.notes.append(f"cannot tell which model type the adapter {adapter_dir} was trained on ({how}); "
                          f"it is loaded onto a {plan.model_type.name} model")  # fmt: skip
    elif not fits_model(base.value, plan.model_dir, plan.model_type.name, pm.registries):
        plan.problem("adapter_path",
                     f"{base.file}: the adapter was trained on a {base.value} model ({how}), but model is a "
                     f"{plan.model_type.name} model, which it does not fit",
                     hint=f"set model: to the {base.value} base model the adapter was trained on, or adapter_path: "
                     f"to an adapter trained on {plan.model_type.name}")  # fmt: skip


def _resolve_dataset(plan: Plan, pm: PluginManager, field: str, name: str | None, required: bool) -> DatasetLocation | None:
    if not name:
        if required:
            plan.problem(field, f"`vistune {plan.config.task}` needs a dataset",
                         hint=f"set {field}: to a dataset alias (`vistune list datasets`) or a JSON/JSONL file")  # fmt: skip
        return None
    try:
        location = locate_dataset(name, pm.registries.datasets, plan.config.dataset_path if field == "dataset" else None,
                                  pm.registries.formats, options=plan.config.options)  # fmt: skip
    except VistuneError as exc:  # a name two distributions registered
        plan.problem(field, exc.message, exc.hint)
        return None
    if location.found:
        formats = pm.registries.formats
        fmt = plan.config.dataset_format or location.format
        if fmt in (None, "records") or (fmt in formats and formats.get(fmt).read is None):  # a source: rows detected
            fmt = "records detected one by one"
        plan.lines.append((field, f"{name} -> {location.data_file}  ({location.how}; format: {fmt})"))
        if location.spec is not None and location.spec.options:
            plan.lines.append((location.spec.name, describe_options(location.options)))
    else:
        plan.problem(field, location.how, location.hint)
    return location


def _check_dataset_format(plan: Plan, pm: PluginManager) -> None:
    """``dataset_format`` names a registered record format."""
    name = plan.config.dataset_format
    if not name:
        return
    formats = pm.registries.formats
    if name not in formats:
        plan.problem("dataset_format", formats.unknown_message(name), hint="`vistune list formats` shows them all")
    elif formats.get(name).read is None:
        plan.problem("dataset_format", f"{name!r} opens datasets but reads no records",
                     hint="name a record format (`vistune list formats`), or leave dataset_format unset")  # fmt: skip


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """The names a module binds at its top level, as getattr finds them; None when a star import hides them."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


def _reward_file_reference(name: str) -> tuple[str | None, str | None]:
    """``(file, attribute)`` of a ``file.py:Name`` or ``file.py`` reward; ``(None, None)`` for a registered name."""
    if name.endswith(".py"):
        return name, None
    file_part, sep, attribute = name.rpartition(":")
    return (file_part, attribute) if sep and file_part.endswith(".py") else (None, None)


def _resolve_rewards(plan: Plan, pm: PluginManager, required: bool) -> None:
    config = plan.config
    if required and not config.rewards:
        plan.problem("rewards", "RL needs at least one reward", hint="e.g. rewards: [bleu] (`vistune list rewards`)")
    for entry in config.rewards:
        use = RewardUse(entry["name"], entry["weight"], entry["options"])
        file_part, attribute = _reward_file_reference(entry["name"])
        if file_part is not None:
            file = Path(file_part)
            if not file.is_file():
                plan.problem("rewards", f"reward file {file} does not exist")
                continue
            try:
                tree = ast.parse(file.read_text(), filename=str(file))
            except SyntaxError as exc:
                plan.problem("rewards", f"{file}:{exc.lineno}: syntax error: {exc.msg}")
                continue
            defined = _top_level_names(tree)
            # a name the file does not define may be an entry of its ms-swift orms dict, looked up on loading
            if defined is not None and attribute not in defined and "orms" not in defined:
                names = ", ".join(sorted(defined))
                if attribute is None:
                    plan.problem("rewards", f"{file} names no reward (top-level names: {names})", hint=f"write {file}:Name")
                else:
                    plan.problem("rewards", f"{file} defines no {attribute!r} (top-level names: {names})")
                continue
            use.file, use.attribute = file, attribute
            plan.lines.append(("rewards", f"{entry['name']} x {use.weight:g}  (local file)"))
        else:
            use.spec = _lookup(plan, pm.registries.rewards, "rewards", entry["name"], show_options=False)
            if use.spec is None:
                continue
            plan.lines[-1] = ("rewards", plan.lines[-1][1] + f" x {use.weight:g}")
            if use.spec.options:
                use.options = _reward_options(plan, use.spec, entry["options"])
                plan.lines.append((use.spec.name, describe_options(use.options)))
        plan.rewards.append(use)


def _reward_options(plan: Plan, spec: specs.Reward, given: dict[str, Any]) -> dict[str, Any]:
    """A declared reward's options: the entry's ``options`` over the reward's section over the defaults."""
    from vistune.errors import ConfigError
    from vistune.options import close_match, convert_option

    values = option_values(plan.config, spec.name, spec.options)
    declared = {option.name: option for option in spec.options}
    where = plan.loaded.where("rewards")
    for name, value in given.items():
        option = declared.get(name)
        if option is None:
            plan.problem("rewards", f"reward {spec.name} has no option {name!r}{close_match(str(name), declared)}; "
                         f"its options: {', '.join(declared)}")  # fmt: skip
            continue
        try:
            values[name] = convert_option(option, value, f"{spec.name} option {name}", where)
        except ConfigError as exc:  # the message starts with where, which the problem shows itself
            plan.problems.append(Problem("rewards", where, exc.message.removeprefix(f"{where}: ")))
    return values


def _resolve_launch(plan: Plan) -> None:
    config = plan.config
    gpus = visible_gpu_count()
    device = config.device if config.device != "auto" else ("cuda" if gpus else "cpu")
    plan.launch = launch = Launch(config.gpu_num, config.nnodes, config.parallel_method, device)
    if launch.distributed and launch.method == "none":
        launch.method = "ddp"
        plan.notes.append(f"{config.gpu_num * config.nnodes} processes with parallel_method none: using ddp")
    if not launch.distributed and launch.method != "none":
        plan.notes.append(f"parallel_method {launch.method} with gpu_num 1 runs a single process")
    # gpu_num > 1 asks for GPUs unless the config says device: cpu (several CPU processes, for testing)
    if config.device != "cpu" and config.gpu_num > gpus and (device == "cuda" or config.gpu_num > 1):
        plan.problem("gpu_num", f"{config.gpu_num} GPU(s) per node asked for, but this machine has {gpus} visible GPU(s)",
                     hint=f"set gpu_num: {max(gpus, 1)}" + ("" if gpus else f" to train on this machine's CPU, or device: "
                     f"cpu to start {config.gpu_num} CPU processes (gloo backend, for testing)"))  # fmt: skip
    if launch.method == "fsdp" and device == "cpu" and launch.distributed:
        # accelerate shards only across accelerators: CPU processes would silently train as DDP
        plan.problem("parallel_method", "parallel_method fsdp shards the model across GPUs, but this run starts CPU "
                     "processes, which would each hold the whole model (DDP)",
                     hint="set parallel_method: ddp for CPU processes, or run fsdp on GPUs")  # fmt: skip
    where = f"{config.nnodes} node(s) x {config.gpu_num} process(es)" if config.nnodes > 1 else f"{config.gpu_num} process(es)"
    plan.lines.append(("launch", f"{launch.method if launch.distributed else 'single process'} on {device}, {where}"))


def _check_report_to(plan: Plan) -> None:
    """Every metric sink known, and the package of each transformers integration installed."""
    names = plan.config.report_to
    for message, hint in reporting.problems(names):
        plan.problem("report_to", message, hint)
    integrations = reporting.trainer_integrations(names)
    if integrations != reporting.NONE:
        plan.lines.append(("report_to", f"{', '.join(names)}  ({', '.join(integrations)} through transformers' callbacks)"))


def _written_dir(config: RunConfig) -> tuple[str, Path] | None:
    """``(field, directory)`` the task creates and writes into; None for a task that writes nothing."""
    if config.task in ("sft", "rl"):
        return "output_dir", Path(config.output_dir)
    if config.task == "infer":
        if config.output_file:
            return "output_file", Path(config.output_file).parent
        return "output_dir", Path(config.output_dir)
    if config.task == "export":
        # the merged model is staged next to its final place, then renamed into it
        if config.export_dir:
            return "export_dir", Path(config.export_dir).parent
        return "output_dir", Path(config.output_dir)
    return None


def _check_output(plan: Plan) -> None:
    """A problem for an output directory that cannot be created or written, found before anything loads."""
    written = _written_dir(plan.config)
    if written is None:
        return
    field, directory = written
    reason = unwritable_reason(directory)
    if reason:
        plan.problem(field, reason, hint=f"set {field} to a directory this user can create and write")


def _note_unused(plan: Plan) -> None:
    task = plan.config.task
    # keys of another task that the chosen algorithm reads all the same (a pipeline's DataLoader workers)
    reads = set(plan.algorithm.reads) if plan.algorithm is not None else set()
    for name in plan.loaded.sources:
        if name != "task" and name not in reads and task not in FIELDS[name].metadata["tasks"]:
            plan.notes.append(f"{name} ({plan.loaded.where(name)}) is not used by `vistune {task}`")
    chosen = (plan.template, plan.adapter, plan.algorithm, plan.backend, plan.quantization)
    used = {spec.name for spec in chosen if spec is not None}
    used |= {use.spec.name for use in plan.rewards if use.spec is not None}
    used |= {location.spec.name for location in (plan.dataset, plan.eval_dataset)
             if location is not None and location.spec is not None}  # fmt: skip
    plan.warnings += unused_warnings(plan.loaded, used)


def make_plan(loaded: LoadedConfig, pm: PluginManager) -> Plan:
    """Resolve every name and path the config mentions; problems are collected, not raised."""
    plan = Plan(loaded)
    config = loaded.config
    task = config.task
    for error in pm.errors():
        plan.notes.append(f"plugin problem (other plugins still work): {error}")
    _resolve_model(plan, pm)
    if task in ("sft", "rl", "infer", "serve"):
        _resolve_template(plan, pm)
    plan.quantization = get_scheme(config.quantization)  # the config allows only known schemes
    if plan.quantization:
        plan.lines.append(("quantization", f"{config.quantization}: {plan.quantization.description}"))
        if plan.quantization.options:
            plan.lines.append((config.quantization, describe_options(spec_option_values(config, plan.quantization))))
        _check_requirements(plan, "quantization", f"quantization {config.quantization}",
                            plan.quantization.requires, plan.quantization.requires_cuda, "quantization: none")  # fmt: skip
    if task in ("sft", "rl"):
        plan.adapter = _lookup(plan, pm.registries.adapters, "adapter", config.adapter)
        if plan.adapter:
            _check_requirements(plan, "adapter", f"adapter {config.adapter}", plan.adapter.requires,
                                plan.adapter.requires_cuda, "adapter: lora")  # fmt: skip
            _check_adapter(plan, plan.adapter)
        if config.packing and plan.model_type and not plan.model_type.supports_packing:
            plan.problem("packing", f"model type {plan.model_type.name} cannot isolate packed samples from each other",
                         hint="set packing: false for this model type")  # fmt: skip
        _resolve_launch(plan)
        _check_report_to(plan)
    if task in ("sft", "rl", "infer"):
        plan.dataset = _resolve_dataset(plan, pm, "dataset", config.dataset, required=True)
        plan.eval_dataset = _resolve_dataset(plan, pm, "eval_dataset", config.eval_dataset, required=False)
        _check_dataset_format(plan, pm)
    if task == "rl":
        plan.algorithm = _lookup(plan, pm.registries.algorithms, "algorithm", config.algorithm)
        if config.parallel_method == "fsdp":
            plan.problem("parallel_method", "vistune rl cannot shard the policy with fsdp: rollouts sample from the "
                         "whole weights in each process", hint="set parallel_method: ddp")  # fmt: skip
        if config.temperature is not None and config.temperature <= 0:
            # log-probabilities are divided by it, and greedy completions would leave no group any spread
            plan.problem("temperature", f"vistune rl samples, so temperature must be above 0, got {config.temperature}",
                         hint="leave temperature out (1.0) or set it above 0")  # fmt: skip
    # an algorithm with its own pipeline (preference optimisation) learns from stored data: no rewards, no sampling
    offline = plan.algorithm is not None and plan.algorithm.pipeline is not None
    if task in ("rl", "infer"):
        _resolve_rewards(plan, pm, required=task == "rl" and not offline)
    if task in ("rl", "infer", "serve") and not offline:
        plan.backend = _lookup(plan, pm.registries.backends, "backend", config.backend)
        if plan.backend:
            _check_requirements(plan, "backend", f"backend {config.backend}", plan.backend.requires,
                                plan.backend.requires_cuda, "backend: transformers")  # fmt: skip
    if task == "export" and not config.adapter_path and plan.model_dir and not (plan.model_dir / "adapter_config.json").exists():
        plan.problem("adapter_path", "export merges an adapter into its base model, and none was given",
                     hint="set adapter_path: to the adapter directory that `vistune sft` wrote")  # fmt: skip
    if config.adapter_path and not Path(config.adapter_path).is_dir():
        plan.problem("adapter_path", f"{config.adapter_path} is not a directory")
    elif config.adapter_path:
        _check_adapter_base(plan, pm)
    plan.lines.append(("output_dir", config.output_dir))
    _check_output(plan)
    _note_unused(plan)
    return plan
