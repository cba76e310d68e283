"""Quantization schemes a config can name, and what each means for loading.

GGUF names (``q4_k_m``, ``q8_0``) come from llama.cpp, whose k-quant formats cannot be
trained through.  For training, vistune maps them to the bitsandbytes scheme of the
same width: ``q4_k_m`` -> 4-bit NF4 with double quantization (QLoRA's recipe),
``q8_0`` -> LLM.int8().  ``awq``, ``gptq`` and ``fp8`` describe checkpoints that are
already quantized; they are loaded as saved.

The bitsandbytes schemes declare options as plugins do (``nf4: {double_quant: false}``,
``int8: {threshold: 4.0}``): a section named after the scheme, checked when the config
is read, shown by ``--help`` and the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from vistune.specs import Option

#: Options of the 4-bit schemes (``BitsAndBytesConfig`` fields).
FOUR_BIT_OPTIONS = (
    Option("double_quant", "bool", True, "quantize the quantization constants too (QLoRA's double quantization, "
           "about 0.4 bits per weight less)"),  # fmt: skip
)
#: Options of LLM.int8().
INT8_OPTIONS = (
    Option("threshold", "float", 6.0, "outlier threshold of LLM.int8(): larger activations stay in 16 bits",
           minimum=0),  # fmt: skip
)


@attrs.frozen
class QuantizationScheme:
    name: str
    #: "bnb-4bit", "bnb-8bit", or "prequantized"
    method: str
    description: str
    bnb_4bit_quant_type: str | None = None
    requires: tuple[str, ...] = ()
    requires_cuda: bool = True
    #: Settings of the scheme, read from the YAML section named after it.
    options: tuple[Option, ...] = ()

    def bnb_kwargs(self, values: Mapping[str, Any] | None = None) -> dict:
        """Keyword arguments for ``transformers.BitsAndBytesConfig`` (compute dtype added by the loader).

        :param values: the scheme's option values (:func:`vistune.options.option_values`); defaults when None.
        """
        values = {option.name: option.default for option in self.options} | dict(values or {})
        if self.method == "bnb-4bit":
            return {"load_in_4bit": True, "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                    "bnb_4bit_use_double_quant": values["double_quant"]}  # fmt: skip
        if self.method == "bnb-8bit":
            return {"load_in_8bit": True, "llm_int8_threshold": values["threshold"]}
        return {}


_NF4 = "bitsandbytes 4-bit NF4 with double quantization"
#: Every value of the ``quantization`` key but ``none``, in the order ``--help`` lists them.
SCHEMES = {
    "nf4": QuantizationScheme("nf4", "bnb-4bit", _NF4, "nf4", ("bitsandbytes",), options=FOUR_BIT_OPTIONS),
    "fp4": QuantizationScheme("fp4", "bnb-4bit", "bitsandbytes 4-bit FP4", "fp4", ("bitsandbytes",),
                              options=FOUR_BIT_OPTIONS),  # fmt: skip
    "int8": QuantizationScheme("int8", "bnb-8bit", "bitsandbytes LLM.int8()", None, ("bitsandbytes",),
                               options=INT8_OPTIONS),  # fmt: skip
    "q4_k_m": QuantizationScheme("q4_k_m", "bnb-4bit", f"{_NF4} (GGUF q4_k_m's training equivalent)", "nf4",
                                 ("bitsandbytes",), options=FOUR_BIT_OPTIONS),  # fmt: skip
    "q8_0": QuantizationScheme("q8_0", "bnb-8bit", "bitsandbytes LLM.int8() (GGUF q8_0's training equivalent)", None,
                               ("bitsandbytes",), options=INT8_OPTIONS),  # fmt: skip
    "awq": QuantizationScheme("awq", "prequantized", "an AWQ checkpoint, loaded as saved", None, ()),
    "gptq": QuantizationScheme("gptq", "prequantized", "a GPTQ checkpoint, loaded as saved", None, ()),
    "fp8": QuantizationScheme("fp8", "prequantized", "an FP8 checkpoint, loaded as saved", None, ()),
}


def get_scheme(name: str) -> QuantizationScheme | None:
    """The scheme for a config value; ``None`` for ``"none"``."""
    return None if name == "none" else SCHEMES[name]
