"""The Jinja chat templates of the Llava checkpoints on the Hugging Face hub, verbatim.

vistune renders conversations with these strings through transformers' own Jinja
renderer, so a prompt is byte for byte what ``processor.apply_chat_template`` gives
with the hub checkpoint, and what vLLM or any other server using that template sees.
"""

#: llava-hf/llava-1.5-7b-hf (and -13b-hf), ``chat_template.json``.  A system message is
#: written as plain text before the first turn; images come first in a turn, each as
#: ``<image>\n``; every text part is followed by one space; answers sit in
#: ``{% generation %}`` blocks; the generation prompt is ``ASSISTANT:``.  The template
#: writes no ``</s>`` after answers, although LLaVA was trained with one there.
LLAVA_1_5 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: llava-hf/llava-v1.6-mistral-7b-hf, ``chat_template.json`` (current revision, which
#: closes answers with ``</s> ``).  Mistral's ``[INST] ... [/INST]`` format: the user turn
#: ends with `` [/INST]`` and there is no separate generation prompt; a system message
#: is wrapped in ``<<SYS>>`` markers; only the first text part of a system or assistant
#: message is rendered.
LLAVA_NEXT_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
