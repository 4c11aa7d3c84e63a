"""``jaxens generate --chat``: wrap each prompt in a member's chat template.

The prompt becomes one user message, rendered by the template of the first member whose tokenizer
has one (``tokenizer.chat_template``; the zoo's SmolLM2-135M-Instruct has one, read from its GGUF)
with the generation prompt appended, e.g. for SmolLM2::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant

Every member then reads that text (same-vocabulary combiners encode it with the shared tokenizer;
cross-tokenizer methods with each member's own).
"""

from __future__ import annotations


def chat_template_member(tokenizers, names) -> int:
    """Index of the first tokenizer with a chat template; ``ValueError`` naming the members if none."""
    for i, tok in enumerate(tokenizers):
        if getattr(tok, "chat_template", None):
            return i
    raise ValueError(
        f"--chat: no member's tokenizer has a chat template ({', '.join(names)}); drop --chat, or add an "
        "instruct member whose tokenizer has one (e.g. --member smollm2-135m, SmolLM2-135M-Instruct)"
    )


def apply_chat(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of ``tokenizer``'s chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
