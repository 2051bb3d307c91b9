"""`python -m entrypoints.chat` as a user meets it: a chat in a real pseudo-terminal, one-shot JSON for scripts from an
output on the real S3 server (found by its manifest, every file's sha256 checked), an encoder-decoder result, and
each bad input as a clear error with the documented exit code.

Models: SmolLM2-135M-Instruct (a real chat model: its answers can be checked) and the tiny random Llama 2 with a real
PEFT adapter, both from .cache; a tiny random T5 made here. Outputs are written with the job's own card and manifest
writers (tests/results.py) instead of training, to keep this fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from entrypoints import storage
from entrypoints.config import JobConfig
from entrypoints.demo.assets import smollm2
from entrypoints.errors import EXIT_MODEL, EXIT_STORAGE
from entrypoints.outputs import MANIFEST, OutputTarget, advance_latest

from ..results import finish, link_model, make_adapter, upload

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "20261130T000000Z-abc123"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "HF_"))}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "HF_HOME": str(tmp_path / "hf-home")})
    env.update(extra)
    return env


def chat(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.chat", *args], env=env or _env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smol_output(cache_dir, tmp_path_factory) -> Path:
    """A local output whose merged model is SmolLM2-135M-Instruct (its chat template saved with the tokenizer)."""
    stage = tmp_path_factory.mktemp("smol-output")
    link_model(smollm2(cache_dir), stage / "merged")
    finish(stage, JobConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", run_name="smol"), None)
    return stage


class Terminal:
    """A process on a pseudo-terminal: what it prints arrives in the chunks it was written in, as a user sees it."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()

        def controlling_terminal() -> None:  # as a shell does: Ctrl-C and Ctrl-D then mean what they mean to a user
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {**env, "TERM": "dumb"}  # readline without bracketed-paste escapes around the prompt
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                     preexec_fn=controlling_terminal)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 180) -> tuple[str, list[str]]:
        """Read until `pattern` (a regex) appears; -> the text up to its end, and the chunks it arrived in."""
        chunks: list[str] = []
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} did not appear; the terminal showed:\n{self.seen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process ended and closed the terminal
                    data = ""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.seen[-3000:]}")
                chunks.append(data)
                self.seen += data
        text, self.seen = self.seen[:found.end()], self.seen[found.end():]
        return text, chunks

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        os.close(self.master)
        return code


def _ask(term: Terminal, message: str) -> tuple[int, str, list[str]]:
    """Type a message; -> the prompt's size (the chat's debug log), the answer as shown, the chunks it came in."""
    term.send(message + "\n")
    term.expect(r"model> ")
    text, _ = term.expect(r"prompt of \d+ tokens[^\n]*\n")
    tokens = int(re.search(r"prompt of (\d+) tokens", text)[1])
    answer, chunks = term.expect(r"\r?\nyou> ")
    return tokens, answer.removesuffix("you> ").strip(), chunks


# ------------------------------------------------------------------------------------------- interactive
def test_interactive_chat_streams_resets_and_exits_cleanly(smol_output, tmp_path):
    term = Terminal([sys.executable, "-m", "entrypoints.chat", "--model", str(smol_output), "--temperature", "0",
                     "--max-new-tokens", "200", "--log-level", "debug"], _env(tmp_path))
    banner, _ = term.expect(r"you> ")
    assert "(merged; greedy; up to 200 tokens per answer)" in banner and "/reset" in banner
    assert f"file(s) of {smol_output}: sha256 as in the manifest" in banner

    first_prompt, answer, chunks = _ask(term, "What is the capital of France?")
    assert "Paris" in answer, answer
    # Streamed: the answer reached the terminal in several writes, not as one block at the end.
    assert len([c for c in chunks if c.strip()]) >= 2, chunks

    second_prompt, _, _ = _ask(term, "And of Italy?")
    assert second_prompt > first_prompt + 10  # the first exchange is part of the prompt now

    term.send("/reset\n")
    term.expect(r"\(conversation cleared\)")
    term.expect(r"you> ")
    again_prompt, again, _ = _ask(term, "What is the capital of France?")
    assert again_prompt == first_prompt and again == answer  # the conversation started over

    # Ctrl-C while it answers stops that answer; the chat goes on.
    term.send("Write a long story about a cat who sails around the world.\n")
    term.expect(r"prompt of \d+ tokens[^\n]*\n")
    term.expect(r"\w{3,}")  # the answer has started
    term.send("\x03")
    term.expect(r"\[stopped\]")
    term.expect(r"you> ")
    term.send("/exit\n")
    assert term.wait() == 0
    assert "Traceback" not in term.seen


