"""Benchmark the samplers: generated tokens per second of HF generate and of the colocated vLLM engine.

    python scripts/bench_sampler.py --preset tiny            # CPU: the offline tiny Qwen2, 2 cores OK
    python scripts/bench_sampler.py --preset qwen2.5-3b      # CUDA: Qwen2.5-3B's architecture, random weights
    python scripts/bench_sampler.py --model PATH --prompts 1 --num_generations 6 --max_new_tokens 1024

One measurement = one ``sampler.generate`` call of P prompts x G completions (after one short warm-up
call); tokens/s = completion tokens produced (EOS included) / wall-clock seconds. For vLLM it also times
the engine start and ``update_policy`` (saving the LoRA adapter to /dev/shm and handing it over), the
per-step price of following the policy.

``qwen2.5-3b`` needs no download: ``models.tiny.random_qwen`` writes Qwen2.5-3B-Instruct's config (hidden
2048, 36 layers, MLP 11008, 16 heads, 2 KV heads, vocab 151,936, tied embeddings) with random weights
and a word-level tokenizer of the same vocabulary to a temporary folder; the prompt is 128 ordinary token ids. Random
weights almost never sample EOS, so every completion runs to max_new_tokens: 6 x 1,024 tokens.

``--mismatch`` (with vLLM) also measures how far vLLM's log-probs are from the trainer's for the same
sampled tokens (grpo.metrics.sampler_mismatch), for the policy with a 4-bit NF4 base (what the
trainer holds; vLLM holds the 16/32-bit base because vllm 0.32 cannot load bitsandbytes) and with a
16/32-bit base (both sides the same weights).

Prints a table and writes JSON to --out (default outputs/bench_sampler_<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from grpo.config import GRPOConfig  # noqa: E402
from grpo.metrics import sampler_mismatch  # noqa: E402
from grpo.rollout import collate  # noqa: E402
from models.hf_sampler import HFSampler  # noqa: E402
from models.policy import resolve_dtype, resolve_model_path  # noqa: E402
from models.samplers import SamplingSettings, derive_seed, make_sampler, vllm_importable  # noqa: E402
from models.tiny import TINY_MODEL  # noqa: E402
from models.tiny.random_qwen import write_random_qwen  # noqa: E402

PRESETS = {
    "tiny": dict(model=TINY_MODEL, prompts=2, num_generations=6, max_new_tokens=128, lora_r=8),
    "qwen2.5-3b": dict(model=None, prompts=1, num_generations=6, max_new_tokens=1024, lora_r=64),
}
RANDOM_PROMPT_TOKENS = 128  # about the length of the recipe's system + user prompt for GSM8K
PROMPT = [
    {
        "role": "system",
        "content": "Respond in the following format: <reasoning> ... </reasoning> <answer> ... </answer>",
    },
    {
        "role": "user",
        "content": "A patient has a fever of 39 C and a cough. Is an antibiotic needed? yes, no or maybe",
    },
]


def timed_generate(sampler, prompts, num_generations: int, seed: int) -> dict:
    prompt_ids = sampler.encode(prompts)
    warm_up = SamplingSettings(max_completion_length=4)
    sampler.generate(prompt_ids[:1], 1, [seed], settings=warm_up)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = sampler.generate(
        prompt_ids, num_generations, [derive_seed(seed, p) for p in range(len(prompt_ids))]
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "completions": len(outputs),
        "new_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "truncated": sum(o.truncated for o in outputs),
    }


def measure_mismatch(cfg: GRPOConfig, vllm_sampler, prompts, seed: int) -> dict:
    """vLLM's log-probs vs the trainer's (models.forward.completion_logprobs) for vLLM's own samples."""
    from models.forward import completion_logprobs
    from models.policy import load_adapter, load_policy

    # the adapter vLLM holds now (the one update_policy last saved), read into each trainer-side policy
    adapter_dir = vllm_sampler._lora_request.lora_path
    prompt_ids = vllm_sampler.encode(prompts)
    outputs = vllm_sampler.generate(
        prompt_ids, cfg.num_generations, [derive_seed(seed, p) for p in range(len(prompt_ids))]
    )
    batch = collate(prompt_ids, outputs, pad_id=vllm_sampler.tokenizer.pad_token_id)
    result = {}
    for name, four_bit in (("trainer_4bit_nf4", True), ("trainer_same_precision", False)):
        if four_bit and not _bitsandbytes_ok():
            result[name] = "skipped: bitsandbytes not importable"
            continue
        policy, _ = load_policy(GRPOConfig(**{**cfg.to_dict(), "load_in_4bit": four_bit}))
        load_adapter(policy, adapter_dir)
        device = next(policy.parameters()).device
        with torch.no_grad():
            logp = completion_logprobs(
                policy,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["completion_mask"].to(device),
                temperature=cfg.temperature,
            ).cpu()
        metrics = sampler_mismatch(batch["sampler_logp"], logp, batch["completion_mask"])
        result[name] = {k.split("/")[1]: round(v, 6) for k, v in metrics.items()}
        del policy
    result["tokens"] = int(batch["completion_mask"].sum())
    return result


