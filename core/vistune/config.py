"""The run configuration: one flat YAML mapping, overridable from the command line.

Flat on purpose: the reference configs in this field (``model: ...``, ``adapter: lora``,
``gpu_num: 4``) are flat, and a flat namespace gives one obvious spelling per option
and a useful "did you mean" for typos.  Every field is checked here, before any model
or dataset is touched; errors name the file, line and field.
"""

from __future__ import annotations

import copy
import difflib
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import ConfigError
from vistune.options import Catalog, PluginValues, collect, default_catalog, merge_algorithm_options
from vistune.quantization import SCHEMES

TASKS = ("sft", "rl", "infer", "serve", "export")

#: Largest config file read: a run config is a few kilobytes.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Most YAML nodes a config may hold once its aliases are expanded (``*x`` repeats what ``&x`` names):
#: a few hundred bytes of nested aliases otherwise stand for billions of values.
MAX_CONFIG_NODES = 100_000
#: Longest rendering of a config value in an error message.
MAX_SHOWN_CHARS = 200

#: Names accepted for a key and the field they set (for flags of other tools).
KEY_ALIASES = {
    "model_id_or_path": "model",
    "quant_method": "quantization",
    "lr": "learning_rate",
    "batch_size": "per_device_batch_size",
    "epochs": "num_train_epochs",
}


def option(default: Any, help: str, *, type: str, choices: tuple | None = None, tasks: tuple[str, ...] = TASKS):
    """Declare a config field: its value type, allowed values, help text and the tasks that read it."""
    # lists and dicts get a factory: a shared mutable default would leak between configs
    mutable = isinstance(default, (list, dict))
    kwargs: dict[str, Any] = {"factory": lambda: copy.deepcopy(default)} if mutable else {"default": default}
    return attrs.field(**kwargs, metadata={"help": help, "type": type, "choices": choices, "tasks": tasks})


_TRAIN = ("sft", "rl")
_GEN = ("rl", "infer", "serve")


