"""A live `ternary-serve` on 127.0.0.1 driven by the official `openai` client and by raw HTTP.

Greedy outputs are checked against the same model run sequentially in this process (one slot, one token at
a time through the slot API), logprobs against that run's log-softmax, prompt token counts against the
tokenizer, and every malformed request against the OpenAI error shape. Model: ../shared/oracle tiny (random).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE
from ternary.formats.tokenizer import StreamDecoder, Tokenizer

openai = pytest.importorskip(
    "openai", reason="the openai client is in the test extra: pip install -e '.[test]'"
)

MODEL = ORACLE / "tiny-tq2_0-f16.gguf"
N_CTX = 256
MODEL_ID = "tiny-tq2_0-f16.gguf"
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the fallback template on [user: hi]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m ternary.server` in a subprocess, ready once /health says ok."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "ternary.server", str(MODEL), "--port", str(self.port), "-c", str(N_CTX)]
        cmd += ["-t", "1"]  # the tiny model gains nothing from threads; a shared CI box loses a lot to them
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after 300 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request(
    method: str, url: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[int, bytes]:
    return request("GET", url)


def post(url: str, obj: object, headers: dict | None = None) -> tuple[int, dict]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    status, body = request("POST", url, raw, {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(body)


def assert_error(
    status: int, body: dict, want_status: int, param: str | None = None, code: str | None = None
):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("serve"), "-np", "4", "--max-queue", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(MODEL)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """Sequential greedy decoding in this process: one slot, the prompt in one batch, then a token a step."""
    from ternary.engine.engine import Engine

    engine = Engine(str(MODEL), threads=1, n_ctx=N_CTX, n_slots=1)

    def run(prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        engine.reset_slot(0)
        ids = np.asarray(prompt_ids, dtype=np.int32)
        logits = engine.eval_batch(ids, np.arange(len(ids), dtype=np.int32), np.zeros(len(ids), np.int32))[-1]
        out, rows = [], []
        for pos in range(len(ids), len(ids) + n):
            token = int(np.argmax(logits))
            out.append(token)
            rows.append(np.asarray(logits, dtype=np.float64))
            if token in tokenizer.eog_ids:
                break
            one = np.array([token], np.int32)
            logits = engine.eval_batch(one, np.array([pos], np.int32), np.zeros(1, np.int32))[0]
        return out, rows

    return run


def text_of(tokenizer: Tokenizer, ids: list[int]) -> str:
    dec = StreamDecoder(tokenizer, special=False, strip_leading_space=False)
    return "".join(dec.feed(t) for t in ids if t not in tokenizer.eog_ids) + dec.flush()


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


# ---------------------------------------------------------------- chat


def test_chat_greedy_matches_sequential_decoding(client, tokenizer, reference):
    prompt = tokenizer.encode(CHATML_HI, add_bos=True)
    expected, _ = reference(prompt, 12)
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(tokenizer, expected)
    assert choice.finish_reason == ("stop" if expected[-1] in tokenizer.eog_ids else "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(prompt) + len(expected)


def test_chat_stream_chunks_follow_the_openai_order(client, tokenizer, reference):
    prompt = tokenizer.encode(CHATML_HI, add_bos=True)
    expected, _ = reference(prompt, 10)
    chunks = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}],
            model="tiny-tq2_0-f16",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert last.choices[0].delta.content is None and last.choices[0].delta.role is None
    assert last.choices[0].finish_reason in ("stop", "length")
    assert usage.choices == [] and usage.usage.completion_tokens == len(expected)
    assert usage.usage.prompt_tokens == len(prompt)
    assert "".join(c.choices[0].delta.content for c in middle) == text_of(tokenizer, expected)


def test_chat_logprobs_are_the_model_distribution(client, tokenizer, reference):
    prompt = tokenizer.encode(CHATML_HI, add_bos=True)
    expected, rows = reference(prompt, 5)
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    emitted = [t for t in expected if t not in tokenizer.eog_ids]
    assert len(content) == len(emitted)
    for entry, token, row in zip(content, emitted, rows, strict=False):
        lp = log_softmax(row)
        assert bytes(entry.bytes) == tokenizer.token_bytes(token)
        assert entry.logprob == pytest.approx(lp[token], abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            np.sort(lp)[::-1][:3].tolist(), abs=1e-4
        )
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy picks the most likely token


def test_seed_makes_sampling_repeatable(client):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=16,
            temperature=1.5,
            extra_body={"top_k": 0},
            seed=seed,
        )
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


# ---------------------------------------------------------------- completions


def test_completion_text_and_legacy_logprobs(client, tokenizer, reference):
    prompt_text = "def fibonacci(n):"
    prompt = tokenizer.encode(prompt_text, add_bos=True)
    expected, rows = reference(prompt, 6)
    r = client.completions.create(model=MODEL_ID, prompt=prompt_text, max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert choice.text == text_of(tokenizer, expected)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(expected)
    emitted = [t for t in expected if t not in tokenizer.eog_ids]
    lp = choice.logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == len(lp.text_offset)
        == len(emitted)
    )
    for i, (token, row) in enumerate(zip(emitted, rows, strict=False)):
        ref = log_softmax(row)
        assert lp.tokens[i] == tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        assert lp.token_logprobs[i] == pytest.approx(ref[token], abs=1e-4)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(
            np.sort(ref)[::-1][:2], abs=1e-4
        )
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_completion_stream_and_token_prompt(client, tokenizer, reference):
    prompt = tokenizer.encode("The quick brown fox", add_bos=True)
    expected, _ = reference(prompt, 8)
    stream = client.completions.create(
        model=MODEL_ID,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert "".join(texts) == text_of(tokenizer, expected)
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(expected) and chunks[-1].usage.prompt_tokens == len(
        prompt
    )


def test_stop_string_truncates(client, tokenizer, reference):
    prompt = tokenizer.encode("The quick brown fox", add_bos=True)
    expected, _ = reference(prompt, 24)
    full = text_of(tokenizer, expected)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.completions.create(
        model=MODEL_ID, prompt="The quick brown fox", max_tokens=24, temperature=0, stop=[stop, "@@@"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_dry_request_decodes_as_the_engine_does(client):
    """dry_* fields reach the sampler, with llama.cpp's default breakers (which need the tokenizer)."""
    from ternary.engine.engine import Engine

    dry = {"dry_multiplier": 2.0, "dry_base": 1.75, "dry_allowed_length": 1, "dry_penalty_last_n": -1}
    engine = Engine(str(MODEL), threads=1, n_ctx=N_CTX, n_slots=1)
    kwargs = dict(max_tokens=24, temperature=0, ignore_eos=True, stream=False)
    expected = engine.generate("The quick brown fox", **kwargs, **dry)
    assert expected != engine.generate("The quick brown fox", **kwargs)  # the penalty changes this text
    r = client.completions.create(
        model=MODEL_ID, prompt="The quick brown fox", max_tokens=24, temperature=0,
        extra_body={**dry, "ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].text == expected


def test_max_tokens_and_ollama_num_predict(client):
    r = client.completions.create(
        model=MODEL_ID, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.completions.create(
        model=MODEL_ID,
        prompt="hello",
        extra_body={"options": {"num_predict": 2, "temperature": 0, "top_k": 1}},
    )
    assert r.usage.completion_tokens <= 2


def test_end_of_generation_token_stops(client):
    # +100 on <|eot_id|> makes it the greedy choice: the reply ends at once, with no text
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0,
        logit_bias={"1801": 100},
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


# ---------------------------------------------------------------- other routes


def test_models_props_tokenize_detokenize(server, client, tokenizer):
    assert [m.id for m in client.models.list().data] == ["tiny-tq2_0-f16.gguf"]
    status, props = get(server.url + "/props")
    props = json.loads(props)
    assert (
        status == 200 and props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == N_CTX
    )
    text = "def fib(n): return n<2 and n or fib(n-1)+fib(n-2) # héllo"
    status, body = post(server.url + "/tokenize", {"content": text})
    assert status == 200 and body["tokens"] == tokenizer.encode(text)
    status, body = post(server.url + "/tokenize", {"content": text, "add_special": True})
    assert body["tokens"] == tokenizer.encode(text, add_bos=True)
    status, body = post(server.url + "/detokenize", {"tokens": tokenizer.encode(text)})
    assert status == 200 and body["content"] == text


def test_health_metrics_and_chat_page(server, client):
    assert get(server.url + "/health") == (200, b'{"status":"ok"}')
    client.completions.create(model=MODEL_ID, prompt="a", max_tokens=2, temperature=0)
    status, text = get(server.url + "/metrics")
    text = text.decode()
    assert status == 200
    assert re.search(r'^ternary_requests_total\{route="/v1/completions",code="200"\} [1-9]', text, re.M)
    assert re.search(r"^ternary_generated_tokens_total [1-9]", text, re.M)
    assert re.search(r'^ternary_request_duration_seconds_count\{route="/v1/completions"\} [1-9]', text, re.M)
    assert re.search(r"^ternary_slots_total 4", text, re.M)
    status, page = get(server.url + "/")
    assert status == 200 and b"v1/chat/completions" in page and b"<textarea" in page


# ---------------------------------------------------------------- bad input


LONE_SURROGATES = rb'{"prompt": "\udc00", "messages": [{"role": "user", "content": "\ud800"}]}'
BAD_GENERATION = [
    (b"{not json", 400, None, "invalid_json"),
    (LONE_SURROGATES, 400, None, "invalid_json"),
    (b"[" * 50000 + b"]" * 50000, 400, None, "invalid_json"),
    (b"[]", 400, None, "invalid_json"),
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": 10**12}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": "8"}, 400, "max_tokens", "invalid_type"),
    ({"temperature": "warm"}, 400, "temperature", "invalid_type"),
    ({"top_p": 7}, 400, "top_p", "invalid_value"),
    ({"n": 3}, 400, "n", "invalid_value"),
    ({"stop": {"a": 1}}, 400, "stop", "invalid_type"),
    ({"stream": 1}, 400, "stream", "invalid_type"),
    ({"seed": 1.5}, 400, "seed", "invalid_type"),
]


@pytest.mark.parametrize("body, status, param, code", BAD_GENERATION)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_generation_requests(server, route, body, status, param, code):
    if isinstance(body, dict):
        base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
        body = {**base, **body}
    assert_error(*post(server.url + route, body), status, param, code)


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": [{"role": "user", "content": "x " * 400}]}, "messages", "context_length_exceeded"),
    ],
)
def test_malformed_chat_requests(server, body, param, code):
    assert_error(*post(server.url + "/v1/chat/completions", body), 400, param, code)


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": {"text": "x"}}, "prompt", "invalid_type"),
        ({"prompt": [1, 99999]}, "prompt[1]", "invalid_value"),
        ({"prompt": ["a", "b"]}, "prompt", "invalid_value"),
        ({"prompt": "x " * 400}, "prompt", "context_length_exceeded"),
        ({"prompt": "x", "num_ctx": 1}, "prompt", "context_length_exceeded"),
    ],
)
def test_malformed_completion_requests(server, body, param, code):
    assert_error(*post(server.url + "/v1/completions", body), 400, param, code)


