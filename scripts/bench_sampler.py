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

``--mismatch`` (with vLLM) also measures ``mismatch/logp_abs_diff`` (grpo.metrics.sampler_mismatch): vLLM's
log-probs of its own samples vs the trainer's (``models.forward.completion_logprobs`` on the 4-bit NF4
policy, the same adapter on both sides), twice:

- before: vLLM started on the original 16-bit model folder (what it loaded until the export existed; vLLM
  0.32 cannot load bitsandbytes, so the trainer's NF4 base and vLLM's base differed by the quantisation);
- after: ``VLLMSampler.for_policy``, vLLM on the trainer's own NF4 base dequantised (``models/export.py``).

``--dtype`` (fp32 / bf16 / auto) is the trainer's compute dtype and vLLM's dtype, the same on both sides:

    python scripts/bench_sampler.py --preset tiny --samplers vllm --mismatch --dtype fp32
    python scripts/bench_sampler.py --preset tiny --samplers vllm --mismatch --dtype bf16

Prints a table and writes JSON to --out (default outputs/bench_sampler_<preset>.json), rewritten after each
measurement.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py)

from grpo.config import GRPOConfig  # noqa: E402
from grpo.metrics import sampler_mismatch  # noqa: E402
from grpo.rollout import collate  # noqa: E402
from models.hf_sampler import HFSampler  # noqa: E402
from models.policy import autocast_dtype, resolve_dtype, resolve_model_path  # noqa: E402
from models.samplers import SamplingSettings, derive_seed, vllm_importable  # noqa: E402
from models.tiny import TINY_MODEL  # noqa: E402
from models.tiny.random_qwen import write_random_qwen  # noqa: E402
from models.vllm_sampler import VLLMSampler  # noqa: E402

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


def measure_mismatch(
    vllm_sampler, policy, prompts, num_generations: int, seed: int, temperature: float, compute_dtype=None
) -> dict:
    """vLLM's log-probs vs the trainer's (models.forward.completion_logprobs on ``policy``), vLLM's samples.

    The sampler must hold the policy's current adapter (``update_policy(policy)``), so that the two sides
    differ only by their base weights and kernels. compute_dtype: the trainer's autocast dtype
    (``models.policy.autocast_dtype``; None in fp32 mode).
    """
    from models.forward import LogprobOptions, completion_logprobs

    prompt_ids = vllm_sampler.encode(prompts)
    outputs = vllm_sampler.generate(
        prompt_ids, num_generations, [derive_seed(seed, p) for p in range(len(prompt_ids))]
    )
    batch = collate(prompt_ids, outputs, pad_id=vllm_sampler.tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        logp = completion_logprobs(
            policy,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["completion_mask"].to(device),
            LogprobOptions(temperature=temperature, compute_dtype=compute_dtype),
        ).cpu()
    policy.train(was_training)
    metrics = sampler_mismatch(batch["sampler_logp"], logp, batch["completion_mask"])
    result = {k.split("/", 1)[1]: float(f"{v:.6g}") for k, v in metrics.items()}
    result["tokens"] = int(batch["completion_mask"].sum())
    return result


def original_folder_sampler(cfg: GRPOConfig, policy, tokenizer, model_path: str, dtype: torch.dtype):
    """vLLM on the original model folder: the sampler as it was before the export (the "before" figure)."""
    sampler = VLLMSampler(
        model_path,
        tokenizer,
        SamplingSettings.from_config(cfg),
        lora_rank=cfg.lora_r,
        max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        dtype=str(dtype).removeprefix("torch."),
        load_in_4bit=cfg.load_in_4bit,
        seed=cfg.seed,
    )
    sampler.update_policy(policy)
    return sampler


def print_mismatch(mismatch: dict) -> None:
    print(
        f"mismatch/logp_abs_diff, vLLM vs the trainer's {mismatch['trainer']} policy, {mismatch['dtype']} "
        "on both sides:"
    )
    for when in ("before", "after"):
        row = mismatch[when]
        print(
            f"  {when:6s} ({row['vllm_base']}): mean {row['logp_abs_diff']:.3g}, max "
            f"{row['logp_abs_diff_max']:.3g}, seq_ratio {row['seq_ratio_min']:.6g}.."
            f"{row['seq_ratio_max']:.6g} ({row['tokens']} tokens)"
        )
    print(f"  before / after: {mismatch['reduction']:.3g}x")


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
    parser.add_argument(
        "--mismatch",
        action="store_true",
        help="also measure vLLM vs trainer log-probs: vLLM on the original folder, then on the export",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="the trainer's compute dtype, also vLLM's (auto: bf16 on GPU, fp32 on CPU)",
    )
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
        dtype=args.dtype,
        sampler="vllm",
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
        "dtype": str(resolve_dtype(cfg.dtype)).removeprefix("torch."),
        "results": {},
    }
    out = Path(args.out or f"outputs/bench_sampler_{args.preset}.json")
    save_json(out, report)  # rewritten after each measurement: a time limit loses only the one in flight
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
        save_json(out, report)
    if "vllm" in samplers:
        ok, detail = vllm_importable()
        if not ok:
            report["results"]["vllm"] = f"skipped: {detail}"
        else:
            start = time.perf_counter()
            model_path, dtype = resolve_model_path(model), resolve_dtype(cfg.dtype)
            vllm = VLLMSampler.for_policy(cfg, policy, tokenizer, model_path, dtype)  # as make_sampler does
            engine_start = time.perf_counter() - start
            print(f"vllm : {vllm.describe()}", flush=True)
            start = time.perf_counter()
            vllm.update_policy(policy)
            handover = time.perf_counter() - start
            result = timed_generate(vllm, prompts, group, args.seed)
            result.update(engine_start_s=round(engine_start, 2), update_policy_s=round(handover, 3))
            report["results"]["vllm"] = result
            save_json(out, report)
            if args.mismatch:
                mismatch_prompts = [prompt] * 4
                compute_dtype = autocast_dtype(cfg.dtype)
                after = measure_mismatch(
                    vllm, policy, mismatch_prompts, group, args.seed, cfg.temperature, compute_dtype
                )
                after["vllm_base"] = (
                    "the trainer's own NF4 base, dequantised" if four_bit else "the original folder"
                )
                vllm.close()  # one engine at a time (on a GPU each takes vllm_gpu_memory_utilization)
                del vllm
                gc.collect()  # the engine holds its memory until collected; the next one checks what is free
                before_sampler = original_folder_sampler(cfg, policy, tokenizer, model_path, dtype)
                before = measure_mismatch(
                    before_sampler, policy, mismatch_prompts, group, args.seed, cfg.temperature, compute_dtype
                )
                before["vllm_base"] = "the original model folder"
                before_sampler.close()
                report["mismatch"] = {
                    "trainer": report["policy_base"],
                    "dtype": report["dtype"],
                    "before": before,
                    "after": after,
                    "reduction": before["logp_abs_diff"] / max(after["logp_abs_diff"], 1e-12),
                }
            else:
                vllm.close()
        print(f"vllm : {report['results']['vllm']}", flush=True)
        if "mismatch" in report:
            print_mismatch(report["mismatch"])

    save_json(out, report)
    print(f"wrote {out}")
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
