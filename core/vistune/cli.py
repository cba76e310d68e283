"""The ``vistune`` command.

Only argparse and vistune's light modules are imported at start-up: torch and the
model libraries are imported by the pipeline that needs them, so ``--help``,
``--version``, ``plugins``, ``list`` and ``--dry-run`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from vistune import HOOK_API_VERSION, __version__
from vistune.errors import VistuneError
from vistune.registry import KINDS

#: Exit status of a run refused for something the user can fix: a bad config, a plan that is not ready.
EXIT_USER_ERROR = 2

#: `vistune list models` shows the checkpoint aliases too, so they have no kind of their own here.
LIST_KINDS = tuple(kind for kind in KINDS if kind != "checkpoints")

TASK_HELP = {
    "sft": "supervised fine-tuning",
    "rl": "reinforcement learning (GRPO, DAPO, ...)",
    "infer": "generate answers for a dataset",
    "serve": "OpenAI-compatible HTTP server",
    "export": "merge an adapter into a standalone model",
}


def _config_keys_help(task: str) -> str:
    from vistune.config import FIELDS, KEY_ALIASES, default_value
    from vistune.options import options_help
    from vistune.plugins import get_plugin_manager

    lines = ["config keys (YAML, or --key value on the command line):"]
    for name, field in FIELDS.items():
        meta = field.metadata
        choices = f" [{'|'.join(map(str, meta['choices']))}]" if meta["choices"] else ""
        default = default_value(name)
        lines.append(f"  {name}{choices}: {meta['help']} (default {default if default is not None else '-'})")
    aliases = ", ".join(f"{alias} (= {name})" for alias, name in KEY_ALIASES.items())
    lines.append(f"  also accepted under the names other tools use: {aliases}")
    try:
        plugin_lines = options_help(get_plugin_manager().registries, task)
    except VistuneError as exc:  # a broken plugin in strict mode: the core keys are still worth showing
        plugin_lines = f"plugin options: not listed ({exc.message})"
    return "\n".join(lines) + ("\n\n" + plugin_lines if plugin_lines else "")


class _TaskParser(argparse.ArgumentParser):
    """A task's parser, whose epilog (every config key, and the plugins' options) is built only for --help.

    The plugins' options need the plugins loaded, which every other use of the parser can skip.
    """

    task: str | None = None

    def format_help(self) -> str:
        if self.task and self.epilog is None:
            self.epilog = _config_keys_help(self.task)
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistune",
        description="Fine-tune, RL-align and serve vision-language models from one YAML file.",
        epilog="`vistune demo` trains a tiny Llava on generated shapes, end to end, on CPU.",
    )
    parser.add_argument("--version", action="version", version=f"vistune {__version__} (hook API {HOOK_API_VERSION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_TaskParser)

    p = sub.add_parser("plugins", help="list loaded plugins and what they registered")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("list", help="list registered models, templates, adapters, algorithms, rewards, backends or datasets")
    p.add_argument("kind", choices=LIST_KINDS)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for task, help_text in TASK_HELP.items():
        p = sub.add_parser(
            task,
            help=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"vistune {task}: {help_text}. Any config key can be given as --key value, "
            "a plugin's option as --plugin.option value.",
        )
        p.task = task
        p.add_argument("--config", "-c", help="YAML config file")
        p.add_argument("--dry-run", action="store_true", help="validate and resolve everything, print the plan, load nothing")

    p = sub.add_parser("demo", help="build a tiny Llava and a shapes dataset, fine-tune it and caption held-out images")
    p.add_argument("--output-dir", default="vistune-demo", help="where the demo writes its data, model and logs")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    return parser


def cmd_plugins(args) -> int:
    from vistune.plugins import get_plugin_manager

    pm = get_plugin_manager()
    infos = sorted(pm.infos.values(), key=lambda i: i.name)
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
        return 0
    for info in infos:
        status = "  BROKEN" if not info.loaded else "  (with errors)" if info.errors else ""
        print(f"{info.name}  ({info.distribution} {info.version}){status}")
        if info.hooks:
            print(f"  hooks: {', '.join(info.hooks)}")
        for kind, names in info.registered.items():
            print(f"  {kind}: {', '.join(names)}")
        for error in info.errors:
            print(textwrap.indent(error, "  error: "))
    return 0


def _describe(kind: str, spec) -> dict:
    data = {"name": spec.name, "description": spec.description}
    if kind == "models":
        data |= {"default_template": spec.default_template, "architectures": list(spec.architectures),
                 "vision": spec.is_vision, "packing": spec.supports_packing}  # fmt: skip
    elif kind == "checkpoints":
        data |= {"model_type": spec.model_type, "hf_repo_id": spec.hf_repo_id, "env_var": spec.env_var}
    elif kind == "formats":
        data |= {"reads": "datasets" if spec.is_source else "records", "fields": list(spec.fields)}
    elif kind == "datasets":
        data |= {"format": spec.format, "hf_repo_id": spec.hf_repo_id, "env_var": spec.env_var,
                 "generated": spec.builder is not None}  # fmt: skip
    if getattr(spec, "options", ()):  # what its section in a config may set
        data["options"] = [{"name": o.name, "type": o.type, "default": o.default, "help": o.help, "alias": o.alias}
                           for o in spec.options]  # fmt: skip
    return data


def cmd_list(args) -> int:
    from vistune.plugins import get_plugin_manager

    pm = get_plugin_manager()
    for error in pm.errors():  # the listing still works; say which plugin is missing from it and why
        print(f"warning: {error}", file=sys.stderr)
    kinds = ["models", "checkpoints"] if args.kind == "models" else [args.kind]
    rows = []
    for kind in kinds:
        registry = pm.registries.by_kind[kind]
        for spec in registry:
            owner = registry.owner(spec.name)
            row = {"kind": kind, **_describe(kind, spec), "plugin": owner.plugin, "distribution": owner.distribution}
            claimants = registry.claimants(spec.name)
            if claimants:  # registered twice: naming it is an error until one of them goes
                row["ambiguous"] = [str(claimant) for claimant in claimants]
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for kind in kinds:
        print(f"{kind}:")
        for row in (r for r in rows if r["kind"] == kind):
            extra = f" -> {row['hf_repo_id']}" if kind == "checkpoints" else ""
            if "ambiguous" in row:
                print(f"  {row['name']}  AMBIGUOUS, not usable: registered by {' and '.join(row['ambiguous'])}")
                continue
            print(f"  {row['name']}{extra}  [{row['distribution']}]  {row['description']}")
    return 0


def cmd_task(args, overrides: list[str]) -> int:
    from vistune.config import load_config
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    loaded = load_config(args.config, overrides, task=args.command)
    plan = make_plan(loaded, get_plugin_manager())
    if args.dry_run:
        # the plan goes to stdout either way; the status tells a script whether the run could start
        print(plan.render())
        return 0 if plan.ready else EXIT_USER_ERROR
    plan.raise_if_not_ready()
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.model_download:
        plan = download_and_replan(plan, get_plugin_manager())
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    from vistune.pipelines import run_pipeline

    run_pipeline(plan)
    return 0


def download_and_replan(plan, pm):
    """Download the plan's checkpoint from the Hub, then plan again from the local copy.

    Runs before the pipeline, so a distributed run's workers (and every later command)
    find the checkpoint in the cache; the new plan decides the model type and template
    from its config.json as for any local checkpoint.
    """
    from vistune.model_hub import download_model
    from vistune.plan import make_plan

    directory = download_model(plan.model_download)
    plan = make_plan(plan.loaded, pm)
    if plan.model_download:  # the cache huggingface_hub wrote to is not the one vistune reads
        raise VistuneError(f"{plan.config.model} was downloaded to {directory}, but the plan does not find it there",
                           hint=f"set model_path: {directory}")  # fmt: skip
    plan.raise_if_not_ready()
    return plan


def cmd_demo(args) -> int:
    from vistune.demo import run_demo

    run_demo(args.output_dir, max_steps=args.max_steps)
    return 0


def _close_progress_bars() -> None:
    """End the progress bars a failed command left open, so that its error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command not in TASK_HELP:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "plugins":
            return cmd_plugins(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "demo":
            return cmd_demo(args)
        return cmd_task(args, extra)
    except VistuneError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vistune plugins | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
