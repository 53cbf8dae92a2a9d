"""Prompt text for a question: the tokenizer's chat template when it has one, else a plain format string."""
from __future__ import annotations


def render_prompt(tokenizer, question: str, *, system_prompt: str | None = None, template: str = "{question}") -> str:
    """The prompt string the policy continues.

    ``template.format(question=question)`` is the user turn. With a tokenizer that has a chat template, the result
    is ``tokenizer.apply_chat_template([system?, user], add_generation_prompt=True, tokenize=False)``; otherwise
    (no tokenizer, or a base model without a template) it is ``system_prompt + "\\n\\n" + user turn`` (or just the user
    turn), so a full R1-Zero-style plain template can be given as ``template``.
    """
    user = template.format(question=question)
    if tokenizer is None or not tokenizer.chat_template:
        return user if system_prompt is None else f"{system_prompt}\n\n{user}"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
