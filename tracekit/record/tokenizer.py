"""A byte-level tokenizer that needs no download (used by tiny-mixtral and random-weight models).

ids: 0 <pad>, 1 <s>, 2 </s>, 3..258 the 256 bytes (GPT-2 byte-to-unicode alphabet). Any text,
Chinese included, round-trips. It is a real `PreTrainedTokenizerFast`, so save_pretrained works.
"""

from __future__ import annotations

BYTE_VOCAB_SIZE = 259
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", model_max_length=4096)
