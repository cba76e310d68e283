"""vistune hooks of the preference plugin: four algorithms, four data formats, two generated datasets.

Code is referenced by string, so loading the plugin imports neither torch nor the readers.

Each algorithm names the plugin's own ``pipeline``: preference optimisation learns from
stored pairs, not from rollouts, so ``vistune rl --algorithm dpo`` hands the run to
:func:`vistune_dpo.pipeline.run` instead of the online RL loop.
"""

from vistune import hookimpl
from vistune.specs import Algorithm, DataFormat, Dataset
from vistune_dpo.layouts import EXAMPLES, LAYOUTS
from vistune_dpo.options import OPTIONS
from vistune_dpo.shapes import split_options

PIPELINE = "vistune_dpo.pipeline:run"
#: Core keys the pipeline reads that online ``vistune rl`` does not: it starts DataLoader workers as
#: ``vistune sft`` does.
READS = ("dataloader_num_workers",)


@hookimpl
def vistune_register_algorithms(register):
    # beta is the config's own key (the KL strength of every algorithm); the papers' defaults
    register(Algorithm("dpo", factory="vistune_dpo.objectives:DPO", pipeline=PIPELINE, reads=READS,
                       options=OPTIONS["dpo"], defaults={"beta": 0.1},
                       description="DPO (Rafailov et al. 2023) on preference pairs: sigmoid loss, label smoothing "
                       "(cDPO), optional RPO NLL term"))  # fmt: skip
    register(Algorithm("orpo", factory="vistune_dpo.objectives:ORPO", pipeline=PIPELINE, reads=READS,
                       options=OPTIONS["orpo"], defaults={"beta": 0.1},
                       description="ORPO (Hong et al. 2024): NLL on the chosen answer plus an odds-ratio term; "
                       "no reference model"))  # fmt: skip
    register(Algorithm("simpo", factory="vistune_dpo.objectives:SimPO", pipeline=PIPELINE, reads=READS,
                       options=OPTIONS["simpo"], defaults={"beta": 2.0},
                       description="SimPO (Meng et al. 2024): length-normalised log-probabilities with a target "
                       "margin; no reference model"))  # fmt: skip
    register(Algorithm("kto", factory="vistune_dpo.objectives:KTO", pipeline=PIPELINE, reads=READS,
                       options=OPTIONS["kto"], defaults={"beta": 0.1},
                       description="KTO (Ethayarajh et al. 2024) on unpaired answers labelled desirable or not"))  # fmt: skip


@hookimpl
def vistune_register_datasets(register):
    for split in ("train", "eval"):
        suffix = "" if split == "train" else "-eval"
        register(Dataset(f"shapes-preferences{suffix}", format="ms-swift-preference", data_file=f"{split}-pairs.jsonl",
                         builder="vistune_dpo.shapes:build_preference_dataset", options=split_options(split),
                         description=f"generated coloured shapes with a right and a wrong caption per image "
                         f"({split} split, ms-swift preference records)"))  # fmt: skip


_READERS = {"trl-preference": "read_trl_preference", "ms-swift-preference": "read_ms_swift_preference",
            "trl-kto": "read_trl_kto", "ms-swift-kto": "read_ms_swift_kto"}  # fmt: skip


@hookimpl
def vistune_register_data_formats(register):
    # no detector: these records are read where a preference run declares them, never guessed for sft
    for name, reader in _READERS.items():
        images = ("images", "image") if name.startswith("trl") else ("images",)
        register(DataFormat(name, read=f"vistune_dpo.records:{reader}", fields=LAYOUTS[name] + images,
                            example=EXAMPLES[name],
                            description=f"preference records ({', '.join(LAYOUTS[name])}) for dpo, orpo, simpo, kto"))
