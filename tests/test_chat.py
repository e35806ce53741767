"""Multi-turn chat (pipower.chat.ChatSession) and the `pipower chat` REPL.

The session keeps the conversation in one KV cache; a turn's reply must be token for token what the model
gives from scratch on the conversation as the session fed it (greedy), and that must be the chat template's
rendering of the conversation, with each reply kept as the tokens that were generated.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import pipower
from pipower.chat import ChatSession, _tail_after
from pipower.errors import ContextLengthError, InvalidArgumentError, TokenizerError

from helpers_models import write_tiny_gguf
from helpers_models import CHILD_CWD


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf")


@pytest.fixture(scope="module", params=["auto", "numpy"])
def tiny(request, tiny_path):
    return pipower.load(tiny_path, backend=request.param, progress=False)


def _content(model, ids):
    d = model.tokenizer.stream_decoder(strip_first_space=True)
    return "".join(d.feed(i) for i in ids) + d.flush()


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(tiny):
    tok = tiny.tokenizer
    s = ChatSession(tiny, system="Be brief.", max_tokens=12)
    t1 = s.send("hello there")
    reply1 = t1.text
    ids1 = s.ids
    assert t1.stats.prompt_tokens == len(ids1) - len(t1.reply_ids) and len(t1.reply_ids) == 12
    assert reply1 == _content(tiny, t1.reply_ids) and s.messages[-1] == {"role": "assistant", "content": reply1}

    t2 = s.send("and what now?")
    reply2 = t2.text
    reply2_ids = t2.reply_ids
    fed = s.ids[:len(s.ids) - len(reply2_ids)]
    assert fed[:len(ids1)] == ids1                            # the history is extended, not re-encoded
    # only the new tokens were read: the last reply token (never fed: max_tokens ended the turn) + the delta
    assert t2.stats.prompt_tokens == len(fed) - len(ids1) + 1
    # the reply equals the model's greedy continuation of the same ids from a fresh cache
    assert tiny.generate_ids(fed, max_tokens=12) == reply2_ids
    assert reply2 == _content(tiny, reply2_ids)
    # and those ids are the template's rendering of the conversation with reply 1 kept as generated tokens
    g1 = tok.apply_chat_template(s.messages[:2], add_generation_prompt=True)
    full2 = tok.apply_chat_template(s.messages[:4], add_generation_prompt=True)
    assert full2.startswith(g1 + reply1)
    n1 = len(ids1) - len(t1.reply_ids)
    assert fed == (tok.encode(g1, add_bos=None, parse_special=True) + t1.reply_ids
                   + tok.encode(full2[len(g1) + len(reply1):], add_bos=False, parse_special=True))
    assert fed[:n1] == tok.encode(g1, add_bos=None, parse_special=True)


def test_turns_that_end_at_the_end_of_turn_token(tiny_path):
    # eos = the template's end-of-turn token, as in real chat models: a reply that ends with it does not
    # leave that token in the cache; the next turn feeds it once, from the template's own text. Seed 14
    # makes the random model end its first two replies that way.
    eot = 265                                         # <|extra_1|>
    m = pipower.load(write_tiny_gguf(tiny_path.parent / "eot.gguf", seed=14, eos_token_id=eot), progress=False)
    assert m.tokenizer.encode("<|extra_1|>", add_bos=False, parse_special=True) == [eot]
    s = ChatSession(m, max_tokens=40)
    reasons = []
    for msg in ("one", "two", "three"):
        t = s.send(msg)
        t.text
        reasons.append(t.stats.stop_reason)
        fed = s.ids[:len(s.ids) - len(t.reply_ids)]
        assert m.generate_ids(fed, max_tokens=40) == t.reply_ids
        assert eot not in t.reply_ids
    assert reasons[:2] == ["eos", "eos"]
    text = m.tokenizer.apply_chat_template(s.messages[:-1], add_generation_prompt=True)
    assert s.rendered_context().count("<|extra_1|>") == text.count("<|extra_1|>") == 5


def test_interrupted_reply_stays_in_the_conversation(tiny):
    s = ChatSession(tiny, max_tokens=40)
    t = s.send("tell me a long story")
    pieces = []
    for p in t:
        pieces.append(p)
        if len(t.reply_ids) >= 5:
            break
    t.close()
    partial = list(t.reply_ids)
    assert 5 <= len(partial) < 40
    assert s.messages[-1] == {"role": "assistant", "content": _content(tiny, partial)}
    assert s.cache.length <= len(s.ids) and s.ids[-len(partial):] == partial
    t2 = s.send("go on")
    t2.text
    fed = s.ids[:len(s.ids) - len(t2.reply_ids)]
    assert tiny.generate_ids(fed, max_tokens=40) == t2.reply_ids


def test_a_turn_never_read_is_closed_by_the_next(tiny):
    s = ChatSession(tiny, max_tokens=6)
    s.send("first")                    # never iterated: nothing generated, nothing prefilled
    assert s.cache.length == 0
    t = s.send("second")
    t.text
    assert [m["content"] for m in s.messages] == ["first", "", "second",
                                                 _content(tiny, t.reply_ids)]
    fed = s.ids[:len(s.ids) - len(t.reply_ids)]
    assert t.stats.prompt_tokens == len(fed)       # the first turn's prompt was read now, with the second's
    assert tiny.generate_ids(fed, max_tokens=6) == t.reply_ids


def test_reset_and_system(tiny):
    s = ChatSession(tiny, system="You are a pirate.", max_tokens=6)
    s.send("hi").text
    s.reset()
    assert s.messages == [{"role": "system", "content": "You are a pirate."}] and s.ids == [] and s.cache.length == 0
    a = s.send("hi").text
    assert a == ChatSession(tiny, system="You are a pirate.", max_tokens=6).send("hi").text
    s.set_system("Be terse.")
    assert s.messages == [{"role": "system", "content": "Be terse."}] and s.ids == []
    assert s.send("hi").text == ChatSession(tiny, system="Be terse.", max_tokens=6).send("hi").text
    s.set_system(None)
    assert s.messages == [] and s.send("hi").text == ChatSession(tiny, max_tokens=6).send("hi").text


def test_a_template_that_rewrites_earlier_turns_rereads_the_conversation(tiny_path, caplog):
    m = pipower.load(tiny_path, progress=False)
    # the first line counts the messages, so every turn changes the text before the history
    m.tokenizer.chat_template = ("n={{ messages|length }}\n{% for m in messages %}<|extra_0|>{{ m['role'] }}\n"
                                 "{{ m['content'] }}<|extra_1|>\n{% endfor %}"
                                 "{% if add_generation_prompt %}<|extra_0|>assistant\n{% endif %}")
    s = ChatSession(m, max_tokens=6)
    s.send("one").text
    with caplog.at_level("INFO", logger="pipower"):
        t = s.send("two")
        t.text
    assert "re-reading the whole conversation" in caplog.text
    full = m.tokenizer.apply_chat_template(s.messages[:3], add_generation_prompt=True)
    fed = s.ids[:len(s.ids) - len(t.reply_ids)]
    assert fed == m.tokenizer.encode(full, add_bos=None, parse_special=True)
    assert t.stats.prompt_tokens == len(fed)
    assert m.generate_ids(fed, max_tokens=6) == t.reply_ids


def test_tail_after_a_trimming_template():
    assert _tail_after("P: hi<e>\n", "P: ", "hi") == "<e>\n"
    assert _tail_after("P: hi<e>\n", "P: ", "  hi \n") == "<e>\n"       # `| trim`: the cache keeps the spaces
    assert _tail_after("P: hi<e>\n", "P: ", "hi \n") == "<e>\n"
    assert _tail_after("Q: hi<e>\n", "P: ", "hi") is None                # the prefix changed: re-read
    assert _tail_after("P: [redacted]<e>\n", "P: ", "hi") is None


def test_context_full_is_an_error_and_keeps_the_session(tiny):
    s = ChatSession(tiny, max_tokens=4)
    s.send("short").text
    before = (s.ids, [dict(m) for m in s.messages])
    with pytest.raises(ContextLengthError, match="reset"):
        s.send("x " * 400)
    assert (s.ids, s.messages) == before
    s.send("again").text                 # still usable


def test_bad_arguments(tiny_path):
    m = pipower.load(tiny_path, progress=False)
    with pytest.raises(InvalidArgumentError):
        ChatSession(m, max_tokens=-1)
    with pytest.raises(InvalidArgumentError):
        ChatSession(m, temperature=-1)
    with pytest.raises(InvalidArgumentError):
        ChatSession(m).send(b"bytes")
    m.tokenizer.chat_template = None
    with pytest.raises(TokenizerError, match="chat template"):
        m.chat_session()


def test_seeded_sampling_repeats(tiny):
    def run():
        s = tiny.chat_session(max_tokens=8, temperature=0.9, top_k=20, seed=7)
        return [s.send(t).text for t in ("a", "b")]
    assert run() == run()


def test_real_model_turn_two_equals_the_reencoded_conversation():
    try:
        path = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch SmolLM2: {e}")
    m = pipower.load(path)
    s = m.chat_session(max_tokens=24)
    s.send("Who wrote Romeo and Juliet?").text
    t2 = s.send("And who wrote Hamlet?")
    reply2 = t2.text
    tok = m.tokenizer
    text = tok.apply_chat_template(s.messages[:-1], add_generation_prompt=True)
    reencoded = tok.encode(text, add_bos=None, parse_special=True)
    fed = s.ids[:len(s.ids) - len(t2.reply_ids)]
    assert fed == reencoded            # a real model's greedy reply is the canonical encoding of its text
    assert m.generate_ids(reencoded, max_tokens=24) == t2.reply_ids
    assert m.chat(s.messages[:-1], max_tokens=24) == reply2
    assert "Hamlet" in reply2 and "Shakespeare" in reply2      # turn two answers the second question


# ---- the REPL --------------------------------------------------------------------------------------------

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONIOENCODING": "utf-8"}


def _chat(*args, stdin: bytes, timeout=120):
    return subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "chat", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=ENV)


def test_repl_streams_the_session_and_runs_the_commands(tiny_path):
    lines = ["hello there", "/system Be brief.", "hi", "and then?", "/help", "/bogus", "/reset",
             "two\\", "lines", "//slash", "", "/exit", "never read"]
    out = _chat("-m", str(tiny_path), "-n", "8", "--timings", stdin="\n".join(lines).encode() + b"\n")
    assert out.returncode == 0, out.stderr
    err = out.stderr.decode()
    assert "Traceback" not in err
    assert "unknown command /bogus" in err and "/system TEXT" in err and "conversation cleared" in err
    m = pipower.load(tiny_path, progress=False)
    expected = []
    s = m.chat_session(max_tokens=8)
    expected.append(s.send("hello there").text)
    s.set_system("Be brief.")
    expected += [s.send("hi").text, s.send("and then?").text]
    s.reset()
    expected += [s.send("two\nlines").text, s.send("/slash").text]
    assert out.stdout.decode("utf-8") == "".join(e + "\n" for e in expected)
    assert err.count("[read ") == 5


def test_repl_ends_at_end_of_input_and_reports_bad_lines(tiny_path):
    out = _chat("-m", str(tiny_path), "-n", "3", stdin=b"ok\n\xff\xfe bad\nfine")
    err = out.stderr.decode()
    assert out.returncode == 0 and "Traceback" not in err
    assert "not valid UTF-8" in err and out.stdout.decode().count("\n") == 2


def test_repl_without_a_chat_template_is_a_one_line_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "plain.gguf", extra_kv={"tokenizer.chat_template": ""})
    out = _chat("-m", str(path), stdin=b"hi\n")
    err = out.stderr.decode().strip()
    assert out.returncode == 1 and "chat template" in err and "\n" not in err and "Traceback" not in err


def test_help_explains_the_flags():
    out = subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "chat", "--help"], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 0
    for flag in ("-m", "-t", "--weights", "--dot", "--backend", "--temp", "--top-k", "--top-p", "-s", "-n",
                 "--system", "/reset", "/system", "/exit", "Ctrl-C"):
        assert flag in out.stdout


class _Repl:
    """A `pipower chat` process fed through a pipe, its output collected as it comes."""

    def __init__(self, *args):
        self.p = subprocess.Popen(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "chat", *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        self.out, self.err = bytearray(), bytearray()
        for stream, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream, buf):
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def send(self, text: str):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def wait_for(self, what, deadline_s=120.0):
        end = time.monotonic() + deadline_s
        while not what():
            if time.monotonic() > end or self.p.poll() is not None and not what():
                raise AssertionError(f"gave up waiting; stdout {bytes(self.out)[-300:]!r} stderr {bytes(self.err)!r}")
            time.sleep(0.01)

    def finish(self):
        try:
            return self.p.wait(timeout=120)
        finally:
            if self.p.poll() is None:
                self.p.kill()


@pytest.fixture(scope="module")
def slow_path(tmp_path_factory):
    # long answers: no end-of-turn token can win (endless), a 4096-token context and -n 4000 keep the model
    # talking while the test interrupts it. Sized for ~5 s of talk on two busy cores: at 256 / 1024 it
    # answered 4000 tokens in 1.6 s, and once, with a benchmark beside it, before the test's SIGINT came
    return write_tiny_gguf(tmp_path_factory.mktemp("slow") / "slow.gguf", hidden_size=512, intermediate_size=2048,
                           max_position_embeddings=4096, endless=True)


def test_ctrl_c_stops_the_answer_and_keeps_the_session(slow_path):
    r = _Repl("-m", str(slow_path), "-n", "4000", "--backend", "numpy", "--timings")
    try:
        r.wait_for(lambda: b"/help lists commands" in r.err)
        r.send("tell me everything\n")
        r.wait_for(lambda: len(r.out) > 0)
        r.p.send_signal(signal.SIGINT)
        r.wait_for(lambda: b"[stopped" in r.err)
        first = bytes(r.out)
        r.send("and more\n")
        r.wait_for(lambda: len(r.out) > len(first) + 1)
        r.p.send_signal(signal.SIGINT)
        r.wait_for(lambda: r.err.count(b"[stopped") == 2)
        r.send("/exit\n")
        assert r.finish() == 0
    finally:
        if r.p.poll() is None:
            r.p.kill()
    err = bytes(r.err).decode()
    assert "Traceback" not in err
    # the second answer read only its new tokens: the first (partial) answer was kept in the cache
    stats = [line for line in err.splitlines() if line.startswith("[read ")]
    assert len(stats) == 2 and "stop: interrupted" in stats[0] and "stop: interrupted" in stats[1]
    conv1 = int(stats[0].split("conversation ")[1].split()[0])
    read2 = int(stats[1].split("[read ")[1].split()[0])
    conv2 = int(stats[1].split("conversation ")[1].split()[0])
    answer2 = int(stats[1].split("answer ")[1].split()[0])
    assert read2 < conv1 and conv2 >= conv1 + answer2


def test_ctrl_c_twice_at_the_prompt_quits(tiny_path):
    r = _Repl("-m", str(tiny_path))
    try:
        r.wait_for(lambda: b"/help lists commands" in r.err)
        r.p.send_signal(signal.SIGINT)
        r.wait_for(lambda: b"Ctrl-C again" in r.err)
        r.p.send_signal(signal.SIGINT)
        assert r.finish() == 130
    finally:
        if r.p.poll() is None:
            r.p.kill()
    assert b"Traceback" not in r.err
