"""Qwen2.5-3B-Instruct's architecture with random weights, for benchmarks on machines without the hub.

Speed and memory depend on the shapes, not on the values of the weights, so benchmarks build the
real architecture from its config and save it in the Hugging Face layout, with a word-level
tokenizer whose tokens ``t0 ... t151935`` cover the whole vocabulary (prompts are given as ids:
``random_prompt_ids``) and Qwen2.5's special tokens at their real ids.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

QWEN25_3B = dict(
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=11_008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=32_768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    use_sliding_window=False,
)
SPECIALS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def random_prompt_ids(
    n_tokens: int, seed: int = 0, low: int = 0, high: int = min(SPECIALS.values())
) -> list[int]:
    """A prompt of exactly ``n_tokens`` ordinary token ids in ``[low, high)``, to hand to a sampler as ids.
    The default range is every id below Qwen2.5's special tokens; the tiny model's is ``[3, 512)``.

    Ids rather than text: ``AutoTokenizer`` loads the saved word-level tokenizer as a ``Qwen2Tokenizer``
    (the config says qwen2), which rebuilds a byte-level BPE without merges, so words would encode to
    nothing. Decoding ids works either way, and ids are all a benchmark needs.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n_tokens,), generator=generator).tolist()


def word_level_tokenizer(vocab_size: int = QWEN25_3B["vocab_size"]):
    """Tokens ``t0 ... t{vocab_size-1}`` with Qwen2.5's special tokens at their real ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size) if i not in SPECIALS.values()}
    vocab.update(SPECIALS)
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    return tokenizer


def write_random_qwen(
    folder: str | os.PathLike, arch: dict = QWEN25_3B, seed: int = 0, tokenizer=None, device=None
) -> str:
    """Save ``arch`` (a Qwen2Config dict) with random bf16 weights and a tokenizer (default: the
    word-level one; a smaller ``arch`` passes its own, e.g. the tiny model's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tokenizer is None:
        tokenizer = word_level_tokenizer(arch["vocab_size"])
    pad = tokenizer.pad_token_id
    config = Qwen2Config(**arch, bos_token_id=pad, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device), torch.random.fork_rng(devices=[]):  # on the GPU: seconds, not minutes
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, pad]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def cached_random_qwen(folder: str | os.PathLike, arch: dict = QWEN25_3B) -> str:
    """``write_random_qwen(folder, arch)`` once: a later call (another process too) finds the folder and
    reuses it, so the benchmarks of one device check build Qwen2.5-3B's 6 GB of weights once.

    The build goes to ``<folder>.partial`` and is renamed when complete: a build cut short by a time limit
    is never mistaken for a model. The folder is the caller's key: it is not checked against ``arch``.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_qwen(partial, arch)
    os.replace(partial, folder)
    return str(folder)
