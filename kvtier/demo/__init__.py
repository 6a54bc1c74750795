"""The long-document QA demo: a public-domain document, three questions, prompts that share a prefix."""

from __future__ import annotations

from importlib import resources
from typing import Any

DOCUMENT_FILE = "alice-ch1-2.txt"
DOCUMENT_TITLE = "Lewis Carroll, Alice's Adventures in Wonderland (1865), chapters I-II (public domain)"
QUESTIONS = (
    "What did Alice see run close by her at the very beginning of the story?",
    "What did Alice find on the little three-legged table made of glass?",
    "What happened to Alice after she drank from the bottle labelled 'DRINK ME'?",
)
SYSTEM = "You answer questions about the document the user gives you, briefly and accurately."


def document() -> str:
    """The demo document (about 5,900 tokens for SmolLM2's tokenizer)."""
    return resources.files(__package__).joinpath(DOCUMENT_FILE).read_text(encoding="utf-8")


def prompt_ids(tokenizer: Any, doc: str, question: str) -> tuple[list[int], int]:
    """Token ids of a chat prompt (document first, then the question) and the length of the shared part.

    The part up to and including the document is tokenized on its own, so every question's prompt
    starts with exactly the same ids and the cache can serve them.
    """
    marker = "\x00QUESTION\x00"
    user = f"{doc}\n\n{marker}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{SYSTEM}\n\n{user}\n\nAnswer:"
    head, _, tail = text.partition(marker)
    shared = tokenizer(head, add_special_tokens=False).input_ids
    rest = tokenizer(f"Question: {question}{tail}", add_special_tokens=False).input_ids
    return list(shared) + list(rest), len(shared)
