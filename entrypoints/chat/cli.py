"""Talk to what a training run produced: an interactive chat in the terminal, or one answer as JSON for scripts.

    python -m entrypoints.chat --model s3://bucket/outputs/run1                 # interactive, streamed
    python -m entrypoints.chat --model .demo/opt-ml/work/output --prompt "Hi"   # one JSON object on stdout
    python -m entrypoints.chat --adapter s3://bucket/out --model ./llama-2-7b   # the adapter on a base given here

`--model` names a job's output (s3:// prefix or directory with manifest.json, a version series' root with
latest.json, a runs/<id>/ prefix, or its merged/ or adapter/ folder), a model directory, or a Hub id. From an output
the merged model is loaded when there is one, else the adapter on the base model the manifest names (whose files
must have the fingerprint the run trained on); every file loaded from an output is checked against the manifest's
sha256 first. Logs go to stderr. Exit codes: 0 (also /exit, Ctrl-D, Ctrl-C at the prompt), 2 a bad flag, 4 the
model (missing, damaged, incomplete output, adapter on another base), 5 storage; 130 when Ctrl-C stops a one-shot
answer (no answer was printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints import storage
from entrypoints.chat.session import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from entrypoints.chat.source import (
    PARTS,
    Result,
    check_base,
    default_cache_dir,
    fetch_part,
    find_result,
    is_result,
)
from entrypoints.errors import EXIT_OK, ConfigError, ModelError, run_guarded

log = logging.getLogger("qlora.chat")
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (SIGINT)
COMMANDS = "/reset starts the conversation over, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer"


@dataclass
class Loadable:
    """What to load: the model directory, the adapter (on that model) if any, and where they came from."""

    model_dir: Path
    adapter_dir: Path | None
    source: str
    part: str  # `merged`, `adapter` or `model` (a directory or Hub model loaded as it is)
    result: Result | None
    quantization: str = "none"  # of the loaded weights: none, nf4 or fp4


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m entrypoints.chat", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--model", default="", help="a job's output, a model directory or a Hub id; with --adapter, the"
                    " base model (default: the base the adapter's manifest or adapter_config.json names)")
    ap.add_argument("--adapter", default="", help="a LoRA adapter (a job's output, its adapter/ folder, a directory or"
                    " a Hub id) to load onto --model")
    ap.add_argument("--part", choices=("auto", *PARTS), default="auto",
                    help="which part of an output to load; auto: the merged model when there is one, else the adapter")
    ap.add_argument("--revision", default="", help="Hub revision of a Hub id (default: main, or the revision the"
                    " manifest records for the base model)")
    ap.add_argument("--system", default="", help="system prompt (default: none, or what the chat template adds)")
    ap.add_argument("--prompt", default=None, help="answer this one message and print one JSON object (answer, token"
                    " counts, timing) on stdout instead of chatting; `-` reads it from stdin")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 is greedy (default: the"
                    f" model's generation_config.json, else {DEFAULT_TEMPERATURE})")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's"
                    f" generation_config.json, else {DEFAULT_TOP_P})")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per answer (default: the model's"
                    f" generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                    help="weights' dtype; auto: bfloat16 (float16 without bf16 support) on a GPU, float32 on CPU")
    ap.add_argument("--quantization", choices=("auto", "none", "nf4", "fp4"), default="auto",
                    help="load the base model in 4 bits (bitsandbytes); auto: for an adapter from a job's output, as"
                    " the run trained on it (its manifest's quantization settings: the answers of the trained model),"
                    " else none (16-bit)")
    ap.add_argument("--s3-endpoint-url", default=os.environ.get("QLORA_S3_ENDPOINT_URL", ""),
                    help="endpoint of an S3-compatible store (default: QLORA_S3_ENDPOINT_URL, else AWS)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where files from S3 and the Hub are kept between"
                    " runs (default: $XDG_CACHE_HOME/qlora-job or ~/.cache/qlora-job)")
    ap.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="how much is logged on stderr (debug adds each prompt's size)")
    return ap


# ------------------------------------------------------------------------------------------- what to load
def resolve(args: argparse.Namespace, cache_dir: Path, token: str | None) -> Loadable:
    endpoint = args.s3_endpoint_url
    if args.adapter:
        return _adapter_on_base(args, cache_dir, token)
    if not args.model:
        raise ConfigError(["--model is required: a job's output, a model directory or a Hub id (or --adapter)"])
    result = find_result(args.model, endpoint)
    if result is None:
        folder = _plain_dir(args.model, args.revision, cache_dir, token)
        if (folder / "config.json").is_file():
            log.info("%s has no manifest.json: a model directory, loaded as it is (files not checked)", args.model)
            return Loadable(folder, None, args.model, "model", None)
        return _plain_adapter(folder, args, cache_dir, token, base="")
    log.info("result: %s", result.describe())
    part = args.part if args.part != "auto" else result.part_named or (result.parts[0] if result.parts else "merged")
    if part == "merged":
        return Loadable(fetch_part(result, "merged", cache_dir, endpoint), None, result.uri, "merged", result)
    adapter_dir = fetch_part(result, "adapter", cache_dir, endpoint)
    base = _manifest_base(result)
    base_dir = _base_dir(base["source"], args.revision or base["revision"], cache_dir, endpoint, token,
                         f"the base model recorded in {result.uri}'s manifest", result.uri)
    check_base(base_dir, result, base["source"])
    return Loadable(base_dir, adapter_dir, result.uri, "adapter", result)


def _adapter_on_base(args: argparse.Namespace, cache_dir: Path, token: str | None) -> Loadable:
    endpoint = args.s3_endpoint_url
    if args.part == "merged":
        raise ConfigError(["--part merged with --adapter: the adapter is what is loaded; drop one of them"])
    if args.model and is_result(args.model, endpoint):
        raise ConfigError([f"--model {args.model} is a job's output (it has a manifest): with --adapter, --model is"
                           " the base model the adapter goes onto. Give the base model, or drop --adapter"])
    result = find_result(args.adapter, endpoint)
    if result is None:
        return _plain_adapter(_plain_dir(args.adapter, "", cache_dir, token), args, cache_dir, token, base=args.model)
    log.info("adapter from: %s", result.describe())
    adapter_dir = fetch_part(result, "adapter", cache_dir, endpoint)
    base = _manifest_base(result)
    source = args.model or base["source"]
    base_dir = _base_dir(source, args.revision or (base["revision"] if not args.model else "main"), cache_dir,
                         endpoint, token, "--model" if args.model else f"the base model recorded in {result.uri}'s manifest",
                         args.adapter)
    check_base(base_dir, result, source)
    return Loadable(base_dir, adapter_dir, result.uri, "adapter", result)


def _plain_adapter(folder: Path, args: argparse.Namespace, cache_dir: Path, token: str | None, base: str) -> Loadable:
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder} holds neither a model (config.json) nor an adapter (adapter_config.json)")
    try:
        named = str(json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{config_file} cannot be read as an adapter config ({exc})") from None
    source = base or named
    if not source:
        raise ModelError(f"{config_file} names no base model: give it with --model")
    log.info("%s has no manifest.json: an adapter loaded as it is (files not checked) onto %s", folder, source)
    base_dir = _base_dir(source, args.revision or "main", cache_dir, args.s3_endpoint_url, token,
                         "--model" if base else f"the base model named in {config_file}", str(folder))
    return Loadable(base_dir, folder, str(folder), "adapter", None)


def _manifest_base(result: Result) -> dict[str, str]:
    recorded = result.manifest.get("base_model") or {}
    source = str(recorded.get("source") or "")
    if not source:
        raise ModelError(f"{result.uri}'s manifest records no base model for its adapter: give it with --adapter"
                         f" {result.uri} --model BASE")
    return {"source": source, "revision": str(recorded.get("revision") or "main")}


def _plain_dir(uri: str, revision: str, cache_dir: Path, token: str | None) -> Path:
    """A directory without a manifest: a local one as it is, a Hub repository downloaded (safetensors only)."""
    if Path(uri).is_dir():
        return Path(uri)
    from entrypoints.modeling import _from_hub

    return _from_hub(uri, revision or "main", cache_dir / "hub", token)


def _base_dir(source: str, revision: str, cache_dir: Path, endpoint: str, token: str | None, named: str,
              adapter: str = "ADAPTER") -> Path:
    """The base model's directory: downloaded from S3 or the Hub the way the job does (modeling.resolve_model)."""
    from entrypoints.config import JobConfig
    from entrypoints.modeling import HUB_ID, resolve_model

    if not storage.is_s3(source) and not Path(source).exists() and not HUB_ID.match(source):
        raise ModelError(f"{named} is {source!r}, which is not here (a path on the machine that trained it?): give"
                         f" the base model yourself: --adapter {adapter} --model BASE (a directory, an s3:// prefix or"
                         " a Hub id)")
    work = cache_dir / "bases" / hashlib.sha256(f"{source}@{revision}".encode()).hexdigest()[:16]
    return resolve_model(JobConfig(model=source, model_revision=revision, s3_endpoint_url=endpoint), work, token)


