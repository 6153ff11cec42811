"""Server counters in Prometheus text format (version 0.0.4) for `GET /metrics`.

Requests by route and status, request latency and time-to-first-token histograms, prompt and generated token
counts, and the engine's batch steps. Written by hand: a dozen series do not justify a client library
dependency."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable

from ternary.server.scheduler import Finished

PREFIX = "ternary_"
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative-bucket histogram, as Prometheus expects."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = []
        cumulative = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Thread-safe: the HTTP side records requests; the scheduler thread, steps and finished generations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.first_token = Histogram()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generations: dict[str, int] = defaultdict(int)
        self.steps = 0
        self.step_tokens = 0
        self.step_seconds = 0.0

    def on_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def on_step(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.step_tokens += n_tokens
            self.step_seconds += seconds

    def on_finished(self, finished: Finished) -> None:
        with self._lock:
            self.prompt_tokens += finished.prompt_tokens
            self.generated_tokens += finished.completion_tokens
            self.generations[finished.reason] += 1
            if finished.completion_tokens:
                self.first_token.observe(finished.prompt_ms / 1e3)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` are point-in-time values (name -> (help, value)) the caller knows."""
        with self._lock:
            out: list[str] = []
            _family(out, "requests_total", "counter", "HTTP requests by route and status code.")
            for (route, code), n in sorted(self.requests.items()):
                out.append(f"{PREFIX}requests_total{_labels({'route': route, 'code': str(code)})} {n}")
            _family(out, "request_duration_seconds", "histogram", "HTTP request latency, to the last byte.")
            for route, hist in sorted(self.latency.items()):
                out += hist.lines(f"{PREFIX}request_duration_seconds", {"route": route})
            _family(out, "time_to_first_token_seconds", "histogram", "Admission to first sampled token.")
            out += self.first_token.lines(f"{PREFIX}time_to_first_token_seconds", {})
            _scalar(out, "prompt_tokens_total", "counter", "Prompt tokens evaluated.", self.prompt_tokens)
            _scalar(out, "generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens)
            _family(out, "generations_total", "counter", "Finished generations by finish reason.")
            for reason, n in sorted(self.generations.items()):
                out.append(f"{PREFIX}generations_total{_labels({'reason': reason})} {n}")
            _scalar(out, "batch_steps_total", "counter", "eval_batch calls.", self.steps)
            _scalar(
                out,
                "batch_tokens_total",
                "counter",
                "Tokens evaluated in eval_batch calls.",
                self.step_tokens,
            )
            _scalar(out, "batch_seconds_total", "counter", "Seconds spent in eval_batch.", self.step_seconds)
        for name, (help_text, value) in gauges.items():
            _scalar(out, name, "gauge", help_text, value)
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {PREFIX}{name} {help_text}")
    out.append(f"# TYPE {PREFIX}{name} {kind}")


def _scalar(out: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    _family(out, name, kind, help_text)
    out.append(f"{PREFIX}{name} {value!r}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