@attrs.define
class RunConfig:
    """Every option of every task.  ``vistune sft --help`` and README.md list them."""

    # -- what to run on ----------------------------------------------------------
    task: str | None = option(None, "sft, rl, infer, serve or export; set by the command", type="str", choices=TASKS)
    model: str | None = option(
        None, "checkpoint alias (llava-v1.5-7b), local Hugging Face directory, or an earlier vistune output", type="str"
    )
    model_type: str | None = option(None, "force a registered model type instead of detecting it", type="str")
    model_path: str | None = option(None, "local directory of the checkpoint that `model` names", type="path")
    template: str | None = option(None, "chat template; defaults to the model type's", type="str")
    dtype: str = option("auto", "weights dtype", type="str", choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str | None = option(
        None,
        "attention kernel (sdpa, eager, flash_attention_2, flex_attention); default picks the fastest available",
        type="str",
    )
    device: str = option("auto", "auto, cpu or cuda", type="str", choices=("auto", "cpu", "cuda"))
    quantization: str = option(
        "none",
        "load the base model quantized: nf4, fp4, int8, q4_k_m (= nf4 for training), q8_0 (= int8), "
        "or awq/gptq/fp8 for checkpoints that are already quantized",
        type="str",
        choices=("none", *SCHEMES),
    )
    trust_remote_code: bool = option(False, "allow custom code in the checkpoint directory", type="bool")
    output_dir: str = option("vistune-output", "where checkpoints, logs and results go", type="path")
    seed: int = option(42, "random seed", type="int")

    # -- data ----------------------------------------------------------------------
    dataset: str | None = option(
        None, "dataset alias (llava-instruct-en), a local JSON/JSONL file or directory, or a Hugging Face dataset id "
        "(org/name or org/name:split)", type="str",
    )
    dataset_path: str | None = option(None, "local directory of the dataset that `dataset` names", type="path")
    dataset_format: str | None = option(
        None, "the record format of dataset and eval_dataset (messages, sharegpt, ms-swift, alpaca, prompt-completion, "
        "llava-instruct or a plugin's); default: detected record by record", type="str",
    )
    eval_dataset: str | None = option(None, "held-out dataset (alias or path) for evaluation", type="str")
    max_samples: int | None = option(None, "use at most this many records", type="int")
    on_bad_record: str = option(
        "error", "a broken record or missing image: stop (error) or skip and count (skip)", type="str", choices=("error", "skip")
    )
    allow_remote_images: bool = option(False, "allow http(s) image URLs in data and requests", type="bool")
    allowed_image_dirs: list[str] = option(
        [], "directories besides the dataset's folder and image directory that its images may come from",
        type="str_list", tasks=("sft", "rl", "infer"),
    )
    max_length: int = option(2048, "longest tokenised sample", type="int")
    truncation: str = option(
        "error", "a sample longer than max_length: stop (error) or drop and count (drop)", type="str", choices=("error", "drop")
    )
    cache_encoded: bool = option(
        False, "keep encoded samples in memory after their first epoch (small datasets trained for many epochs)",
        type="bool", tasks=("sft",),
    )
    dataloader_num_workers: str = option(
        "auto",
        "processes that prepare batches beside the training loop: a number (0: the training process does it), or "
        "auto (on GPU: the CPUs each GPU process may use, less one, at most 8; on CPU: 0)",
        type="str", tasks=("sft",),
    )

    # -- adapter -------------------------------------------------------------------
    adapter: str = option("lora", "lora, qlora, dora, galore, full, or a plugin's adapter", type="str", tasks=_TRAIN)
    adapter_path: str | None = option(None, "trained adapter directory to load (infer, serve, export, rl)", type="path")
    freeze_vision_tower: bool = option(
        True,
        "keep the vision tower frozen; false trains it in full (under LoRA too, saved with the adapter)",
        type="bool",
        tasks=_TRAIN,
    )
    freeze_projector: bool | None = option(
        None,
        "keep the projector frozen; default: frozen under lora/dora/qlora (only adapter weights train), trained "
        "under full and galore; false under LoRA trains it in full too (peft modules_to_save, saved with the adapter)",
        type="bool",
        tasks=_TRAIN,
    )
    freeze_language_model: bool = option(
        False, "keep the language model frozen (full and galore adapters; under LoRA it holds the adapter)", type="bool", tasks=_TRAIN
    )
    vision_tower_lr: float | None = option(None, "learning rate of the vision tower (default learning_rate)", type="float", tasks=_TRAIN)
    projector_lr: float | None = option(None, "learning rate of the projector (default learning_rate)", type="float", tasks=_TRAIN)

    # -- training ------------------------------------------------------------------
    learning_rate: float = option(1e-4, "peak learning rate", type="float", tasks=_TRAIN)
    num_train_epochs: float = option(1.0, "epochs over the dataset", type="float", tasks=_TRAIN)
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: use epochs)", type="int", tasks=_TRAIN)
    per_device_batch_size: int = option(1, "samples (or packed rows) per device and step", type="int", tasks=_TRAIN + ("infer",))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", type="int", tasks=_TRAIN)
    warmup_ratio: float = option(0.0, "fraction of steps spent warming up", type="float", tasks=_TRAIN)
    weight_decay: float = option(0.0, "AdamW weight decay", type="float", tasks=_TRAIN)
    lr_scheduler_type: str = option("cosine", "transformers scheduler name", type="str", tasks=_TRAIN)
    max_grad_norm: float = option(1.0, "gradient clipping norm", type="float", tasks=_TRAIN)
    packing: bool = option(False, "pack several samples per row, each attending only to itself", type="bool", tasks=("sft",))
    max_packed_length: int = option(4096, "tokens per packed row", type="int", tasks=("sft",))
    gradient_checkpointing: bool = option(False, "recompute activations to save memory", type="bool", tasks=_TRAIN)
    bf16: bool | None = option(None, "bfloat16 mixed precision (default: on when a GPU supports it)", type="bool", tasks=_TRAIN)
    liger: bool | str = option(
        "auto",
        "Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE): true, false, or auto (sft on a CUDA GPU "
        "with the liger-kernel package installed and a model type Liger supports; not for compiled blocks or "
        "prequantized checkpoints)",
        type="bool_auto", tasks=_TRAIN,
    )
    torch_compile: bool | str = option(
        "auto",
        "torch.compile each transformer block: true, false, or auto (on a GPU, for runs of at least 1000 optimizer "
        "steps, which repay the compile of a minute or so; not for quantized or FSDP runs)",
        type="bool_auto", tasks=_TRAIN,
    )
    logging_steps: int = option(1, "log every N steps", type="int", tasks=_TRAIN)
    save_steps: int = option(500, "checkpoint every N steps", type="int", tasks=_TRAIN)
    save_total_limit: int | None = option(2, "keep at most N checkpoints", type="int", tasks=_TRAIN)
    resume: str = option(
        "none",
        "auto (continue from the newest complete checkpoint in output_dir), none, or a checkpoint directory",
        type="str",
        tasks=_TRAIN,
    )
    overwrite_output_dir: bool = option(False, "allow starting over in an output_dir that has checkpoints", type="bool", tasks=_TRAIN)
    parallel_method: str = option("none", "none, ddp or fsdp", type="str", choices=("none", "ddp", "fsdp"), tasks=_TRAIN)
    gpu_num: int = option(1, "processes (GPUs) per node; >1 starts them with torchrun", type="int", tasks=_TRAIN)
    nnodes: int = option(1, "nodes taking part (multi-node: same config on every node)", type="int", tasks=_TRAIN)
    node_rank: int = option(0, "this node's rank among nnodes", type="int", tasks=_TRAIN)
    master_addr: str = option("127.0.0.1", "rendezvous host for multi-node runs", type="str", tasks=_TRAIN)
    master_port: int = option(29500, "rendezvous port", type="int", tasks=_TRAIN)
    report_to: list[str] = option(
        ["jsonl", "tensorboard"],
        "metric sinks: jsonl and tensorboard (written into output_dir), none, or transformers' integrations "
        "(wandb, mlflow, comet_ml, clearml, trackio, neptune, dvclive, swanlab, ...)",
        type="str_list", tasks=_TRAIN,
    )

    # -- reinforcement learning ----------------------------------------------------
    algorithm: str = option("grpo", "grpo, dapo, gspo, rloo or a plugin's algorithm", type="str", tasks=("rl",))
    algorithm_options: dict = option(
        {}, "options of the chosen algorithm (the same as its own section, e.g. grpo: {...})", type="dict", tasks=("rl",)
    )
    rewards: list = option(
        [], "reward names, file.py:Name references, or {name, weight, options} mappings", type="rewards", tasks=("rl", "infer")
    )
    reward_error_policy: str = option(
        "raise", "a reward that raises: stop (raise), or score the sample None (skip)", type="str", choices=("raise", "skip"), tasks=("rl",)
    )
    num_generations: int = option(4, "completions per prompt (group size)", type="int", tasks=("rl",))
    max_completion_length: int = option(64, "longest completion in RL rollouts", type="int", tasks=("rl",))
    beta: float = option(0.0, "KL coefficient against the reference model (0: no reference model)", type="float", tasks=("rl",))
    epsilon: float = option(0.2, "lower (and default upper) clipping range", type="float", tasks=("rl",))
    epsilon_high: float | None = option(None, "upper clipping range (clip-higher); default epsilon", type="float", tasks=("rl",))

    # -- generation, inference and serving -----------------------------------------
    backend: str = option("transformers", "inference engine: transformers, vllm, sglang, or a plugin's", type="str", tasks=_GEN)
    max_new_tokens: int = option(128, "longest generated answer", type="int", tasks=("infer", "serve"))
    temperature: float | None = option(None, "sampling temperature (default: 1.0 for rl, greedy for infer)", type="float", tasks=_GEN)
    top_p: float = option(1.0, "nucleus sampling", type="float", tasks=_GEN)
    output_file: str | None = option(None, "JSONL of outputs (default output_dir/predictions.jsonl)", type="path", tasks=("infer",))
    metrics: list[str] = option([], "score outputs against references: bleu, exact_match", type="str_list", tasks=("infer",))
    host: str = option("127.0.0.1", "address to listen on", type="str", tasks=("serve",))
    port: int = option(8000, "port to listen on", type="int", tasks=("serve",))
    api_key: str | None = option(None, "require this bearer token (default: env VISTUNE_API_KEY if set)", type="str", tasks=("serve",))
    served_model_name: str | None = option(None, "model id shown in /v1/models (default: the model's name)", type="str", tasks=("serve",))
    max_batch_size: int | str = option(
        "auto",
        "requests batched together by the engine: a number, or auto (transformers: as many as the GPU memory left "
        "after loading fits, 1 to 256; on CPU: 8; vllm and sglang: their own default)",
        type="int_auto", tasks=("serve", "infer"),
    )
    max_queue: int = option(64, "waiting requests before new ones get 429", type="int", tasks=("serve",))
    cuda_graphs: bool = option(
        True, "transformers backend on a GPU: replay each decode step as a CUDA graph (false: launch it eagerly)",
        type="bool", tasks=("serve", "infer"),
    )
    prefill_chunk_tokens: int = option(
        8192, "transformers backend: prompt tokens prefilled in one model call while other requests decode; a longer "
        "prompt is prefilled in chunks, the running requests decoding a token between chunks", type="int", tasks=_GEN,
    )
    allowed_local_media_path: str | None = option(
        None, "directory from which file:// images may be read (default: none)", type="path", tasks=("serve", "infer")
    )
    max_image_pixels: int = option(4096 * 4096, "largest accepted image, in pixels", type="int", tasks=("serve", "infer"))
    tensor_parallel_size: int = option(1, "GPUs per model replica (vllm, sglang)", type="int", tasks=("serve", "infer"))
    gpu_memory_utilization: float = option(
        0.9, "fraction of GPU memory the engine may take (vllm, sglang; transformers: what max_batch_size auto fills)",
        type="float", tasks=_GEN,
    )

    # -- export --------------------------------------------------------------------
    export_dir: str | None = option(None, "where the merged model goes (default output_dir/merged)", type="path", tasks=("export",))

    # -- plugins' own options --------------------------------------------------------
    #: ``{plugin: {option: value}}`` as the config set them (checked against the plugins' declared
    #: options); plugins read theirs with :func:`vistune.options.option_values`.  Not a config key:
    #: users write a section named after the plugin.
    options: dict = attrs.field(factory=dict, metadata={"internal": True})


