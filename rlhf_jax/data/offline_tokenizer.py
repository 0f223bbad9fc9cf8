"""An offline character-level chat tokenizer: `data.tokenizer="offline"`, the tiny experiments, tests.

Built locally with the `tokenizers` library (no download) and wrapped as a transformers
`PreTrainedTokenizerFast`, so it behaves like a real Hugging Face tokenizer: a Jinja chat template,
special tokens, `save_pretrained`, and `AutoTokenizer.from_pretrained(local_dir)`.

Vocabulary (`OFFLINE_VOCAB_SIZE` = 104 ids, small enough for a hidden-64 model):

- 0 `<pad>`, 1 `<bos>`, 2 `<eos>`, 3 `<unk>`, 4 `<|system|>`, 5 `<|user|>`, 6 `<|assistant|>`
  (all registered as special tokens, so they are never split and `skip_special_tokens` drops them);
- 7 `"\\n"`, 8 `"\\t"`, then the 95 printable ASCII characters `" "` (9) ... `"~"` (103) in code order.

Any other character becomes `<unk>`. Nothing is added automatically when encoding (no
post-processor): BOS and EOS come from the chat template or from the caller.

Chat template (roles system / user / assistant; any other role raises):

    <bos><|user|>12+7=<|assistant|>19<eos>

i.e. `bos_token`, then each message as its role marker followed by its content, an assistant turn
closed by `eos_token`; `add_generation_prompt=True` appends `<|assistant|>`. The assistant content
and its EOS sit inside `{% generation %}` tags, so transformers' `return_assistant_tokens_mask` works.
"""

from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

__all__ = [
    "OFFLINE_VOCAB_SIZE",
    "OFFLINE_SPECIAL_TOKENS",
    "OFFLINE_CHAT_TEMPLATE",
    "offline_tokenizer",
    "save_offline_tokenizer",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
OFFLINE_SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
_CHARACTERS = ("\n", "\t") + tuple(chr(c) for c in range(32, 127))
OFFLINE_VOCAB_SIZE = len(OFFLINE_SPECIAL_TOKENS) + len(_CHARACTERS)

OFFLINE_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception(\"unknown role '\" ~ message['role'] ~ \"': the offline template knows "
    'system, user and assistant") -}}'
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] ~ eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _backend() -> Tokenizer:
    """The `tokenizers` object: a BPE model with no merges, i.e. one token per character."""
    vocab = {tok: i for i, tok in enumerate(OFFLINE_SPECIAL_TOKENS + _CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(OFFLINE_SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    return backend


@functools.cache
def offline_tokenizer() -> PreTrainedTokenizerFast:
    """The offline character-level chat tokenizer (built once per process and cached).

    The cached object is shared: do not mutate it (copy it, or build a fresh one by loading
    `save_offline_tokenizer(path)` with `AutoTokenizer.from_pretrained(path)`).

    Returns:
      A `PreTrainedTokenizerFast` with `vocab_size == OFFLINE_VOCAB_SIZE`, pad/bos/eos/unk ids
      0/1/2/3, the role markers as extra special tokens, right padding, and the chat template above.

    Example:
      >>> tok = offline_tokenizer()
      >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
      ...                         add_generation_prompt=True)
      '<bos><|user|>hi<|assistant|>'
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=OFFLINE_CHAT_TEMPLATE,
        padding_side="right",
        truncation_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def save_offline_tokenizer(path: str | os.PathLike) -> str:
    """Write the offline tokenizer to the directory `path` (created if needed) and return it.

    The directory loads with `transformers.AutoTokenizer.from_pretrained(path)` and with
    `rlhf_jax.data.load_tokenizer(path)`, and gives the same ids and chat template as
    `offline_tokenizer()`.

    Args:
      path: a local directory.

    Returns:
      `str(path)`.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    offline_tokenizer().save_pretrained(path)
    return path