def base_quantization(choice: str, loadable: Loadable) -> Any:
    """The BitsAndBytesConfig to load the model with, or None (16-bit). `auto` reproduces the trained model for an
    adapter from a job's output: its base quantized as in training (the merged model already holds that round trip;
    docs/MERGE.md measures the difference)."""
    from entrypoints.config import JobConfig
    from entrypoints.modeling import quantization_config

    settings = (loadable.result.manifest.get("config") or {}) if loadable.result is not None else {}
    if choice == "auto":
        if loadable.adapter_dir is None or settings.get("quantization") not in ("nf4", "fp4"):
            return None
        choice = settings["quantization"]
        log.info("the adapter's base is loaded in %s, as the run trained on it (--quantization none: 16-bit)", choice)
    if choice == "none":
        return None
    return quantization_config(JobConfig(quantization=choice, double_quant=bool(settings.get("double_quant", True)),
                                         compute_dtype=str(settings.get("compute_dtype") or "auto")))


# ------------------------------------------------------------------------------------------- the two modes
def one_shot(loaded: Any, loadable: Loadable, args: argparse.Namespace, settings: Any) -> int:
    from entrypoints.chat.session import answer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ConfigError(["--prompt is empty: give the message to answer (or `-` to read it from stdin)"])
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    reply = answer(loaded, messages, settings)
    if reply.finish_reason == "interrupted":
        log.error("interrupted: no answer printed")
        return EXIT_INTERRUPTED
    print(json.dumps({
        "answer": reply.text, "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
        "seconds": round(reply.seconds, 3),
        "first_token_seconds": None if reply.first_token_seconds is None else round(reply.first_token_seconds, 3),
        "tokens_per_second": round(reply.completion_tokens / reply.seconds, 2) if reply.seconds > 0 else None,
        "model": loadable.source, "part": loadable.part, "quantization": loadable.quantization,
        "run": ((loadable.result.manifest.get("run") or {}).get("id") if loadable.result else None),
        "generation": {"temperature": settings.temperature, "top_p": settings.top_p,
                       "max_new_tokens": settings.max_new_tokens},
    }), flush=True)
    return EXIT_OK