def test_malformed_tokenize_detokenize_and_unknown_routes(server):
    assert_error(*post(server.url + "/tokenize", {}), 400, "content", "missing_required_parameter")
    assert_error(*post(server.url + "/tokenize", {"content": 3}), 400, "content", "invalid_type")
    assert_error(*post(server.url + "/tokenize", b"nope"), 400, None, "invalid_json")
    assert_error(*post(server.url + "/detokenize", {"tokens": "abc"}), 400, "tokens", "invalid_type")
    assert_error(*post(server.url + "/detokenize", {"tokens": [-1]}), 400, "tokens[0]", "invalid_value")
    status, body = get(server.url + "/v1/nothing")
    assert_error(status, json.loads(body), 404)
    status, body = get(server.url + "/v1/chat/completions")
    assert_error(status, json.loads(body), 405)


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=-1)
    assert e.value.param == "max_tokens"


# ---------------------------------------------------------------- concurrency


def test_load_32_concurrent_clients_without_errors(server, client):
    def one_client(i: int) -> int:
        tokens = 0
        for j in range(3):
            if (i + j) % 2:
                r = client.chat.completions.create(
                    model=MODEL_ID,
                    messages=[{"role": "user", "content": f"client {i} turn {j}"}],
                    max_tokens=4,
                    seed=i,
                )
                tokens += r.usage.completion_tokens
            else:
                chunks = list(
                    client.completions.create(
                        model=MODEL_ID,
                        prompt=f"{i}:{j}",
                        max_tokens=4,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                assert chunks[-1].usage is not None
                tokens += chunks[-1].usage.completion_tokens
        return tokens

    with ThreadPoolExecutor(32) as pool:
        generated = list(pool.map(one_client, range(32)))  # any error re-raises here
    assert len(generated) == 32 and all(1 <= n <= 12 for n in generated)
    status, props = get(server.url + "/props")
    assert json.loads(props)["busy_slots"] == 0


def test_concurrent_greedy_requests_match_sequential_decoding(client, tokenizer, reference):
    """8 requests on 4 slots: steps mix prompt chunks and decodes of different slots; nothing may leak."""
    prompts = [f"{i} " * (1 + 3 * i) + "def f(x):" for i in range(8)]
    expected = [reference(tokenizer.encode(p, add_bos=True), 10)[0] for p in prompts]

    def ask(prompt: str) -> str:
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [text_of(tokenizer, ids) for ids in expected]


def cancelled_count(server: LiveServer) -> int:
    text = get(server.url + "/metrics")[1].decode()
    found = re.search(r'^ternary_generations_total\{reason="cancelled"\} (\d+)', text, re.M)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation_and_frees_the_slot(server, stream):
    before = cancelled_count(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"prompt": "x", "max_tokens": 250, "stream": stream, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event arrived: the job holds a slot
    else:
        deadline = time.monotonic() + 30
        while json.loads(get(server.url + "/props")[1])["busy_slots"] == 0:
            assert time.monotonic() < deadline, "the request never took a slot"
            time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while json.loads(get(server.url + "/props")[1])["busy_slots"] != 0:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.02)
    assert cancelled_count(server) == before + 1  # stopped early, not run to 250 tokens


@pytest.fixture(scope="module")
def small_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One slot, no wait queue, an API key: busy and auth behaviour."""
    srv = LiveServer(tmp_path_factory.mktemp("small"), "-np", "1", "--max-queue", "0", "--api-key", "sekrit")
    yield srv
    srv.stop()


def test_busy_server_refuses_at_once_then_recovers(small_server):
    auth = {"Authorization": "Bearer sekrit"}
    conn = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=60)
    body = json.dumps({"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", **auth})
    resp = conn.getresponse()
    resp.fp.readline()
    t0 = time.monotonic()
    status, err = post(small_server.url + "/v1/completions", {"prompt": "y", "max_tokens": 2}, auth)
    assert time.monotonic() - t0 < 10  # refused, not queued behind the 200-token job
    assert_error(status, err, 503, None, "server_busy")
    busy = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sekrit", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        busy.completions.create(model=MODEL_ID, prompt="y", max_tokens=2)
    assert e.value.status_code == 503
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            r = busy.completions.create(model=MODEL_ID, prompt="y", max_tokens=2, temperature=0)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the slot was never freed"
            time.sleep(0.1)
    assert r.usage.completion_tokens >= 1


def test_api_key_is_required(small_server):
    status, body = post(small_server.url + "/v1/completions", {"prompt": "y", "max_tokens": 1})
    assert_error(status, body, 401, None, "invalid_api_key")
    status, body = post(small_server.url + "/tokenize", {"content": "y"}, {"Authorization": "Bearer wrong"})
    assert_error(status, body, 401, None, "invalid_api_key")
    assert get(small_server.url + "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small_server.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL_ID, prompt="y", max_tokens=1
        )


# ---------------------------------------------------------------- loading


def test_health_is_503_while_loading_and_500_when_loading_failed():
    import uvicorn
    from ternary.server.app import ServerSettings, create_app

    release = threading.Event()

    def slow_failing_factory(settings):
        release.wait(30)
        raise RuntimeError("weights are corrupt")

    app = create_app(ServerSettings(model=str(MODEL)), engine_factory=slow_failing_factory)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        while not srv.started:
            time.sleep(0.02)
        status, body = get(url + "/health")
        assert status == 503 and json.loads(body)["error"]["code"] == "loading"
        status, body = post(url + "/v1/completions", {"prompt": "x"})
        assert_error(status, body, 503, None, "loading")
        release.set()
        deadline = time.monotonic() + 10
        while get(url + "/health")[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, body = get(url + "/health")
        assert status == 500 and "weights are corrupt" in json.loads(body)["error"]
    finally:
        release.set()
        srv.should_exit = True
        thread.join(10)


def test_cli_exits_nonzero_on_a_bad_model(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ternary.server", str(bad), "--port", str(free_port())],
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != 0
    assert b"bad.gguf" in proc.stderr
