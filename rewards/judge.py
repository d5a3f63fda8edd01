"""A model as judge: a reward function that asks a chat model to grade each completion against a rubric.

Free-text medical answers have no exact form that a regular expression could check; a judge model can read
them. ``Judge`` is an async reward function (rewards/registry.py awaits it together with the other async
functions) that, for each completion:

1. writes the rubric's messages: the rubric as the system message, then the question (the prompt's last
   message), the reference answer (the ``answer`` column) and the completion;
2. looks the request up in its cache: the same request (the same model, rubric, question, reference and
   completion) is never sent twice, within a batch or across steps;
3. sends the rest to an OpenAI-compatible ``/chat/completions`` endpoint (a vLLM server, or any), at most
   ``max_concurrency`` at a time, each within ``timeout`` seconds (retried ``retries`` times on a timeout,
   a lost connection, 429 or 5xx);
4. reads the score from the reply's last ``Score: N`` line (``parse_score``) and returns
   (N - low) / (high - low), in [0, 1].

A reply without a score on the rubric's scale (no score line, 11 on a 0-10 scale, "4/5") is not a number
for that completion: the judge returns None for it, "does not apply", so it is left out of the sum and of
the judge's mean rather than read as 0 (a bad reply says nothing about the completion), and logs a warning.
If the judge scores none of the completions of a call it applies to, that is no longer a bad reply but a
judge that does not follow the rubric (the wrong model, a rubric it cannot follow): a ``JudgeError``, which
stops the run like any failing reward function. So does a request that still fails after its retries.

``medical_judge`` is the shipped one (``MEDICAL_RUBRIC``: correctness against the reference, safety, reasoning
shown); a config names it ``rewards.judge:medical_judge`` and sets ``judge_base_url`` and ``judge_model``
(grpo/config.py), which the trainer passes to every reward function as keywords. Its own judge is a user's
``Judge(Rubric(...), model=..., base_url=...)`` in their module, named by its import path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import httpx

from rewards.parsing import completion_text
from rewards.registry import RewardFuncError

logger = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"  # read as the OpenAI clients read it; vLLM's --api-key checks it
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class JudgeError(RewardFuncError):
    """The judge cannot give scores: no model named, the endpoint unreachable or failing after its retries,
    or a judge that scores none of a batch's completions."""


@dataclass(frozen=True)
class Rubric:
    """What the judge is told. ``instructions``: the system message (the criteria, the scale, and that the
    reply ends with ``Score: N``); ``template``: the user message, with ``{question}``, ``{reference}`` and
    ``{completion}`` filled in; scores are on ``[low, high]``."""

    name: str
    instructions: str
    template: str
    low: int = 0
    high: int = 10


MEDICAL_RUBRIC = Rubric(
    name="medical",
    instructions="""\
You grade answers to medical questions. Compare the model's answer with the reference answer and grade it on
three criteria, then add the three grades up:

1. Correctness, 0 to 6: 6 if the model's final answer reaches the same conclusion as the reference (the
   wording may differ); 3 if it is partly right, or hedges between the right answer and a wrong one; 0 if it
   is wrong, missing, or contradicts the reference.
2. Safety, 0 to 2: 2 if nothing in it could harm a patient who followed it; 1 for a minor unsafe or
   unsupported claim; 0 for dangerous advice (a wrong dose, a contraindicated treatment, advice to put off
   urgent care).
3. Reasoning shown, 0 to 2: 2 if the steps from the evidence to the conclusion are written out and sound;
   1 if there is some reasoning with gaps; 0 if there is none, or it does not support the answer.

Grade only what is written, and do not reward length. Give at most three short sentences of justification,
then end your reply with one line of exactly this form, where N is the sum, an integer from 0 to 10:
Score: N""",
    template="""\
Question:
{question}

Reference answer:
{reference}

Model's answer:
{completion}

Grade the model's answer.""",
)

# "Score: 7", "**Score:** 7", "score = 7.5", "Score: 8/10" (the denominator, if any, must be the scale's top)
SCORE_LINE = re.compile(
    r"^[\s>#*_`]*score[\s*_`]*[:=][\s*_`]*([+-]?\d+(?:\.\d+)?)[\s*_`]*(?:/\s*(\d+(?:\.\d+)?))?[\s*_`.]*$",
    re.IGNORECASE | re.MULTILINE,
)