def interactive(loaded: Any, loadable: Loadable, args: argparse.Namespace, settings: Any) -> int:
    """Read a message, stream the answer, keep the conversation; /reset, /exit, Ctrl-D and Ctrl-C at the prompt."""
    from entrypoints.chat.session import answer

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []
    sampling = "greedy" if settings.greedy else f"temperature {settings.temperature}, top-p {settings.top_p}"
    weights = "" if loadable.quantization == "none" else f" on a {loadable.quantization} base"
    print(f"chatting with {loadable.source} ({loadable.part}{weights}; {sampling}; up to {settings.max_new_tokens}"
          f" tokens per answer). {COMMANDS}.", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return EXIT_OK
        if text == "/reset":
            turns.clear()
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}: {COMMANDS})", flush=True)
            continue
        turns.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)

        def show(chunk: str) -> None:
            sys.stdout.write(chunk)
            sys.stdout.flush()

        try:
            reply = answer(loaded, system + turns, settings, on_text=show)
        except KeyboardInterrupt:  # a second Ctrl-C while the generation stops: leave
            print(flush=True)
            return EXIT_OK
        except ConfigError as exc:  # the message does not fit the context: say so, keep chatting
            turns.pop()
            print(f"\n({exc.problems[0]})", flush=True)
            continue
        print({"interrupted": " [stopped]", "length": " [cut: --max-new-tokens reached]"}.get(reply.finish_reason, ""),
              flush=True)
        turns.append({"role": "assistant", "content": reply.text})


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from entrypoints.secrets import REDACTOR, install_redactor
    from entrypoints.train import quiet_known_noise

    quiet_known_noise()  # the job's list of understood, harmless warnings (and no progress bars outside a terminal)

    token = os.environ.get("HF_TOKEN") or None
    if token:
        REDACTOR.add(token)
    install_redactor()
    state: dict[str, int] = {}

    def run() -> None:
        from entrypoints.chat.session import generation_settings, load

        try:
            cache_dir = args.cache_dir or default_cache_dir()
            loadable = resolve(args, cache_dir, token)
            quantization = base_quantization(args.quantization, loadable)
            loaded = load(loadable.model_dir, loadable.adapter_dir, args.dtype, quantization)
            loadable.quantization = quantization.bnb_4bit_quant_type if quantization is not None else "none"
            settings = generation_settings(getattr(loaded.model, "generation_config", None), args.temperature,
                                           args.top_p, args.max_new_tokens)
            mode = one_shot if args.prompt is not None else interactive
            state["code"] = mode(loaded, loadable, args, settings)
        except KeyboardInterrupt:
            # Ctrl-C is how a person leaves a chat (exit 0); a script's one-shot answer that never came is not a
            # success. (run_guarded would call it a preemption, which is the training job's meaning.)
            print(file=sys.stderr)
            state["code"] = EXIT_INTERRUPTED if args.prompt is not None else EXIT_OK

    code = run_guarded(run, lambda: None)
    return state.get("code", code) if code == EXIT_OK else code


if __name__ == "__main__":
    sys.exit(main())
