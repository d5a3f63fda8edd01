"""A tiny Qwen2 made offline: the model of the embedded default and of the tests.

Nothing can be downloaded here, yet the loading code should be the real one. So we build, from
nothing but this file and ``models/tiny/corpus.txt``, a folder in the Hugging Face layout that
``AutoModelForCausalLM`` / ``AutoTokenizer`` (and vLLM) read exactly like Qwen2.5-3B-Instruct:

- ``config.json`` + ``model.safetensors``: a ``Qwen2ForCausalLM`` with random weights (seeded):
  hidden 128, 4 layers, 4 query heads sharing 2 key/value heads, MLP 344, tied embeddings
  (like Qwen2.5-3B), vocabulary 512.
- ``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``: a byte-level BPE trained
  with ``tokenizers`` on the bundled corpus, through Qwen2's own pipeline (NFC, the Qwen2 split regex
  that makes every digit its own token, byte-level), with Qwen2.5's special tokens
  (``<|endoftext|>`` = pad, ``<|im_start|>``, ``<|im_end|>`` = EOS) and its ChatML chat template.
- ``generation_config.json``: EOS = [<|im_end|>, <|endoftext|>] and pad, with the sampling
  defaults Qwen2.5-Instruct ships (a sampler must override them, as it must for the real model).

Every build writes the same bytes (seeded init, deterministic BPE training). ``resolve_tiny_model``
keeps one build per fingerprint of these inputs in a cache folder; ``load_policy`` resolves the
sentinel name ``TINY_MODEL`` through it, then loads the folder by the same path as the real model.

A random model earns no reward (its samples are noise), so GRPO could never move it. The sentinel
``TINY_INSTRUCT_MODEL`` ("tiny-qwen2-instruct") is the same build plus a short supervised warm start on
formatted examples of the bundled training fixtures (``models/tiny/warm_start.py``), the tiny stand-in for
an instruction-tuned model: it is the model of the embedded default.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from models.tiny.random_qwen import QWEN25_3B

TINY_MODEL = "tiny-random-qwen2"  # sentinel model_name_or_path, resolved by models.policy.resolve_model_path
TINY_INSTRUCT_MODEL = "tiny-qwen2-instruct"  # the same model after a short supervised warm start
TINY_MODELS = (TINY_MODEL, TINY_INSTRUCT_MODEL)
TINY_VERSION = 1  # bump when the build changes in a way the fingerprint below cannot see
TINY_SEED = 0
CORPUS_PATH = Path(__file__).with_name("corpus.txt")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"  # as in Qwen2.5-Instruct
VOCAB_SIZE = 512

# Qwen2.5-3B-Instruct's shape, scaled down; the ratios that matter are kept: grouped-query attention
# (2 KV heads), tied embeddings, rope_theta 1e6.
TINY_CONFIG = dict(
    QWEN25_3B,
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,  # a multiple of 64: bitsandbytes' CPU 4-bit kernel needs whole blocks
    num_hidden_layers=4,
    num_attention_heads=4,
    hidden_act="silu",
    initializer_range=0.02,
)

# Qwen2.5-Instruct's chat template without the tool-calling branches: a system turn always comes
# first (the default one when the conversation has none), every turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n", and add_generation_prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or message['role'] == 'assistant'"
    " or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] != 'system' %}"
    "{{- raise_exception('unsupported role ' + message['role'] + ': the tiny template knows system, user, assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# What Qwen2.5-3B-Instruct's generation_config.json holds (ids mapped to ours).
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


# ------------------------------------------------------------------------------------------- steps


def train_tiny_tokenizer(corpus: str, vocab_size: int = VOCAB_SIZE):
    """A Qwen2-style byte-level BPE trained on `corpus`, as a transformers ``Qwen2Tokenizer``.

    The trainer runs through Qwen2's own normaliser and pre-tokeniser, so merges never cross a
    digit boundary: "1024" is always the four tokens "1", "0", "2", "4", as in Qwen2.5.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.split("\n\n"), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    # Qwen2Tokenizer rebuilds exactly Qwen2's pipeline around our vocabulary and merges.
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    """The ``Qwen2Config`` of the tiny model, with the special-token ids of `tokenizer`."""
    from transformers import Qwen2Config

    return Qwen2Config(
        **TINY_CONFIG,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),  # Qwen2.5: bos = <|endoftext|>, never added
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def init_tiny_model(config, seed: int = TINY_SEED):
    """``Qwen2ForCausalLM(config)`` with weights drawn from a private generator seeded by `seed`."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


def generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],  # <|im_end|>, <|endoftext|>
        **GENERATION_DEFAULTS,
    )


def build_tiny_model(output_dir: str | os.PathLike, warm_start: bool = False) -> str:
    """Build the tiny model into `output_dir` (created if needed) and return its absolute path.

    Steps: train the tokenizer on the corpus -> config -> seeded random weights -> (warm_start: a
    short supervised cold start on the bundled training fixtures, models/tiny/warm_start.py) -> save.
    """
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    tokenizer = train_tiny_tokenizer(corpus)
    config = tiny_config(tokenizer)
    model = init_tiny_model(config)
    model.generation_config = generation_config(tokenizer)
    if warm_start:
        from models.tiny.warm_start import fixture_rows, supervised_warm_start

        with torch.random.fork_rng(devices=[]):
            supervised_warm_start(model, tokenizer, fixture_rows())

    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ------------------------------------------------------------------------------------------- cache


@functools.cache  # reading the fixture rows takes a second or two: once per process
def tiny_fingerprint(warm_start: bool = False) -> str:
    """A short hash of everything a build depends on: a changed corpus or config gets a new folder."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(CORPUS_PATH.read_bytes())
    if warm_start:  # the warm start's code and its rows are inputs too (the rows, not the loaders' source:
        # a comment in data/ must not rebuild the model)
        from models.tiny.warm_start import fixture_rows

        digest.update(Path(__file__).with_name("warm_start.py").read_bytes())
        digest.update(json.dumps(fixture_rows(), sort_keys=True).encode())
    recipe = [TINY_VERSION, TINY_SEED, TINY_CONFIG, SPECIAL_TOKENS, CHAT_TEMPLATE, GENERATION_DEFAULTS]
    recipe += [transformers.__version__, tokenizers.__version__]  # they write the files
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    return digest.hexdigest()[:10]


def cache_root() -> Path:
    """$GRPO_CACHE, else ~/.cache/grpo-medical."""
    return Path(os.environ.get("GRPO_CACHE") or Path.home() / ".cache" / "grpo-medical")


def resolve_tiny_model(cache_dir: str | os.PathLike | None = None, name: str = TINY_MODEL) -> str:
    """Path of the cached tiny model, building it first if needed (``build_once``)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    warm = name == TINY_INSTRUCT_MODEL
    final = root / f"{name}-v{TINY_VERSION}-{tiny_fingerprint(warm)}"
    return build_once(final, lambda folder: build_tiny_model(folder, warm_start=warm))


def build_once(final: Path, build: Callable[[str], object]) -> str:
    """``final`` (a model folder of the cache), made by ``build(folder)`` the first time it is asked for.

    The build goes to a temporary folder next to the final one and is renamed into place, so a process never
    sees a half-written model, and two processes building at once both end with the same complete folder (the
    loser of the rename throws its copy away).
    """
    if (final / "config.json").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
