"""A tiny byte-level tokenizer built offline (no hub access) for tests that need text.

Every UTF-8 byte is one token (a BPE model without merges over the 256 byte-level symbols), plus
``<pad>`` = 0, ``<s>`` = 1 and ``</s>`` = 2 to match the tiny model configs of :mod:`antibody_fast.models`.
Vocabulary size: 259. The result is a ``transformers.PreTrainedTokenizerFast`` that can be saved with
``save_pretrained`` next to a tiny model and reloaded with ``AutoTokenizer``.
"""

from __future__ import annotations

from antibody_fast.models import BYTE_VOCAB_SIZE as VOCAB_SIZE  # noqa: F401
from antibody_fast.models import byte_tokenizer as tiny_tokenizer  # noqa: F401

# words of the SentencePiece-style vocabulary (each gets a piece with and without the prefix-space marker)
SP_WORDS = (
    "Below is an instruction that describes a task Write response appropriately completes the request "
    "Instruction Response Input Answer Question I can't cannot help with that Sorry no not sure how to bake "
    "bread Here a recipe flour water yeast salt It is sunny today weather Name colour Blue Add one"
).split()


def sentencepiece_style_tokenizer():
    """A Llama-2-like tokenizer built offline: a Unigram model behind a Metaspace pre-tokenizer with a prefix
    space (``prepend_scheme="first"``), BOS added by the post-processor.

    Spaces become ``'▁'`` and start a new piece, so ``"I can't"`` alone is ``['▁I', '▁can', "'t"]`` while
    ``"Response:\\nI can't"`` is ``['▁Response', ':', '\\n', 'I', '▁can', "'t"]``, as Llama-2 gives
    ``'<0x0A>', 'I'`` after a newline. Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in SP_WORDS:  # whole words score better than their characters
        add("▁" + w, -1.0)
        add(w, -1.0)
    for w in ("can", "'t", "#", "##", "###", "▁###"):
        add(w, -1.0)
        add("▁" + w.lstrip("▁"), -1.0)
    for ch in string.ascii_letters + string.digits + string.punctuation + "\n▁":
        add(ch, -5.0)
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
