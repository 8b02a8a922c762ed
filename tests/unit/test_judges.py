"""Judges: the OpenAI-compatible client against a local stub server (ordering, retries, timeout, down), the
reward-model judge on a tiny saved model, the per-prompt file and the prompt-set errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefopt.errors import ConfigError, DataError
from prefopt.mathloop.judging.judges import OpenAIJudge, parse_verdict
from prefopt.mathloop.judging.pairwise import judge_prompts, judged_evaluation, reference_answers


class Stub:
    """A chat-completions stub on 127.0.0.1: `behave(content, n)` returns (status, reply text, delay)."""

    def __init__(self, behave, max_requests: int = 50, lifetime_s: float = 30.0):
        self.behave, self.seen = behave, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                stub.seen.append((self.path, body["model"], content))
                status, text, delay = stub.behave(content, len(stub.seen))
                time.sleep(delay)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.2
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        deadline = time.monotonic() + lifetime_s

        def serve():  # bounded: stops after max_requests or lifetime_s even if nobody stops it
            while len(self.seen) < max_requests and time.monotonic() < deadline and not self.stopped:
                self.server.handle_request()
            self.server.server_close()

        self.stopped = False
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopped = True
        self.thread.join(timeout=5)


@pytest.fixture
def stub():
    made = []

    def make(behave, **kw):
        made.append(Stub(behave, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def prefers_good(content, n):
    """A fair judge: picks whichever slot holds the answer containing 'good'."""
    a = content.split("[Answer A]")[1].split("[Answer B]")[0]
    return 200, "[[A]]" if "good" in a else "[[B]]", 0.0


def judge_at(url, **kw):
    return OpenAIJudge(base_url=url, model="judge-1", api_key_env=None, backoff_s=0.01, **kw)


def test_both_orders_asked_and_combined(stub):
    server = stub(prefers_good)
    rows = judge_at(server.url).judge(["q1", "q2"], ["good one", "meh"], ["bad", "good two"])
    assert [r["preference"] for r in rows] == [1.0, 0.0]
    assert [(r["verdict_policy_first"], r["verdict_policy_second"]) for r in rows] == [("A", "B"), ("B", "A")]
    assert len(server.seen) == 4 and all(p == "/v1/chat/completions" and m == "judge-1" for p, m, _ in server.seen)
    first, second = server.seen[0][2], server.seen[1][2]  # policy as A, then as B
    assert first.index("good one") < first.index("bad") and second.index("bad") < second.index("good one")


def test_position_bias_cancels(stub):
    server = stub(lambda content, n: (200, "I prefer [[A]]", 0.0))
    rows = judge_at(server.url).judge(["q"], ["x"], ["y"])
    assert rows[0]["preference"] == 0.5


def test_retries_after_server_errors(stub):
    server = stub(lambda content, n: (503, "", 0.0) if n <= 2 else (200, "[[C]]", 0.0))
    judge = judge_at(server.url, retries=2)
    client = judge.client()
    assert parse_verdict(client.complete("hi")) == "C" and client.attempts == 3


def test_timeout_then_one_error_naming_the_url(stub):
    server = stub(lambda content, n: (200, "[[A]]", 1.0))
    with pytest.raises(
        ConfigError,
        match=rf"judge endpoint {server.url}/chat/completions did not answer after 2 "
        rf"attempts \(no answer within evaluation.judge.timeout_s=0.2\)",
    ):
        judge_at(server.url, timeout_s=0.2, retries=1).judge(["q"], ["a"], ["b"])


def test_endpoint_down_is_named():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConfigError, match=f"judge endpoint {url}/chat/completions did not answer after 1 attempts"):
        judge_at(url, retries=0).judge(["q"], ["a"], ["b"])


def test_replaceable_prompt_must_have_its_slots(tmp_path, stub):
    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better? {answer_a}")
    with pytest.raises(ConfigError, match=r"lacks \{instruction\}, \{answer_b\}"):
        judge_at("http://127.0.0.1:1/v1", prompt_template=str(bad))
    good = tmp_path / "good.txt"
    good.write_text("Q: {instruction}\n[Answer A]\n{answer_a}\n[Answer B]\n{answer_b}\nSay [[A]] or [[B]].")
    server = stub(prefers_good)
    assert judge_at(server.url, prompt_template=str(good)).judge(["q"], ["good"], ["bad"])[0]["preference"] == 1.0
    assert server.seen[0][2].startswith("Q: q\n")


class FixedJudge:
    resamples, seed = 50, 0

    def describe(self):
        return {"judge": "fixed"}

    def judge(self, prompts, policy, baseline, device):
        return [{"preference": p} for p in (1.0, 0.5, 0.0, 1.0)]


def test_judged_evaluation_writes_rows_and_metrics(tmp_path):
    metrics, details = judged_evaluation(
        FixedJudge(),
        ["a", "b", "c", "d"],
        ["xx", "y", "zzz", "w"],
        ["x", "y", "z", "w"],
        "cpu",
        tmp_path / "judged.jsonl",
    )
    assert metrics["eval/judge/win_rate"] == 0.625 and metrics["eval/judge/policy_length"] == 1.75
    assert details["judge"] == "fixed" and details["ties"] == 1
    rows = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert rows[2] == {
        "index": 2,
        "prompt": "c",
        "policy": "zzz",
        "baseline": "z",
        "policy_length": 3,
        "baseline_length": 1,
        "preference": 0.0,
    }


def test_prompt_set_without_its_field_is_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"instruction": "no prompt"}) + "\n")
    settings = judge_at("http://127.0.0.1:1/v1", prompts=str(path))
    with pytest.raises(
        DataError, match=r"prompts.jsonl: row 2: no text field 'prompt' \(evaluation.judge.prompt_field=prompt\)"
    ):
        judge_prompts(settings, [])
    settings.limit = 1
    assert judge_prompts(settings, []) == ["hi"]
    settings.prompts = None
    assert judge_prompts(settings, [{"problem": "1+1"}, {"problem": "2+2"}]) == ["1+1"]
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"output": "ref"}) + "\n")
    settings.baseline = str(refs)
    assert reference_answers(settings, 1) == ["ref"]
    with pytest.raises(DataError, match="1 reference answers for 2 prompts"):
        reference_answers(settings, 2)