#: The config keys (``options`` holds plugins' sections, which are not keys of their own).
FIELDS: dict[str, attrs.Attribute] = {a.name: a for a in attrs.fields(RunConfig) if "help" in a.metadata}


@attrs.frozen
class Source:
    """Where a config value came from, for error messages."""

    file: str | None = None
    line: int | None = None
    flag: str | None = None

    def __str__(self) -> str:
        if self.flag:
            return f"command line {self.flag}"
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        return self.file or "defaults"


@attrs.define
class LoadedConfig:
    """A validated config and where each of its values came from."""

    config: RunConfig
    sources: dict[str, Source]
    path: str | None = None
    #: the plugin options the config set, and where (:class:`vistune.options.PluginValues`)
    plugin_values: PluginValues = attrs.field(factory=PluginValues)

    def where(self, field: str) -> str:
        return str(self.sources.get(field, Source()))


# -- reading -------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The config file's text, refused when it is larger than :data:`MAX_CONFIG_BYTES`."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; a run config "
                          "is a flat mapping of a few kilobytes")  # fmt: skip
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None


def _expanded_size(node: Any, sizes: dict[int, int] | None = None, open_nodes: set[int] | None = None) -> int:
    """How many nodes a composed YAML node stands for once every alias is expanded.

    Aliases share nodes, so each distinct node is counted once and its size reused
    (memoized by identity): the count costs as much as the file is long, however large
    the expansion.  A node that contains itself expands without end and counts as
    larger than any limit.
    """
    sizes = {} if sizes is None else sizes
    open_nodes = set() if open_nodes is None else open_nodes
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_CONFIG_NODES + 1
    open_nodes.add(key)
    children: list[Any] = []
    if isinstance(node.value, list):
        for item in node.value:
            children += list(item) if isinstance(item, tuple) else [item]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_CONFIG_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _check_expansion(node: Any, path: Path) -> None:
    """Refuse a document whose aliases expand it beyond :data:`MAX_CONFIG_NODES` (a "billion laughs")."""
    sizes: dict[int, int] = {}
    pairs = node.value if isinstance(node.value, list) else []
    for pair in pairs:
        if isinstance(pair, tuple) and _expanded_size(pair[1], sizes) > MAX_CONFIG_NODES:
            key_node = pair[0]
            key = key_node.value if isinstance(key_node.value, str) else "a key"
            raise ConfigError(
                f"{path}:{key_node.start_mark.line + 1}: {key[:100]}: the value expands to more than "
                f"{MAX_CONFIG_NODES} YAML nodes through its aliases (*name repeats what &name anchors)",
                hint="write the value out instead of nesting aliases",
            )
    if _expanded_size(node, sizes) > MAX_CONFIG_NODES:
        raise ConfigError(f"{path}: the YAML expands to more than {MAX_CONFIG_NODES} nodes through its aliases "
                          "(*name repeats what &name anchors)")  # fmt: skip


