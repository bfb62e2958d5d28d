"""`ApiJudge`: an OpenAI-compatible ``/chat/completions`` endpoint asked `JUDGE_PROMPT`. Off by default; the API key
is read from an environment variable at each call and never stored, logged or written into a manifest."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from ssn_core.errors import JudgeError
from ssn_core.judges.base import Judge, Verdict
from ssn_core.judges.prompt import JUDGE_PROMPT_VERSION, JUDGE_SYSTEM_PROMPT, _judge_prompt, parse_one_word_label


@dataclass
class ApiJudge(Judge):
    """OpenAI-compatible chat-completions judge (off by default; nothing is sent unless you build one).

    The key is read from ``os.environ[api_key_env]`` at each call and is never stored on the object, so it cannot
    appear in its repr, in logs or in manifests. ``api_key_env=None`` sends no key (local servers).
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 30.0
    name: str = field(init=False, default="api")
    version: str = field(init=False, default="")

    def __post_init__(self):
        parsed = urllib.parse.urlparse(self.base_url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise JudgeError(f"API judge base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise JudgeError("API judge needs a model name")
        self.name = f"api:{self.model}"
        self.version = f"prompt-{JUDGE_PROMPT_VERSION}"

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "base_url": self.base_url, "model": self.model,
                "api_key_env": self.api_key_env, "timeout": self.timeout}

    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise JudgeError(f"the API judge needs an API key in the environment variable {self.api_key_env}, "
                             "which is not set")
        return key

    def check(self, timeout: float = 5.0) -> None:
        """Raise JudgeError now, before any reply is generated, when the API key is missing or nothing listens at
        the endpoint's host and port (a TCP connection only: nothing is sent)."""
        import socket

        self._key()
        parsed = urllib.parse.urlparse(self.base_url)
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            with socket.create_connection((parsed.hostname, port), timeout=min(timeout, self.timeout)):
                pass
        except ValueError as e:
            raise JudgeError(f"API judge base_url {self.base_url!r} is not a valid URL: {e}") from None
        except OSError as e:
            raise JudgeError(f"API judge could not reach {self.url}: {e.strerror or e}") from None

    def complete(self, prompt: str, reply: str, language: str | None = None) -> str:
        """Send one judging request; the model's raw answer text."""
        key = self._key()
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                         {"role": "user", "content": _judge_prompt(prompt, reply, language)}],
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers,
                                         method="POST")

        def scrub(text: str) -> str:
            return text.replace(key, "***") if key else text

        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            detail = scrub(e.read().decode("utf-8", errors="replace")[:300]) if e.fp is not None else ""
            raise JudgeError(f"API judge at {self.url} answered HTTP {e.code} {e.reason}: {detail}") from None
        except urllib.error.URLError as e:
            raise JudgeError(f"API judge could not reach {self.url}: {scrub(str(e.reason))}") from None
        except (TimeoutError, OSError) as e:
            raise JudgeError(f"API judge at {self.url} failed: {scrub(str(e)) or type(e).__name__} "
                             f"(timeout {self.timeout:g}s)") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"API judge at {self.url} sent an unexpected answer: {scrub(body[:300])!r}") from None
        return content

    def judge(self, prompt: str, reply: str, language: str | None = None) -> Verdict:
        raw = self.complete(prompt, reply, language)
        label = parse_one_word_label(raw)
        if label is None:
            raise JudgeError(f"API judge {self.model} answered {raw[:300]!r}, not REFUSAL / COMPLIANCE / OFF_TARGET")
        return Verdict(label, f"api:{label.upper()}", self.name, self.version, raw=raw)
