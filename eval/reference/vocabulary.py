"""The reference model's words: a word-level tokenizer built in code from the clip vocabulary.

Every word a clip prompt can use is in the vocabulary; any other word maps to ``<unk>``, so any
prompt still generates, and :func:`unknown_words` says which words the model does not know.

Example::

    >>> tokenizer = build_tokenizer()
    >>> tokenizer("a red circle moving left").input_ids
    [3, 18, 8, 15, 14, 1]
    >>> unknown_words("a crimson circle moving left")
    ['crimson']
"""

from __future__ import annotations

import re

from .clips import BACKGROUNDS, COLOURS, MOTION_WORDS, SHAPES

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def vocabulary() -> list[str]:
    """The special tokens, then every word of every possible clip prompt, sorted."""
    phrases = [*COLOURS, *BACKGROUNDS, *SHAPES, *MOTION_WORDS.values(), "a and on background"]
    words = sorted({word for phrase in phrases for word in phrase.split()})
    return [*SPECIAL_TOKENS, *words]


def words_of(prompt: str) -> list[str]:
    """The lower-case words of ``prompt`` as the tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]", prompt.lower())


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that are not in the vocabulary (they become ``<unk>``)."""
    known = set(vocabulary())
    return [word for word in words_of(prompt) if word not in known]


def build_tokenizer(model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`: lower-cases, splits on whitespace and
    punctuation, appends ``</s>`` and pads with ``<pad>`` (id 0), as UMT5 expects."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