def _parse(text: str, path: Path) -> tuple[Any, Any]:
    """``(node, data)``: the composed document (for key lines) and its values, built from one parse."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, path)
        return node, loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply for a run config") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, Source]]:
    """Read a YAML mapping, remembering the line of every top-level key.

    Size is bounded twice before any value is looked at: the file's bytes, and the
    nodes its aliases expand to.
    """
    path = Path(path)
    node, data = _parse(_read_text(path), path)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, not a {type(data).__name__}")
    sources = {}
    for key_node, _ in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in sources:  # YAML would silently keep the last one
            raise ConfigError(f"{path}:{line}: key {_shown(key)} is set twice (first at line {sources[key].line})")
        sources[key] = Source(file=str(path), line=line)
    for key_node, value_node in node.value:  # a plugin's section: the line of each of its keys too
        if isinstance(value_node.value, list) and value_node.tag.endswith(":map"):
            for inner_key, _ in value_node.value:
                if isinstance(inner_key.value, str):
                    label = f"{key_node.value}.{inner_key.value}"
                    sources.setdefault(label, Source(file=str(path), line=inner_key.start_mark.line + 1))
    return data, sources


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], dict[str, Source]]:
    """``["--lr", "1e-4", "--lora_target_modules=[q_proj,k_proj]"]`` -> values parsed as YAML scalars."""
    import yaml

    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected command-line argument {arg!r}; options look like --key value")
        key, eq, raw = arg[2:].partition("=")
        # --max-steps is max_steps; in --lora-plus.lr-ratio only the option's part is a key (plugin names keep '-')
        section, dot, name = key.rpartition(".")
        key = section + dot + name.replace("-", "_")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            else:
                raw = "true"  # a bare flag: --packing
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        values[key] = value
        sources[key] = Source(flag=f"--{key}")
        i += 1
    return values, sources


# -- validation ------------------------------------------------------------------------


_TYPE_NAMES = {"str": "a string", "path": "a path", "int": "an integer", "float": "a number", "bool": "true or false",
               "str_list": "a list of strings", "dict": "a mapping", "rewards": "a list of rewards",
               "bool_auto": "true, false or auto", "int_auto": "an integer or auto"}  # fmt: skip
#: Strings a bool key accepts, as YAML 1.1 and command lines spell them.
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bounded_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict = 3, 8, 8, 8
    shown.maxstring, shown.maxother = 120, 120
    return shown


_REPR = _bounded_repr()


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message, at most :data:`MAX_SHOWN_CHARS` long.

    Config values come from users and can be huge, or nest shared lists (YAML aliases)
    whose full repr would take gigabytes; the message needs only their start.
    """
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def default_value(name: str) -> Any:
    """The default of a config field (a fresh copy for list and dict fields)."""
    default = FIELDS[name].default
    return default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def _convert(name: str, value: Any, where: str) -> Any:
    field = FIELDS[name]
    meta = field.metadata
    nullable = field.default is None or "None" in str(field.type)
    return convert_value(name, meta["type"], value, where, nullable=nullable, choices=meta["choices"])


