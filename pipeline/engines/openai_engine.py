"""Any OpenAI-compatible server (`vllm serve`, SGLang, llama.cpp, a hosted API), asked asynchronously with bounded
concurrency and the `openai` client's retries."""

from __future__ import annotations

from typing import Any

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.console import PipelineError
from pipeline.engines.base import Completion, Conversation, Engine, Generation, progress_label


class OpenAIEngine(Engine):
    """Chat completions from an OpenAI-compatible server, `max_concurrency` requests in flight.

    Retries (429, 5xx, timeouts, dropped connections; exponential backoff with jitter) are the `openai`
    client's. A request the server rejects as invalid (400/422, e.g. a prompt longer than the context)
    becomes a Generation with `error` set; an unreachable server, a refused key or an unknown model
    stops the stage with one line naming the `engine.server` key to fix.
    """

    def __init__(self, model: str, config: EngineConfig, seed: int) -> None:
        self.model = model
        self.server = config.server
        self.seed = seed
        self.api_key = self.server.api_key()
        import openai

        client = openai.OpenAI(**self._client_options())
        try:
            served = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            served = None  # a server without /models: the first request will tell
        except openai.APIError as exc:
            raise self._fatal(exc) from None
        finally:
            client.close()
        if served is not None and model not in served:
            raise PipelineError(
                f"engine.server.model: {self.server.base_url} does not serve {model!r}; it serves {served}"
            )

    def _client_options(self) -> dict[str, Any]:
        return {
            "base_url": self.server.base_url,
            "api_key": self.api_key,
            "timeout": self.server.timeout_s,
            "max_retries": self.server.max_retries,
        }

    def _fatal(self, exc: Exception) -> PipelineError:
        import openai

        url = self.server.base_url
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return PipelineError(
                f"engine.server.api_key_env: {url} refused the key from ${self.server.api_key_env} ({exc.status_code})"
            )
        if isinstance(exc, openai.APITimeoutError):
            return PipelineError(f"engine.server.timeout_s: no answer from {url} within {self.server.timeout_s} s")
        if isinstance(exc, openai.APIConnectionError):
            return PipelineError(f"engine.server.base_url: cannot connect to {url} ({exc.__cause__ or exc})")
        if isinstance(exc, openai.NotFoundError):
            return PipelineError(f"engine.server.model: {url} has no model {self.model!r} (404)")
        status = getattr(exc, "status_code", None)
        return PipelineError(f"engine.server: {url} failed{f' with {status}' if status else ''}: {_first_line(exc)}")

    def generate(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str = True
    ) -> list[Generation]:
        import asyncio

        return asyncio.run(self._generate_all(conversations, sampling, progress))

    async def _generate_all(
        self, conversations: list[Conversation], sampling: SamplingConfig, progress: bool | str
    ) -> list[Generation]:
        import asyncio

        import openai
        from tqdm.auto import tqdm

        gate = asyncio.Semaphore(self.server.max_concurrency)
        label = progress_label(progress, "generate (server)")
        bar = tqdm(total=len(conversations), desc=label, unit="prompt", disable=not progress)
        async with openai.AsyncOpenAI(**self._client_options()) as client:

            async def one(conversation: Conversation) -> Generation:
                async with gate:
                    try:
                        return await self._request(client, conversation, sampling)
                    finally:
                        bar.update(1)

            tasks = [asyncio.ensure_future(one(c)) for c in conversations]
            try:
                return list(await asyncio.gather(*tasks))
            except openai.APIError as exc:
                raise self._fatal(exc) from None
            finally:
                for task in tasks:
                    task.cancel()
                bar.close()

    async def _request(self, client: Any, conversation: Conversation, sampling: SamplingConfig) -> Generation:
        import openai

        seed = sampling.seed if self.server.send_seed else None
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=conversation, n=sampling.n, seed=seed, **chat_request_options(sampling)
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            return Generation([], 0, error=f"rejected by the server ({exc.status_code}): {_first_line(exc)}")
        usage = response.usage
        choices = sorted(response.choices, key=lambda c: c.index)
        # Per-sample token counts are exact for n=1; with n>1 the server reports only the total.
        per_choice = usage.completion_tokens if usage and len(choices) == 1 else None
        completions = [
            Completion(
                c.message.content or "",
                "length" if c.finish_reason == "length" else "stop",
                per_choice,
                None,
                [[(t.token, t.logprob) for t in step.top_logprobs] for step in c.logprobs.content or []]
                if sampling.logprobs and c.logprobs
                else None,
            )
            for c in choices
        ]
        extra = {"usage": usage.model_dump(exclude_none=True)} if usage else {}
        return Generation(completions, usage.prompt_tokens if usage else 0, extra=extra)

    def prompt_logprobs(self, sequences: list[list[int]], top_k: int) -> list[list[dict[int, float]]]:
        """Each token of each sequence scored by the server given the tokens before it, prefill only (vLLM's
        `prompt_logprobs`): per sequence, per position, {token id: log-probability} for the `top_k` most likely
        tokens and the token that is there. The first position has none: an empty dict."""
        import openai

        client = openai.OpenAI(**self._client_options())
        try:
            response = client.completions.create(
                model=self.model, prompt=sequences, max_tokens=1, temperature=1.0, extra_body={"prompt_logprobs": top_k}
            )
        except openai.APIError as exc:
            raise self._fatal(exc) from None
        finally:
            client.close()
        scored = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            positions = getattr(choice, "prompt_logprobs", None)
            if positions is None:
                raise PipelineError(
                    f"engine.server.base_url: {self.server.base_url} returned no prompt_logprobs; scoring a "
                    "teacher's tokens needs vLLM's server (vllm serve)"
                )
            scored.append([{int(t): entry["logprob"] for t, entry in (at or {}).items()} for at in positions])
        return scored

    def tokenize(self, text: str) -> list[int]:
        """`text`'s token ids in the served model's tokenizer, no special tokens (vLLM's /tokenize)."""
        import httpx

        root = self.server.base_url.rstrip("/").removesuffix("/v1")
        try:
            response = httpx.post(
                f"{root}/tokenize",
                json={"model": self.model, "prompt": text, "add_special_tokens": False},
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=self.server.timeout_s,
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise PipelineError(
                f"engine.server.base_url: {root}/tokenize failed ({_first_line(exc)}); comparing the teacher's "
                "tokenizer with the student's needs vLLM's server (vllm serve)"
            ) from None
        return list(response.json()["tokens"])


def chat_request_options(sampling: SamplingConfig) -> dict[str, Any]:
    """A chat completions request's arguments for `sampling`, but for n and the seed: the server engine's and the
    load test's, so the load test times the answers the benchmark scores (stop strings and `extra` included)."""
    options: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.stop:
        options["stop"] = sampling.stop
    if sampling.logprobs:
        options.update(logprobs=True, top_logprobs=sampling.logprobs)
    if sampling.json_schema is not None:
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": sampling.json_schema},
        }
    extra_body = dict(sampling.extra)  # server-specific parameters (e.g. vLLM's top_k)
    if sampling.choices is not None:  # vLLM's server; the OpenAI API has no equivalent
        extra_body["structured_outputs"] = {"choice": sampling.choices}
    if extra_body:
        options["extra_body"] = extra_body
    return options


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "message", None) or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