def _bitsandbytes_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--model", help="an HF model folder (default: the preset's)")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--num_generations", type=int)
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--samplers", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument(
        "--load_in_4bit",
        choices=["auto", "true", "false"],
        default="auto",
        help="the HF policy's base (auto: 4-bit when bitsandbytes imports)",
    )
    parser.add_argument("--mismatch", action="store_true", help="also measure vLLM vs trainer log-probs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    prompts_n = args.prompts or preset["prompts"]
    group = args.num_generations or preset["num_generations"]
    max_new = args.max_new_tokens or preset["max_new_tokens"]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]

    scratch = None
    model = args.model or preset["model"]
    if model is None:
        scratch = tempfile.mkdtemp(prefix="bench-sampler-")
        print(f"writing {args.preset} with random weights to {scratch} ...", flush=True)
        model = write_random_qwen(scratch)
    four_bit = _bitsandbytes_ok() if args.load_in_4bit == "auto" else args.load_in_4bit == "true"
    cfg = GRPOConfig(
        model_name_or_path=model,
        load_in_4bit=four_bit,
        lora_r=preset["lora_r"],
        lora_alpha=preset["lora_r"],
        num_generations=max(group, 2),
        max_completion_length=max_new,
        max_prompt_length=256,
        gradient_checkpointing=False,
        temperature=1.0,
        seed=args.seed,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": args.preset if args.model is None else args.model,
        "prompts": prompts_n,
        "num_generations": group,
        "max_new_tokens": max_new,
        "policy_base": "4-bit NF4" if four_bit else "16/32-bit",
        "results": {},
    }
    from models.policy import load_policy

    policy, tokenizer = load_policy(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # a non-zero adapter, so that the adapter path is exercised for real
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    # The random model's tokenizer knows no English: give it token ids (ordinary ones, below the specials).
    prompt = PROMPT if scratch is None else list(range(1_000, 1_000 + RANDOM_PROMPT_TOKENS))
    prompts = [prompt] * prompts_n

    if "hf" in samplers:
        hf = HFSampler(policy, tokenizer, SamplingSettings.from_config(cfg))
        report["results"]["hf"] = timed_generate(hf, prompts, group, args.seed)
        print(f"hf   : {report['results']['hf']}", flush=True)
    if "vllm" in samplers:
        ok, detail = vllm_importable()
        if not ok:
            report["results"]["vllm"] = f"skipped: {detail}"
        else:
            start = time.perf_counter()
            vllm_cfg = GRPOConfig(**{**cfg.to_dict(), "sampler": "vllm"})
            model_path, dtype = resolve_model_path(model), resolve_dtype(cfg.dtype)
            vllm = make_sampler(vllm_cfg, policy, tokenizer, model_path, dtype)
            engine_start = time.perf_counter() - start
            start = time.perf_counter()
            vllm.update_policy(policy)
            handover = time.perf_counter() - start
            result = timed_generate(vllm, prompts, group, args.seed)
            result.update(engine_start_s=round(engine_start, 2), update_policy_s=round(handover, 3))
            report["results"]["vllm"] = result
            if args.mismatch:
                del policy
                report["mismatch"] = measure_mismatch(cfg, vllm, [prompt] * 4, args.seed)
            vllm.close()
        print(f"vllm : {report['results']['vllm']}", flush=True)
        if "mismatch" in report:
            print(f"mismatch: {report['mismatch']}")

    out = Path(args.out or f"outputs/bench_sampler_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