def convert_value(name: str, kind: str, value: Any, where: str, *, nullable: bool, choices: tuple | None) -> Any:
    """Check and convert a value of type ``kind`` (``int``, ``str_list``...); errors name ``where`` and ``name``.

    Core keys and plugin options (:class:`vistune.specs.Option`) are read alike.
    """

    def bad(note: str = "") -> ConfigError:
        got = f"{_shown(value)} ({type(value).__name__})"
        return ConfigError(f"{where}: {name} must be {_TYPE_NAMES[kind]}{note}, got {got}")

    if value is None:
        if nullable:
            return None
        raise bad(" (null is not allowed here)")
    if kind in ("str", "path"):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad()
        value = str(value)
    elif kind in ("int", "int_auto"):
        if kind == "int_auto" and isinstance(value, str) and value.lower() == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind == "float":
        if isinstance(value, bool):
            raise bad()
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad() from None
    elif kind in ("bool", "bool_auto"):
        if kind == "bool_auto" and isinstance(value, str) and value.lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            value = value.lower() in _TRUE
        if not isinstance(value, bool):
            raise bad()
    elif kind == "str_list":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad()
    elif kind == "rewards":
        value = _convert_rewards(value, where)
    if choices and value not in choices:
        text = str(value) if isinstance(value, (str, int, float)) else ""
        close = difflib.get_close_matches(text, [str(c) for c in choices], n=1) if len(text) < 100 else []
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{where}: {name} must be one of {allowed}; got {_shown(value)}{suggestion}")
    return value