@pytest.mark.parametrize("key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_at_the_prompt_exit_0(smol_output, tmp_path, key):
    term = Terminal([sys.executable, "-m", "entrypoints.chat", "--model", str(smol_output)], _env(tmp_path))
    term.expect(r"you> ")
    # readline prints the prompt before it waits for a key: a SIGINT in between is seen by Python only at the next
    # interrupted wait (CPython's readline loop checks signals on EINTR), so the key comes once the chat waits.
    time.sleep(1.0)
    term.send(key)
    assert term.wait() == 0
    assert "Traceback" not in term.seen


# ------------------------------------------------------------------------------------------- one-shot, from S3
def _reference_answer(base_dir: Path, adapter_dir: Path, prompt: str, max_new_tokens: int, with_adapter: bool = True,
                      quantized: bool = True) -> tuple[str, int]:
    """What the trained model answers greedily, computed here with transformers and peft directly: the base in 4 bits
    as the job trains it (nf4, double quantization, bfloat16 compute on CPU) with the adapter as a separate layer, or
    the 16-bit base with the adapter merged in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from entrypoints.templating import prompt_ids

    if quantized:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                     device_map={"": "cpu"})
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if with_adapter:
        model = PeftModel.from_pretrained(model, adapter_dir)
        model = model if quantized else model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # with the chat template the adapter was trained with
    ids = prompt_ids(tokenizer, tokenizer.chat_template, [{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip(), len(ids)


def test_one_shot_json_from_s3_checks_every_file_against_the_manifest(s3_env, tiny_model, tmp_path):
    server, bucket = s3_env
    endpoint = server.endpoint
    base_uri, series = f"s3://{bucket}/models/tiny", f"s3://{bucket}/outputs/series"
    run_uri = f"{series}/runs/{RUN_ID}"
    storage.upload_tree(tiny_model, base_uri, endpoint_url=endpoint)
    # An adapter-only result (QLORA_MERGE=false): the chat loads the base the manifest names, from S3.
    stage = tmp_path / "stage"
    adapter = make_adapter(tiny_model, stage / "adapter")
    finish(stage, JobConfig(model=base_uri, merge=False, run_name="tiny"), tiny_model, RUN_ID)
    upload(stage, run_uri, endpoint)
    advance_latest(OutputTarget(run_uri, series, True, False, RUN_ID, 1_795_996_800.0),
                   storage.join(run_uri, MANIFEST), "2026-11-30T00:00:01Z", endpoint)
    env = _env(tmp_path, **server.env(), QLORA_S3_ENDPOINT_URL=endpoint)
    expected, prompt_tokens = _reference_answer(tiny_model, adapter, "Name three colours.", 12)
    base_only, _ = _reference_answer(tiny_model, adapter, "Name three colours.", 12, with_adapter=False)
    assert expected != base_only  # so the answer below shows the adapter was applied
    expected_16bit, _ = _reference_answer(tiny_model, adapter, "Name three colours.", 12, quantized=False)

    # The series' root: latest.json names the run.
    out = chat(tmp_path, "--model", series, "--prompt", "Name three colours.", "--temperature", "0",
               "--max-new-tokens", "12", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)  # stdout is the one JSON object; the logs are on stderr
    assert got["answer"] == expected and got["prompt_tokens"] == prompt_tokens
    assert 0 < got["completion_tokens"] <= 12 and got["finish_reason"] in ("stop", "length")
    assert got["part"] == "adapter" and got["run"] == RUN_ID and got["model"] == run_uri
    assert got["quantization"] == "nf4"  # the base as the run trained on it (its manifest's settings)
    assert got["seconds"] > 0 and got["first_token_seconds"] <= got["seconds"]
    assert got["generation"] == {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 12}
    assert f"{series}/latest.json names the newest run: {run_uri}" in out.stderr
    assert "fingerprint matches the one the adapter was trained on" in out.stderr
    assert "sha256 as in the manifest" in out.stderr

    # The run's adapter/ folder names the same result; the base given explicitly (a plain S3 prefix) is checked too.
    # With --quantization none the adapter is merged into the 16-bit base.
    out = chat(tmp_path, "--adapter", f"{run_uri}/adapter/", "--model", base_uri, "--prompt", "Name three colours.",
               "--temperature", "0", "--max-new-tokens", "12", "--quantization", "none", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["answer"] == expected_16bit and got["quantization"] == "none"
    assert "fingerprint matches the one the adapter was trained on" in out.stderr

    # The adapter on another base than the one it was trained on: refused before loading.
    out = chat(tmp_path, "--adapter", run_uri, "--model", str(tmp_path / "other-base"), "--prompt", "x", env=env)
    assert out.returncode == EXIT_MODEL and "no such file or directory" not in out.stderr
    link_model(tiny_model, tmp_path / "other-base")
    (tmp_path / "other-base" / "generation_config.json").unlink()  # other files: another fingerprint
    out = chat(tmp_path, "--adapter", run_uri, "--model", str(tmp_path / "other-base"), "--prompt", "x", env=env)
    assert out.returncode == EXIT_MODEL, out.stderr[-2000:]
    assert re.search(rf"model error: the base model {re.escape(str(tmp_path / 'other-base'))} is not the one the"
                     rf" adapter of {re.escape(run_uri)} was trained on: its files' fingerprint is [0-9a-f]{{64}}, where"
                     r" the manifest records [0-9a-f]{64}", out.stderr), out.stderr[-2000:]

    # A file changed after publishing (same size, other bytes): named with both sha256s; nothing is loaded.
    weights = f"{run_uri}/adapter/adapter_model.safetensors"
    data = bytearray((stage / "adapter" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    storage.upload_file(bad, weights, endpoint_url=endpoint)
    out = chat(tmp_path, "--model", series, "--prompt", "x", "--cache-dir", str(tmp_path / "fresh-cache"), env=env)
    assert out.returncode == EXIT_MODEL, out.stderr[-2000:]
    assert (f"model error: {weights} is not the file the manifest lists: {len(data):,} bytes with sha256" in out.stderr
            and "It was changed or damaged after the run published it: nothing was loaded" in out.stderr)
    assert "loading" not in out.stderr and out.stdout == ""


def test_bad_sources_are_clear_errors(s3_env, tmp_path):
    server, bucket = s3_env
    env = _env(tmp_path, **server.env(), QLORA_S3_ENDPOINT_URL=server.endpoint)
    storage.write_text(f"s3://{bucket}/half/adapter/adapter_config.json", "{}", endpoint_url=server.endpoint)
    out = chat(tmp_path, "--model", f"s3://{bucket}/half", "--prompt", "x", env=env)
    assert out.returncode == EXIT_MODEL
    assert (f"model error: s3://{bucket}/half holds no manifest.json (and no latest.json): it holds"
            " adapter/adapter_config.json. A job's output is complete only once its manifest is written last") in out.stderr

    out = chat(tmp_path, "--model", "s3://no-such-bucket-for-chat/out", "--prompt", "x", env=env)
    assert out.returncode == EXIT_STORAGE and "storage error: bucket of s3://no-such-bucket-for-chat" in out.stderr

    out = chat(tmp_path, "--model", str(tmp_path / "missing" / "out"), "--prompt", "x", env=env)
    assert out.returncode == EXIT_MODEL
    assert f"model error: {tmp_path / 'missing' / 'out'}: no such file or directory" in out.stderr
    for result in (out,):
        assert "Traceback" not in result.stderr


def test_an_unlisted_file_in_a_local_output_is_refused(smol_output, tmp_path):
    stage = tmp_path / "out"
    link_model(smol_output / "merged", stage / "merged")
    os.symlink(smol_output / MANIFEST, stage / MANIFEST)
    (stage / "merged" / "extra.safetensors").write_bytes(b"\0" * 16)
    out = chat(tmp_path, "--model", str(stage), "--prompt", "x")
    assert out.returncode == EXIT_MODEL
    assert (f"model error: {stage / 'merged' / 'extra.safetensors'} is not listed in {stage / MANIFEST}: it would be"
            " loaded unchecked") in out.stderr


# ------------------------------------------------------------------------------------------- encoder-decoder
def _tiny_t5(dest: Path) -> Path:
    """A random 2-layer T5 with a byte-level tokenizer (every byte a token, no merges) and no chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for byte_char in pre_tokenizers.ByteLevel.alphabet():
        vocab[byte_char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    # Random weights may answer <pad>, </s> or whitespace (an empty answer after strip(), seen on one machine):
    # only ASCII letters and digits keep their rows, and one of them is the negation of another, so for any
    # decoder state some letter scores above every zeroed row and the greedy answer is printable on every machine.
    keep = [vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c.isascii() and c.isalnum()]
    with torch.no_grad():
        mask = torch.zeros(len(vocab), dtype=torch.bool)
        mask[keep] = True
        model.lm_head.weight[~mask] = 0.0
        model.lm_head.weight[keep[1]] = -model.lm_head.weight[keep[0]]
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_an_encoder_decoder_result_loads_with_the_seq2seq_class(tmp_path):
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from entrypoints.templating import seq2seq_prompt_ids

    stage = tmp_path / "t5-output"
    model_dir = _tiny_t5(stage / "merged")
    finish(stage, JobConfig(model="google/flan-t5-small", run_name="t5"), None)
    out = chat(tmp_path, "--model", str(stage), "--prompt", "Translate to German: hello", "--temperature", "0",
               "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert "(AutoModelForSeq2SeqLM, float32)" in out.stderr and got["part"] == "merged"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The encoder's input as the job trains it: the question, then EOS (templating.seq2seq_prompt_ids)
    ids = seq2seq_prompt_ids(tokenizer, [{"role": "user", "content": "Translate to German: hello"}])
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        ref = T5ForConditionalGeneration.from_pretrained(model_dir).generate(torch.tensor([ids]), max_new_tokens=6,
                                                                             do_sample=False)
    assert got["prompt_tokens"] == len(ids) and got["completion_tokens"] == len(ref[0]) - 1  # minus the start token
    assert got["answer"] == tokenizer.decode(ref[0, 1:], skip_special_tokens=True).strip() != ""
