"""Shared by the data tests: SmolLM2's own chat template with {% generation %} around what should be trained
(content + <|im_end|>), so transformers' return_assistant_tokens_mask gives an independent oracle; it renders
the same string as the original template."""

IM_END = "<|im_end|>"

SMOL_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def trained_runs(labels):
    """Contiguous runs of trained positions (label not ignored), as lists of indices."""
    from pronghorn.data import IGNORE_INDEX

    runs, cur = [], []
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + [cur] if cur else runs