def parse_score(reply: str, low: float, high: float) -> Optional[float]:
    """The number on the reply's last ``Score: N`` line, if it lies in [low, high]; else None.

    >>> [parse_score(r, 0, 10) for r in ["Sound.\\nScore: 7", "**Score:** 8/10", "Score: 7.5", "Score: 10"]]
    [7.0, 8.0, 7.5, 10.0]
    >>> [parse_score(r, 0, 10) for r in ["Score: 11", "Score: -1", "Score: 4/5", "The score is 7", "Score: seven"]]
    [None, None, None, None, None]
    >>> parse_score("Score: 3\\nOn reflection:\\nScore: 6", 0, 10)  # the last one counts
    6.0
    """
    matches = SCORE_LINE.findall(reply or "")
    if not matches:
        return None
    number, denominator = matches[-1]
    score = float(number)
    if denominator and float(denominator) != high:
        return None  # a score on another scale ("4/5" on 0-10) is not this rubric's
    return score if low <= score <= high else None


def question_text(prompt: Any) -> str:
    """The question of a prompt: a plain string as it is; of chat messages, the last one's content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[-1], Mapping):
        return str(prompt[-1].get("content", ""))
    return ""


class Judge:
    """An async reward function ``judge(completions, prompts, answer, db_set, **kwargs) -> [float | None]``:
    each completion graded by a chat model under ``rubric`` (module docstring).

    base_url, model, timeout, max_concurrency: the endpoint (``.../v1``), the model it serves, seconds per
    request, requests in flight; each None here is taken from the call's ``judge_base_url``, ``judge_model``,
    ``judge_timeout``, ``judge_max_concurrency`` keywords (the config fields the trainer passes), else the
    defaults 60 s and 16. api_key: None reads ``OPENAI_API_KEY`` (no key is sent when unset).
    skip_sources: ``db_set`` values the judge does not apply to (None for those completions).
    extra_body: more fields for every request, e.g. vLLM's ``{"structured_outputs": {"regex": ...}}``.
    Counters: ``requests`` (HTTP requests sent, retries included), ``cache_hits`` and ``rejected`` (replies
    without a score on the scale).
    """

    def __init__(
        self,
        rubric: Rubric,
        *,
        name: Optional[str] = None,
        base_url: Optional[str] = None,
        model: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Optional[float] = None,
        max_concurrency: Optional[int] = None,
        retries: int = 2,
        max_tokens: int = 256,
        temperature: float = 0.0,
        skip_sources: Sequence[str] = (),
        cache_size: int = 100_000,
        extra_body: Optional[Mapping[str, Any]] = None,
    ):
        self.rubric = rubric
        self.__name__ = name or f"{rubric.name}_judge"
        self.base_url, self.model, self.api_key = base_url, model, api_key
        self.timeout, self.max_concurrency = timeout, max_concurrency
        self.retries, self.max_tokens, self.temperature = retries, max_tokens, temperature
        self.skip_sources = frozenset(skip_sources)
        self.cache_size = cache_size
        self.extra_body = dict(extra_body or {})
        self.cache: OrderedDict[str, Optional[float]] = OrderedDict()  # request key -> score (None: rejected)
        self.requests = self.cache_hits = self.rejected = 0

    def messages(self, question: str, reference: str, completion: str) -> list[dict[str, str]]:
        """The chat messages of one grading request."""
        user = self.rubric.template.format(question=question, reference=reference, completion=completion)
        return [{"role": "system", "content": self.rubric.instructions}, {"role": "user", "content": user}]

    def reward(self, score: Optional[float]) -> Optional[float]:
        """A score on [low, high] as a reward on [0, 1] (None stays None). Example on 0-10: 7 -> 0.7."""
        if score is None:
            return None
        return (score - self.rubric.low) / (self.rubric.high - self.rubric.low)

    async def __call__(
        self,
        completions: list,
        prompts: Optional[Sequence[Any]] = None,
        answer: Optional[Sequence[str]] = None,
        db_set: Optional[Sequence[str]] = None,
        judge_base_url: Optional[str] = None,
        judge_model: Optional[str] = None,
        judge_timeout: Optional[float] = None,
        judge_max_concurrency: Optional[int] = None,
        **kwargs: Any,
    ) -> list[Optional[float]]:
        n = len(completions)
        model = self.model or judge_model
        base_url = self.base_url or judge_base_url
        if not model or not base_url:
            missing = "judge_model (the name the endpoint serves)" if not model else "judge_base_url"
            raise JudgeError(f"judge {self.__name__}: no {missing}; set it in the config")
        applies = [db_set is None or db_set[i] not in self.skip_sources for i in range(n)]
        keys: dict[int, str] = {}  # completion -> its request's key
        found: dict[str, Optional[float]] = {}  # key -> score, of this call's requests
        todo: dict[str, tuple[int, list[dict[str, str]]]] = {}  # key -> (first completion, messages) to send
        for i in range(n):
            if not applies[i]:
                continue
            messages = self.messages(
                question_text(prompts[i]) if prompts is not None else "",
                str(answer[i]) if answer is not None else "(no reference answer)",
                completion_text(completions[i]),
            )
            key = keys[i] = hashlib.sha256(json.dumps([model, messages]).encode()).hexdigest()
            if key in found or key in todo:
                self.cache_hits += 1  # the same request twice in one batch: sent once
            elif key in self.cache:
                self.cache.move_to_end(key)
                found[key] = self.cache[key]
                self.cache_hits += 1
            else:
                todo[key] = (i, messages)
        if todo:
            found.update(await self._judge_all(todo, base_url, model, judge_timeout, judge_max_concurrency))
        scores = {i: found[key] for i, key in keys.items()}
        if scores and all(score is None for score in scores.values()):
            raise JudgeError(
                f"judge {self.__name__} ({model} at {base_url}) scored none of the {len(scores)} completions it "
                f"applies to: no reply ended with 'Score: N', N in [{self.rubric.low}, {self.rubric.high}]"
            )
        return [self.reward(scores[i]) if i in scores else None for i in range(n)]

    async def _judge_all(
        self,
        todo: Mapping[str, tuple[int, list[dict[str, str]]]],
        base_url: str,
        model: str,
        timeout: Optional[float],
        max_concurrency: Optional[int],
    ) -> dict[str, Optional[float]]:
        """Send the requests of ``todo`` (at most max_concurrency at a time); their parsed scores, cached."""
        timeout = self.timeout or timeout or 60.0
        concurrency = self.max_concurrency or max_concurrency or 16
        api_key = self.api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        gate = asyncio.Semaphore(concurrency)
        scores: dict[str, Optional[float]] = {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout, limits=limits
        ) as client:

            async def judge_one(key: str, row: int, messages: list[dict[str, str]]) -> None:
                async with gate:
                    reply = await self._request(client, model, messages, timeout, row)
                scores[key] = parse_score(reply, self.rubric.low, self.rubric.high)

            await asyncio.gather(*(judge_one(key, row, messages) for key, (row, messages) in todo.items()))
        for key in todo:  # in the completions' order, whichever reply came first: the cache is deterministic
            self._remember(key, scores[key])
        rejected = sum(score is None for score in scores.values())
        if rejected:
            self.rejected += rejected
            logger.warning(
                "judge %s: %d of %d replies had no 'Score: N' with N in [%s, %s]; those completions get None",
                self.__name__, rejected, len(todo), self.rubric.low, self.rubric.high,
            )  # fmt: skip
        return scores

    def _remember(self, key: str, score: Optional[float]) -> None:
        self.cache[key] = score
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)  # the least recently used

    async def _request(
        self, client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], timeout: float, row: int
    ) -> str:
        """The judge's reply text to one request, retried on a timeout, a lost connection, 429 and 5xx."""
        body = {
            "model": model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        url = f"{client.base_url}chat/completions"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            self.requests += 1
            try:
                response = await client.post("chat/completions", json=body)
            except httpx.TimeoutException as err:
                if last:
                    raise JudgeError(
                        f"judge {self.__name__}: no reply from {url} within judge_timeout={timeout:g} s "
                        f"({attempt + 1} tries)",
                        row=row,
                    ) from err
            except httpx.TransportError as err:
                if last:
                    raise JudgeError(
                        f"judge {self.__name__}: cannot reach {url} ({type(err).__name__}: {err}); is the "
                        "server running at judge_base_url?"
                    ) from err
            else:
                if response.status_code == 200:
                    return reply_text(response, self.__name__, url, row)
                if last or response.status_code not in RETRY_STATUSES:
                    raise JudgeError(
                        f"judge {self.__name__}: {url} answered {response.status_code}: "
                        f"{response.text.strip()[:300]}",
                        row=row,
                    )
            await asyncio.sleep(0.5 * 2**attempt)  # back off before the next try
        raise AssertionError("unreachable: the last try returns or raises")


def reply_text(response: httpx.Response, name: str, url: str, row: int) -> str:
    """The message content of an OpenAI chat completion response; JudgeError if it has none."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise JudgeError(
            f"judge {name}: {url} gave no chat completion: {response.text.strip()[:300]}", row=row
        ) from err
    return content or ""


# The medical rubric's judge, for every source but gsm8k (math has exact answers: the judge gives None there);
# endpoint and model from the config's judge_base_url and judge_model.
medical_judge = Judge(MEDICAL_RUBRIC, name="medical_judge", skip_sources=("gsm8k",))
