"""Loading a result for generation and answering a conversation with it, token by token.

    python -m entrypoints.chat --model URI        # (the CLI in entrypoints/chat/cli.py drives this module)

The model class follows config.json: an encoder-decoder (`is_encoder_decoder`, T5 say) loads with
AutoModelForSeq2SeqLM, anything else with AutoModelForCausalLM. A prompt is built with the job's own function for
sample answers (`templating.prompt_ids`), so it is formatted exactly as the run trained on it, with the chat template
saved next to the tokenizer in the output. An adapter is loaded onto its base with peft and merged into it in memory
(faster generation; the files are not changed). Generation runs in a thread that streams text to the caller through
transformers' TextIteratorStreamer; an interrupt stops it after the current token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.errors import ConfigError, ModelError
from entrypoints.modeling import check_loading_info, first_line

log = logging.getLogger("qlora.chat")

# Used where neither a flag nor the model's generation_config.json sets a value: sampling that stays close to the
# model's most likely answer (temperature 0 is greedy decoding).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float
    top_p: float
    max_new_tokens: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def kwargs(self) -> dict[str, Any]:
        if self.greedy:  # temperature/top_p would only draw transformers' "unused setting" warnings
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def generation_settings(generation_config: Any, temperature: float | None, top_p: float | None,
                        max_new_tokens: int | None) -> GenerationSettings:
    """A flag wins; else the model's generation_config.json where it sets the value (one that says do_sample=false
    means greedy); else the defaults above. Invalid values are a ConfigError naming the flag."""
    def configured(name: str) -> Any:
        return getattr(generation_config, name, None) if generation_config is not None else None

    if temperature is None:
        if configured("do_sample") is False:
            temperature = 0.0
        else:
            temperature = configured("temperature") if configured("temperature") is not None else DEFAULT_TEMPERATURE
    top_p = top_p if top_p is not None else configured("top_p") if configured("top_p") is not None else DEFAULT_TOP_P
    if max_new_tokens is None:
        max_new_tokens = configured("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    problems = []
    if temperature < 0:
        problems.append(f"--temperature={temperature}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p={top_p}: must be above 0 and at most 1")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens={max_new_tokens}: must be 1 or more")
    if problems:
        raise ConfigError(problems)
    return GenerationSettings(float(temperature), float(top_p), int(max_new_tokens))


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: float | None
    finish_reason: str  # `stop` (end of turn), `length` (max_new_tokens reached) or `interrupted`


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: str | None
    encoder_decoder: bool
    context_tokens: int | None  # how many tokens the model takes at once, when its config says


def default_dtype(device: str, name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: exact, and for small models as fast as bfloat16


def load(model_dir: Path, adapter_dir: Path | None, dtype_name: str = "auto", quantization: Any = None
         ) -> LoadedModel:
    """The model, its tokenizer and chat template. An adapter is merged into a 16-bit model in memory (faster
    answers); on a 4-bit model (`quantization`, a BitsAndBytesConfig: the base as the run trained on it) it stays a
    separate layer, as in training."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from entrypoints.modeling import quantized_shape_mismatches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = quantization.bnb_4bit_compute_dtype if quantization is not None else default_dtype(device, dtype_name)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}/config.json cannot be read as a model config ({first_line(exc)})") from None
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    weights = f"{quantization.bnb_4bit_quant_type}, compute " if quantization is not None else ""
    log.info("loading %s (%s, %s%s) on %s", model_dir, cls.__name__, weights, str(dtype).removeprefix("torch."),
             device)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "output_loading_info": True}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": 0 if device == "cuda" else "cpu"})
    try:
        model, info = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{model_dir}: the model cannot be loaded ({type(exc).__name__}: {first_line(exc)})") from None
    check_loading_info(model_dir, info, quantized_shape_mismatches(model))
    if adapter_dir is not None:
        model = _with_adapter(model, adapter_dir, merge=quantization is None)
    if quantization is None:
        model.to(device)
    model.eval()
    tokenizer_dir = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{tokenizer_dir}: the tokenizer cannot be loaded ({first_line(exc)})") from None
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template is None and not encoder_decoder:
        raise ModelError(f"{tokenizer_dir}: the tokenizer has no chat template (tokenizer_config.json or"
                         " chat_template.jinja), so a conversation cannot be formatted the way the model was trained."
                         " A result of a run on plain `text` records has none: it completes text, it does not chat")
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return LoadedModel(model, tokenizer, template, encoder_decoder, int(context) if context else None)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _with_adapter(model: Any, adapter_dir: Path, merge: bool) -> Any:
    """peft's LoRA layers on the base, every tensor of the adapter file loaded (none missing, none left over), then
    merged in when `merge`: an adapter of another architecture or shape is a ModelError, not a half-applied adapter."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{adapter_dir}: adapter_model.safetensors is missing (only safetensors adapters are loaded)")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelError(f"{adapter_dir}: the adapter does not fit this base model ({type(exc).__name__}:"
                         f" {first_line(exc)}). Give the base model it was trained on with --model") from None
    with safe_open(str(weights), framework="pt") as fh:
        saved = set(fh.keys())
    expected = set(get_peft_model_state_dict(peft_model).keys())
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise ModelError(f"{adapter_dir}: the adapter does not fit this base model: {len(extra)} of its tensors have no"
                         f" place in it ({', '.join(extra[:2])}) and {len(missing)} of its layers get no tensor"
                         f" ({', '.join(missing[:2])}). Give the base model it was trained on with --model")
    if not merge:
        log.info("adapter %s: %d tensors loaded, applied as in training (not merged into the 4-bit base)", adapter_dir,
                 len(saved))
        return peft_model
    log.info("adapter %s: %d tensors loaded; merged into the base in memory", adapter_dir, len(saved))
    return peft_model.merge_and_unload()


# ------------------------------------------------------------------------------------------- answering
def prompt_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the model's input ids. Without a chat template (an encoder-decoder trained on plain
    inputs, e.g. Flan-T5), the turns are written one per line, `role: text`, the latest user turn last."""
    from entrypoints.templating import prompt_ids as template_prompt_ids
    from entrypoints.templating import seq2seq_prompt_ids

    tokenizer = loaded.tokenizer
    if loaded.template is not None:
        return template_prompt_ids(tokenizer, loaded.template, messages)
    if loaded.encoder_decoder:  # the plain `role: text` input the job trained it on (templating.seq2seq_input)
        return seq2seq_prompt_ids(tokenizer, messages)
    if len(messages) == 1 or (len(messages) == 2 and messages[0]["role"] == "system"):
        text = "\n".join(m["content"] for m in messages)
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_context(loaded: LoadedModel, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt ids of the newest turns that fit the model's context with room for the answer, and how many of the
    oldest exchanges were left out (the system prompt always stays). A single message too long is a ConfigError."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = prompt_ids(loaded, system + turns)
        limit = loaded.context_tokens
        if limit is None or len(ids) + (0 if loaded.encoder_decoder else max_new_tokens) <= limit:
            return ids, dropped
        if len(turns) <= 1:
            raise ConfigError([f"the prompt is {len(ids)} tokens, and with --max-new-tokens={max_new_tokens} it does"
                               f" not fit the model's context of {limit} tokens: shorten the message (or the system"
                               " prompt), or lower --max-new-tokens"])
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # the oldest question and its answer
        dropped += 1


class _Interrupt:
    """A transformers StoppingCriteria (built lazily: this module imports torch only when a model is loaded)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def criteria(self):
        import torch
        from transformers import StoppingCriteria

        event = self.event

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

        return Stop()


def answer(loaded: LoadedModel, messages: list[dict[str, str]], settings: GenerationSettings,
           on_text: Callable[[str], None] | None = None) -> Reply:
    """Generate the assistant's next turn; `on_text` receives the text as it is decoded. A KeyboardInterrupt while
    waiting stops the generation after the current token and returns what was produced (finish_reason `interrupted`)."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    ids, dropped = fit_context(loaded, messages, settings.max_new_tokens)
    log.debug("prompt of %d tokens (%d message(s))", len(ids), len(messages))
    if dropped:
        log.warning("left the %d oldest exchange(s) out of the prompt: the conversation no longer fits the model's"
                    " context of %d tokens (/reset starts over)", dropped, loaded.context_tokens)
    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    interrupt = _Interrupt()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.inference_mode():
                result["ids"] = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([interrupt.criteria()]), **settings.kwargs())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            result["error"] = exc
            streamer.end()  # the caller waits on the streamer: let it go

    started = time.monotonic()
    first: float | None = None
    worker = threading.Thread(target=run, name="generate", daemon=True)
    worker.start()
    interrupted = False
    try:
        for text in streamer:
            if text and first is None:
                first = time.monotonic() - started
            if text and on_text is not None:
                on_text(text)
    except KeyboardInterrupt:
        interrupted = True
        interrupt.event.set()
    while worker.is_alive():
        worker.join(0.1)  # in steps, so a second Ctrl-C is not lost in a long join
    seconds = time.monotonic() - started
    if "error" in result:
        exc = result["error"]
        raise ModelError(f"generation failed: {type(exc).__name__}: {first_line(exc)}") from None
    out = result["ids"][0]
    new = out[1:] if loaded.encoder_decoder else out[len(ids):]  # an encoder-decoder's output starts with its start token
    new = [int(t) for t in new]  # one sequence: no padding to strip
    ended = bool(new) and new[-1] in eos
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    reason = "interrupted" if interrupted else "stop" if ended or len(new) < settings.max_new_tokens else "length"
    return Reply(text, len(ids), len(new), seconds, first, reason)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a turn: the generation config's, and the tokenizer's end-of-sequence token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
