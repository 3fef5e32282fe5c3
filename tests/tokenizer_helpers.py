"""A tiny byte-level tokenizer built offline (no hub access) for tests that need text.

Every UTF-8 byte is one token (a BPE model without merges over the 256 byte-level symbols), plus
``<pad>`` = 0, ``<s>`` = 1 and ``</s>`` = 2 to match the tiny model configs of :mod:`antibody_fast.models`.
Vocabulary size: 259. The result is a ``transformers.PreTrainedTokenizerFast`` that can be saved with
``save_pretrained`` next to a tiny model and reloaded with ``AutoTokenizer``.
"""

from __future__ import annotations

VOCAB_SIZE = 259


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for s in byte_symbols:
        vocab[s] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