def _convert_rewards(value: Any, where: str) -> list[dict[str, Any]]:
    """Rewards normalise to ``[{"name": str, "weight": float, "options": dict}]``."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: rewards must be a list of reward names or mappings, got {_shown(value)}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: rewards[{i}] must be a name or a mapping with a 'name' key, got {_shown(item)}")
        unknown = set(item) - {"name", "weight", "options"}
        if unknown:
            raise ConfigError(f"{where}: rewards[{i}] has unknown keys {_shown(sorted(map(str, unknown)))}; "
                              "allowed: name, weight, options")  # fmt: skip
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{where}: rewards[{i}].weight must be a number, got {_shown(weight)}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: rewards[{i}].options must be a mapping, got {_shown(options)}")
        out.append({"name": item["name"], "weight": float(weight), "options": options})
    return out


def _check_ranges(loaded: LoadedConfig) -> None:
    config = loaded.config
    positive = (
        "per_device_batch_size", "gradient_accumulation_steps", "max_length", "max_packed_length",
        "num_generations", "max_completion_length", "max_new_tokens", "gpu_num", "nnodes", "logging_steps",
        "save_steps", "max_batch_size", "max_queue", "tensor_parallel_size", "prefill_chunk_tokens",
    )  # fmt: skip
    for name in positive:
        if getattr(config, name) != "auto" and getattr(config, name) < 1:
            raise ConfigError(f"{loaded.where(name)}: {name} must be at least 1, got {getattr(config, name)}")
    for name in ("learning_rate", "warmup_ratio", "weight_decay", "beta", "epsilon"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{loaded.where(name)}: {name} must not be negative, got {getattr(config, name)}")
    if config.warmup_ratio >= 1:  # passed on as warmup_steps, which transformers reads as a step count from 1 up
        raise ConfigError(f"{loaded.where('warmup_ratio')}: warmup_ratio must be below 1 (a fraction of the training "
                          f"steps), got {config.warmup_ratio}")  # fmt: skip
    workers = config.dataloader_num_workers
    if workers != "auto" and not workers.isdecimal():
        raise ConfigError(f"{loaded.where('dataloader_num_workers')}: dataloader_num_workers must be auto or a "
                          f"number of processes (0 or more), got {workers!r}")  # fmt: skip
    if not 0 <= config.node_rank < config.nnodes:
        raise ConfigError(f"{loaded.where('node_rank')}: node_rank must be in [0, nnodes), got {config.node_rank}")
    if config.epsilon_high is not None and config.epsilon_high < config.epsilon:
        raise ConfigError(f"{loaded.where('epsilon_high')}: epsilon_high must be >= epsilon ({config.epsilon})")
    if not 1 <= config.port <= 65535:
        raise ConfigError(f"{loaded.where('port')}: port must be in 1..65535, got {config.port}")
    if config.num_generations < 2 and config.task == "rl":
        raise ConfigError(f"{loaded.where('num_generations')}: group-relative RL needs num_generations >= 2")


def unknown_key_error(key: str, where: str, plugin_keys: list[str] = ()) -> ConfigError:
    text = str(key)
    known = list(FIELDS) + list(KEY_ALIASES) + list(plugin_keys)
    close = difflib.get_close_matches(text, known, n=1, cutoff=0.6) if len(text) < 100 else []
    hint = f"did you mean {close[0]}?" if close else "`vistune sft --help` lists every key"
    return ConfigError(f"{where}: unknown key {_shown(key)} ({hint})")


def _is_core_key(key: str) -> bool:
    return KEY_ALIASES.get(key, key) in FIELDS


def build_config(
    values: Mapping[str, Any], sources: Mapping[str, Source] | None = None, path: str | None = None,
    catalog: Catalog | None = None,
) -> LoadedConfig:
    """Validate raw values (from YAML and flags) into a :class:`LoadedConfig`.

    Keys that are not core keys are plugin options (:mod:`vistune.options`): sections named
    after a plugin, ``section.option`` keys and flat aliases, checked against what the
    plugins in ``catalog`` (default: the installed ones) declare.
    """
    sources = dict(sources or {})
    converted: dict[str, Any] = {}
    field_sources: dict[str, Source] = {}
    problems: list[ConfigError] = []  # every bad key at once, not one per attempt
    if any(not _is_core_key(str(key)) for key in values) or values.get("algorithm_options"):
        catalog = catalog if catalog is not None else default_catalog()
    catalog = catalog if catalog is not None else Catalog()
    plugin_values, consumed = collect(values, sources, Source(file=path), catalog, _is_core_key, problems)
    for key, value in values.items():
        if key in consumed:
            continue
        source = sources.get(key, Source(file=path))
        name = KEY_ALIASES.get(key, key)
        try:
            if name not in FIELDS:
                raise unknown_key_error(key, str(source), catalog.known_keys())
            if name in field_sources:  # under an alias and its own name: neither may silently win
                raise ConfigError(f"{source}: {key} sets {name}, which {field_sources[name]} already sets")
            converted[name] = _convert(name, value, str(source))
        except ConfigError as exc:
            problems.append(exc)
        field_sources[name] = source
    if isinstance(converted.get("algorithm_options"), dict):
        algorithm = converted.get("algorithm", default_value("algorithm"))
        merge_algorithm_options(plugin_values, catalog, algorithm, converted["algorithm_options"], sources,
                                field_sources.get("algorithm_options", Source(file=path)), problems)  # fmt: skip
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = "\n".join(f"  - {str(problem).replace(chr(10), chr(10) + '    ')}" for problem in problems)
        raise ConfigError(f"{len(problems)} problems in the config:\n{listed}")
    config = RunConfig(**converted, options=plugin_values.values)
    loaded = LoadedConfig(config, field_sources, path, plugin_values)
    _check_ranges(loaded)
    return loaded


def load_config(path: str | None, overrides: list[str] | None = None, task: str | None = None) -> LoadedConfig:
    """YAML file (optional) + ``--key value`` overrides (+ the command's task) -> validated config."""
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    if path:
        values, sources = read_yaml(path)
    flag_values, flag_sources = parse_overrides(overrides or [])
    for key, value in flag_values.items():
        # a flag given under an alias replaces the file's value under the canonical name
        canonical = KEY_ALIASES.get(key, key)
        for other in [k for k in values if KEY_ALIASES.get(k, k) == canonical]:
            del values[other]
        section, dot, name = key.rpartition(".")
        if dot and isinstance(values.get(section), dict) and name in values[section]:
            # --lora.rank replaces the rank of the file's lora section
            values[section] = {k: v for k, v in values[section].items() if k != name}
        values[key] = value
        sources[key] = flag_sources[key]
    if task is not None:
        file_task = values.get("task")
        if file_task is not None and file_task != task:
            command = f"vistune {file_task}" + (f" --config {path}" if path else "")
            raise ConfigError(
                f"{sources.get('task', Source(file=path))}: task is {_shown(file_task)} but the command is "
                f"`vistune {task}`",
                hint=f"run `{command}` or remove the task key",
            )
        values["task"] = task
    return build_config(values, sources, path)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return attrs.asdict(config)
