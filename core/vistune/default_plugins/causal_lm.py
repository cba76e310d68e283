"""Text-only causal language models (Llama, Qwen2, Mistral...) and the generic
chat-template template that works for any tokenizer with a chat template."""

from vistune import hookimpl
from vistune.specs import ModelType, Template


@hookimpl
def vistune_register_models(register):
    register(
        ModelType(
            "causal-lm",
            loader="vistune.causal_lm:load_causal_lm",
            default_template="chat-template",
            architectures=(
                "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                "Gemma2ForCausalLM", "Phi3ForCausalLM",
            ),  # fmt: skip
            hf_model_types=("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"),
            language_model=("model", "lm_head"),
            supports_packing=True,
            description="text causal LMs loaded with AutoModelForCausalLM",
        )
    )


@hookimpl
def vistune_register_templates(register):
    register(
        Template(
            "chat-template",
            factory="vistune.chat_template:ChatTemplateEncoder",
            description="the tokenizer's own Jinja chat template, labels on assistant turns",
        )
    )
