"""Server pieces without a model: text streaming, validation, chat templates, metrics, response shapes."""

from __future__ import annotations

import codecs
import json
import re

import pytest
from conftest import ORACLE
from ternary.engine.sampling import DryParams, SamplingParams
from ternary.formats.tokenizer import StreamDecoder, Tokenizer
from ternary.server import params
from ternary.server.chat_template import ChatTemplate
from ternary.server.errors import APIError
from ternary.server.metrics import Metrics
from ternary.server.openai_shapes import ResponseShaper, sse
from ternary.server.scheduler import Finished, TokenLogprob
from ternary.server.text_stream import TextStream


class ByteDecoder:
    """One token per byte, so any split of a multi-byte character can be fed."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def stream_bytes(data: bytes, stop=()) -> tuple[list[str], TextStream]:
    ts = TextStream(ByteDecoder(), stop)
    pieces = [ts.push(b) for b in data]
    pieces.append(ts.flush())
    return pieces, ts


# ---------------------------------------------------------------- TextStream


def test_multibyte_characters_are_released_whole():
    text = "héllo € 𝄞 naïve"
    pieces, _ = stream_bytes(text.encode())
    assert "".join(pieces) == text
    for piece in pieces:
        assert "\ufffd" not in piece  # never half a character
    # the 4-byte clef arrives in one piece, after its last byte
    assert "𝄞" in pieces


def test_stop_string_spanning_tokens_is_cut_and_never_shown():
    pieces, ts = stream_bytes(b"abc STOP def", stop=["STOP"])
    assert "".join(pieces) == "abc "
    assert ts.stopped
    assert all("S" not in p for p in pieces)


def test_held_prefix_is_released_when_the_stop_does_not_complete():
    pieces, ts = stream_bytes(b"a STx ST", stop=["STOP"])
    assert "".join(pieces) == "a STx ST"  # the trailing "ST" comes out at flush
    assert pieces[-1] == "ST" and not ts.stopped


def test_earliest_of_several_stop_strings_wins():
    pieces, _ = stream_bytes(b"one two three", stop=["three", "two"])
    assert "".join(pieces) == "one "


def test_stop_string_with_multibyte_characters():
    pieces, _ = stream_bytes("x→y←z".encode(), stop=["←"])
    assert "".join(pieces) == "x→y"


def test_real_tokenizer_stream_never_splits_characters():
    tok = Tokenizer.from_gguf(ORACLE / "tiny-tq2_0-f16.gguf")
    text = "naïve café → 𝄞 日本語"
    ids = tok.encode(text)

    def whole(raw: bytes) -> bool:
        try:
            raw.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(tok.token_bytes(i)) for i in ids)  # the tiny vocab spells these with byte tokens
    ts = TextStream(StreamDecoder(tok, special=False, strip_leading_space=False))
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_truncated_character_at_the_end_becomes_a_replacement_character():
    pieces, _ = stream_bytes("ok€".encode()[:-1])
    assert "".join(pieces) == "ok\ufffd"


# ---------------------------------------------------------------- request validation


def options(body, chat=True, n_ctx=128, n_vocab=300):
    return params.parse_generation_options(body, chat=chat, n_ctx=n_ctx, n_vocab=n_vocab)


def refused(fn, *args, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kw)
    assert 400 <= e.value.status < 500
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return e.value


def test_defaults_are_llama_cpp_sampling_and_no_limit():
    o = options({})
    assert o.sampling == SamplingParams()
    assert o.max_tokens is None and o.stop == () and not o.stream and not o.logprobs


def test_openai_and_llama_fields_are_read():
    o = options(
        {
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "min_p": 0.1,
            "seed": 42,
            "repeat_penalty": 1.1,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 5,
            "logit_bias": {"12": -100},
        }
    )
    assert o.max_tokens == 7 and o.stop == ("\n",) and o.stream and o.include_usage
    assert o.sampling == SamplingParams(
        temperature=0.0, top_k=3, top_p=0.5, min_p=0.1, repeat_penalty=1.1, seed=42
    )
    assert o.logprobs and o.top_logprobs == 5 and o.logit_bias == {12: -100.0}


def test_ollama_options_are_aliases_and_top_level_wins():
    o = options(
        {
            "temperature": 0.3,
            "options": {
                "num_predict": 9,
                "num_ctx": 64,
                "temperature": 1.5,
                "top_k": 2,
                "top_p": 0.7,
                "min_p": 0.2,
                "repeat_penalty": 1.3,
                "seed": 5,
                "stop": ["a", "b"],
                "num_thread": 4,
            },
        }
    )
    assert o.max_tokens == 9 and o.num_ctx == 64 and o.stop == ("a", "b")
    assert o.sampling == SamplingParams(
        temperature=0.3, top_k=2, top_p=0.7, min_p=0.2, repeat_penalty=1.3, seed=5
    )
    assert options({"options": {"num_predict": -1}}).max_tokens is None
    assert options({"ignore_eos": True}).ignore_eos and not options({}).ignore_eos


def test_dry_fields_are_read_as_llama_server_names_them():
    body = {
        "dry_multiplier": 0.8,
        "dry_base": 2,
        "dry_allowed_length": 3,
        "dry_penalty_last_n": 128,
        "dry_sequence_breakers": ["\n", "def"],
    }
    assert options(body).sampling.dry == DryParams(0.8, 2.0, 3, 128, ("\n", "def"))
    assert options({"dry_multiplier": 0.5}).sampling.dry == DryParams(multiplier=0.5)  # the rest: defaults
    assert options({}).sampling.dry == DryParams() and not DryParams().enabled  # off unless asked for
    # Ollama has no DRY options: an `options.dry_*` is an unknown option, ignored like the others
    assert options({"options": {"dry_multiplier": 0.5}}).sampling.dry == DryParams()


def test_legacy_completion_logprobs_is_an_int():
    o = options({"logprobs": 3}, chat=False)
    assert o.logprobs and o.top_logprobs == 3
    assert refused(options, {"logprobs": True}, chat=False).param == "logprobs"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 10**9}, "max_tokens", "invalid_value"),
        ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": -0.1}, "temperature", "invalid_value"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"top_k": -2}, "top_k", "invalid_value"),
        ({"min_p": -1}, "min_p", "invalid_value"),
        ({"repeat_penalty": 0}, "repeat_penalty", "invalid_value"),
        ({"seed": "x"}, "seed", "invalid_type"),
        ({"n": 2}, "n", "invalid_value"),
        ({"n": "1"}, "n", "invalid_type"),
        ({"stop": 5}, "stop", "invalid_type"),
        ({"stop": ["a"] * 17}, "stop", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "invalid_type",
        ),
        ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"logit_bias": {"999": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"1": 500}}, "logit_bias", "invalid_value"),
        ({"presence_penalty": 0.5}, "presence_penalty", "invalid_value"),
        ({"tools": [{"type": "function"}]}, "tools", "invalid_value"),
        ({"options": []}, "options", "invalid_type"),
        ({"dry_multiplier": -0.1}, "dry_multiplier", "invalid_value"),
        ({"dry_multiplier": "0.8"}, "dry_multiplier", "invalid_type"),
        ({"dry_base": 0.5}, "dry_base", "invalid_value"),
        ({"dry_allowed_length": -1}, "dry_allowed_length", "invalid_value"),
        ({"dry_allowed_length": 2.5}, "dry_allowed_length", "invalid_type"),
        ({"dry_penalty_last_n": -2}, "dry_penalty_last_n", "invalid_value"),
        ({"dry_sequence_breakers": []}, "dry_sequence_breakers", "invalid_value"),
        ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers", "invalid_type"),
        ({"dry_sequence_breakers": ["\n", 1]}, "dry_sequence_breakers", "invalid_type"),
        ({"dry_sequence_breakers": ["\n", ""]}, "dry_sequence_breakers", "invalid_value"),
        ({"dry_sequence_breakers": ["x"] * 17}, "dry_sequence_breakers", "invalid_value"),
        ({"options": {"num_predict": "many"}}, "options.num_predict", "invalid_type"),
    ],
)
def test_bad_generation_fields_are_named(body, param, code):
    err = refused(options, body)
    assert (err.status, err.param, err.code) == (400, param, code)


def test_zero_penalties_and_n_1_are_accepted():
    options({"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"}})


def test_json_body_errors():
    assert refused(params.parse_json_body, b"{not json").code == "invalid_json"
    assert refused(params.parse_json_body, b"[1, 2]").code == "invalid_json"
    assert refused(params.parse_json_body, b"\xff\xfe").code == "invalid_json"
    assert refused(params.parse_json_body, b'{"prompt": ["ok", "\\ud800"]}').code == "invalid_json"
    assert refused(params.parse_json_body, b'{"max_tokens": 1' + b"0" * 5000 + b"}").code == "invalid_json"
    assert refused(params.parse_json_body, b"[" * 100000 + b"]" * 100000).code == "invalid_json"
    assert params.parse_json_body(b'{"a": 1}') == {"a": 1}
    assert params.parse_json_body(rb'{"a": "\u00e9 \ud83d\ude00"}') == {"a": "é 😀"}  # a valid pair


def test_model_names():
    names = frozenset({"tiny.gguf", "tiny"})
    params.check_model({"model": "tiny"}, names)
    params.check_model({}, names)
    err = refused(params.check_model, {"model": "gpt-4o"}, names)
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert refused(params.check_model, {"model": 3}, names).code == "invalid_type"


def test_prompts():
    assert params.parse_prompt({"prompt": "hi"}, 300) == "hi"
    assert params.parse_prompt({"prompt": ["hi"]}, 300) == "hi"
    assert params.parse_prompt({"prompt": [1, 2, 3]}, 300) == [1, 2, 3]
    assert params.parse_prompt({"prompt": [[1, 2]]}, 300) == [1, 2]
    assert refused(params.parse_prompt, {}, 300).code == "missing_required_parameter"
    assert refused(params.parse_prompt, {"prompt": ["a", "b"]}, 300).param == "prompt"
    assert refused(params.parse_prompt, {"prompt": [1, 300]}, 300).param == "prompt[1]"
    assert refused(params.parse_prompt, {"prompt": [1, "x"]}, 300).param == "prompt[1]"
    assert refused(params.parse_prompt, {"prompt": 5}, 300).code == "invalid_type"


def test_messages():
    msgs = params.parse_messages(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ]
        }
    )
    assert msgs == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    assert refused(params.parse_messages, {}).param == "messages"
    assert refused(params.parse_messages, {"messages": []}).param == "messages"
    assert refused(params.parse_messages, {"messages": "hi"}).code == "invalid_type"
    assert refused(params.parse_messages, {"messages": [{"role": "wizard", "content": "x"}]}).param == (
        "messages[0].role"
    )
    assert refused(params.parse_messages, {"messages": [{"role": "user"}]}).param == "messages[0].content"
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert refused(params.parse_messages, {"messages": [image]}).param == "messages[0].content[0].type"


# ---------------------------------------------------------------- chat templates

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_model_template_renders_with_special_tokens():
    t = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    out = t.render([{"role": "system", "content": "S "}, {"role": "user", "content": "hi"}])
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not t.is_fallback and t.stop_strings == ()


def test_fallback_is_chatml_with_its_end_marker_as_stop():
    t = ChatTemplate(None)
    assert t.is_fallback and t.stop_strings == ("<|im_end|>",)
    assert (
        t.render([{"role": "user", "content": "hi"}])
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate("{% for %}").is_fallback  # does not compile


def test_template_exceptions_and_sandbox_escapes_are_client_errors():
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    assert strict.render([{"role": "user", "content": "ok"}]) == "ok"
    err = refused(strict.render, [{"role": "system", "content": "x"}])
    assert "first message must be from the user" in err.message
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert refused(escape.render, [{"role": "user", "content": "x"}]).param == "messages"
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    assert refused(mutate.render, [{"role": "user", "content": "x"}]).param == "messages"


def test_tojson_does_not_escape_html():
    t = ChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert t.render([{"role": "user", "content": "<b>é</b>"}]) == '"<b>é</b>"'


# ---------------------------------------------------------------- metrics


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)", line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return samples


def test_metrics_text_is_prometheus_and_counts_add_up():
    m = Metrics()
    m.on_request("/v1/chat/completions", 200, 0.2)
    m.on_request("/v1/chat/completions", 200, 3.0)
    m.on_request("/v1/chat/completions", 400, 0.001)
    m.on_step(12, 0.5)
    m.on_finished(Finished("stop", prompt_tokens=10, completion_tokens=4, prompt_ms=30.0, predicted_ms=100.0))
    m.on_finished(
        Finished("length", prompt_tokens=5, completion_tokens=8, prompt_ms=70.0, predicted_ms=100.0)
    )
    s = parse_prometheus(m.render({"slots_total": ("Slots.", 4)}))
    route = 'route="/v1/chat/completions"'
    assert s[f'ternary_requests_total{{{route},code="200"}}'] == 2
    assert s[f'ternary_requests_total{{{route},code="400"}}'] == 1
    assert s[f'ternary_request_duration_seconds_bucket{{{route},le="0.005"}}'] == 1
    assert s[f'ternary_request_duration_seconds_bucket{{{route},le="0.25"}}'] == 2
    assert s[f'ternary_request_duration_seconds_bucket{{{route},le="+Inf"}}'] == 3
    assert s[f"ternary_request_duration_seconds_sum{{{route}}}"] == pytest.approx(3.201)
    assert s["ternary_prompt_tokens_total"] == 15 and s["ternary_generated_tokens_total"] == 12
    assert s['ternary_generations_total{reason="length"}'] == 1
    assert s["ternary_batch_tokens_total"] == 12 and s["ternary_slots_total"] == 4
    assert s['ternary_time_to_first_token_seconds_bucket{le="0.025"}'] == 0
    assert s['ternary_time_to_first_token_seconds_bucket{le="0.1"}'] == 2


# ---------------------------------------------------------------- response shapes


def token_bytes(t: int) -> bytes:
    return {1: b"Hi", 2: b" there", 3: b"\xe2\x82"}[t]


FIN = Finished("length", prompt_tokens=3, completion_tokens=2, prompt_ms=1.0, predicted_ms=2.0)
LPS = [TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.5)), 0), TokenLogprob(3, -2.0, ((3, -2.0),), 2)]


def test_chat_shapes():
    s = ResponseShaper(chat=True, model="m", token_bytes=token_bytes)
    full = s.response("Hi", FIN, LPS)
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    content = full["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
            {"token": " there", "logprob": -1.5, "bytes": [32, 116, 104, 101, 114, 101]},
        ],
    }
    assert content[1]["bytes"] == [0xE2, 0x82]  # a partial character keeps its exact bytes
    assert s.chunk(role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert s.chunk("x")["choices"][0]["delta"] == {"content": "x"}
    last = s.chunk(finish_reason="stop")["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    usage = s.usage_chunk(FIN)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    assert {c["id"] for c in (s.chunk("a"), usage)} == {s.id}


def test_legacy_completion_shapes():
    s = ResponseShaper(chat=False, model="m", token_bytes=token_bytes)
    full = s.response("Hi", FIN, LPS)
    assert full["object"] == "text_completion" and full["choices"][0]["text"] == "Hi"
    assert full["choices"][0]["logprobs"] == {
        "tokens": ["Hi", "\ufffd"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"Hi": -0.5, " there": -1.5}, {"\ufffd": -2.0}],
        "text_offset": [0, 2],
    }
    assert s.response("Hi", FIN, None)["choices"][0]["logprobs"] is None
    assert s.chunk("x")["choices"][0]["text"] == "x"


def test_sse_framing():
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    frame = sse({"a": "é"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {"a": "é"}
