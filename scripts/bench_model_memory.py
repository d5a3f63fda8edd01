"""Memory of the 4-bit QLoRA policy: weights, trainable parameters, and one forward + backward.

    python scripts/bench_model_memory.py                     # CUDA: Qwen2.5-3B architecture, 6 x 2,048 tokens
    python scripts/bench_model_memory.py --preset tiny       # CPU: the same steps on a scaled-down model

Nothing is downloaded: the Qwen2.5-3B architecture (hidden 2048, 36 layers, MLP 11008, 16 heads,
2 KV heads, vocabulary 151,936, tied embeddings, rope_theta 1e6) is built from its config with random
weights, saved in bf16 to a temporary folder, and loaded back through ``models.policy.load_policy``
exactly as the trainer loads the real model: 4-bit NF4 with double quantisation, a rank-64 LoRA on
the seven projections, gradient checkpointing (non-reentrant). Random weights change no memory figure.

Recorded (printed, and written to --output as JSON after loading and after each backend):
- weights: CUDA memory allocated once the policy is loaded (4-bit base + fp32 embedding/norms + LoRA);
  on CPU the summed size of parameters and buffers instead;
- trainable parameters, and the closed-form count of ``lora_param_count``;
- for each log-prob backend: peak memory of one forward + backward over N x L tokens (prompt half,
  completion half) through ``completion_logprobs`` (the hidden-state path), and its wall time. "naive"
  builds the full [tokens, vocabulary] logits, the others never do: the difference is the saving.
  On CPU the peak is the process's maximum resident set size (it includes everything loaded so far).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py)

from grpo.config import LORA_TARGETS, GRPOConfig  # noqa: E402
from models.forward import LogprobOptions, completion_logprobs  # noqa: E402
from models.policy import autocast_dtype, load_policy, lora_param_count  # noqa: E402
from models.tiny import CORPUS_PATH, TINY_CONFIG, train_tiny_tokenizer  # noqa: E402
from models.tiny.random_qwen import QWEN25_3B, write_random_qwen  # noqa: E402

# the tiny model's shape (models/tiny/build.py), for exercising the script on CPU
TINY = TINY_CONFIG
PRESETS = {
    # name: (architecture, completions N, tokens per row L, LoRA rank)
    "qwen2.5-3b": (QWEN25_3B, 6, 2048, 64),
    "tiny": (TINY, 4, 128, 64),
}
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: qwen2.5-3b on CUDA, tiny elsewhere"
    )
    parser.add_argument("--batch", type=int, default=None, help="completions N (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row L = prompt + completion")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--backends", default=None, help="comma-separated token_logprobs backends (default: auto,naive)"
    )
    parser.add_argument("--no-4bit", action="store_true", help="the 16-bit LoRA variant instead")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--output", default=None, help="JSON file (default: bench_model_memory_<preset>.json)"
    )
    return parser.parse_args(argv)


def save_random_model(arch: dict, folder: str, device: torch.device) -> None:
    """Random bf16 weights of `arch` with the tiny tokenizer's files (the tokenizer plays no part in
    the memory figures; ids stay below its 512 tokens)."""
    tokenizer = train_tiny_tokenizer(CORPUS_PATH.read_text(encoding="utf-8"))
    write_random_qwen(folder, arch, tokenizer=tokenizer, device=device)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def forward_backward(
    model, batch: int, seq_len: int, backend: str, device: torch.device, compute_dtype=None
) -> dict:
    """One training forward + backward through the hidden-state log-prob path, the decoder under autocast to
    `compute_dtype` (None: none) as the trainer runs it; peak memory and time."""
    prompt_len = seq_len // 2
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 512, (batch, seq_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(batch, seq_len - prompt_len, device=device)
    model.train()
    model.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    options = LogprobOptions(backend=backend, compute_dtype=compute_dtype)
    logp = completion_logprobs(model, input_ids, attention_mask, completion_mask, options)
    loss = -(logp * completion_mask).sum() / completion_mask.sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"backend": backend, "seconds": round(seconds, 3), "loss": loss.item()}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result.update(
            peak_allocated_mib=round(peak / MIB, 1), peak_above_weights_mib=round((peak - before) / MIB, 1)
        )
    else:
        result["peak_rss_mib"] = round(peak_rss_bytes() / MIB, 1)
    model.zero_grad(set_to_none=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("qwen2.5-3b" if device.type == "cuda" else "tiny")
    arch, batch, seq_len, rank = PRESETS[preset]
    batch, seq_len, rank = args.batch or batch, args.seq_len or seq_len, args.lora_r or rank
    backends = (args.backends or "auto,naive").split(",")
    cuda = device.type == "cuda"

    with tempfile.TemporaryDirectory(prefix="bench-model-") as folder:
        save_random_model(arch, folder, device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        config = GRPOConfig(
            model_name_or_path=folder,
            load_in_4bit=not args.no_4bit,
            lora_r=rank,
            lora_alpha=rank,
            gradient_checkpointing=True,
        )
        start = time.perf_counter()
        model, _tokenizer = load_policy(config, device=device)
        load_seconds = time.perf_counter() - start

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, **_versions()},
        "load_in_4bit": config.load_in_4bit,
        "lora_r": rank,
        "tokens": {"batch": batch, "seq_len": seq_len, "completion_len": seq_len - seq_len // 2},
        "trainable_params": trainable,
        "trainable_params_closed_form": lora_param_count(model.config, rank, LORA_TARGETS),
        "param_and_buffer_mib": round(model_bytes(model) / MIB, 1),
        "load_seconds": round(load_seconds, 2),
    }
    if cuda:
        report["weights_allocated_mib"] = round((torch.cuda.memory_allocated(device) - before) / MIB, 1)
    compute_dtype = autocast_dtype(config.dtype, device)
    output = args.output or f"bench_model_memory_{preset}.json"
    report["forward_backward"] = []
    save_json(output, report)  # after loading, then after each backend: a time limit loses one measurement
    for backend in backends:
        report["forward_backward"].append(
            forward_backward(model, batch, seq_len, backend, device, compute_dtype)
        )
        save_json(output, report)

    print(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return report


def _versions() -> dict:
    import peft
    import transformers

    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return versions


if __name__ == "__main__":
    main()
