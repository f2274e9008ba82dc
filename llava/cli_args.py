"""Command-line flags shared by every entry point (run_llava, the CLI, the worker, benchmark generation), each
mapped onto one typed config. One definition per flag, so ``--help`` reads the same everywhere."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from llava.constants import OPENAI_API_KEY_ENV, TINY_MARKER, TINY_MAX_NEW_TOKENS
from llava.ecso.backends import Backend
from llava.ecso.config import (DECODING_GROUP, ECSO_GROUP, ECSOConfig, add_option_args, ecso_config_from_args,
                               ecso_options)
from llava.ecso.registry import backend_names, create_backend
from llava.mm_utils import ASPECT_RATIOS

__all__ = ["add_model_args", "add_backend_args", "add_ecso_args", "add_decoding_args", "backend_from_args",
           "ecso_config", "is_tiny_model", "setup_logging"]

_ENTRY_MAX_NEW_TOKENS = "entry_max_new_tokens"  # the entry point's own default, used when the flag is not given


def setup_logging(verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = "tiny") -> None:
    g = p.add_argument_group("model (local backend)")
    g.add_argument("--model-path", default=default_model,
                   help="checkpoint folder or hub id: LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, liuhaotian/llava-v1.5-7b) "
                        "or any transformers vision-language model with a chat template (Qwen/Qwen2.5-VL-7B-Instruct, "
                        "llava-hf/llava-v1.6-mistral-7b-hf, HuggingFaceTB/SmolVLM-Instruct, google/gemma-3-4b-it); "
                        "'tiny' (or 'tiny-original', 'tiny-llava_next', 'tiny-qwen2_5_vl', 'tiny-idefics3', "
                        "'tiny-gemma3') builds a local random-weight test model whose outputs are random text"
                        + (f" (default {default_model})" if default_model else ""))
    g.add_argument("--model-base", default=None, help="base model for LoRA checkpoints (merge them first; see README)")
    g.add_argument("--model-name", default=None,
                   help="name to report (default: the folder name); with --backend worker/openai, the served model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype; auto: float16 on CUDA, float32 on CPU")
    g.add_argument("--load-8bit", action="store_true", help="8-bit weights (CUDA + bitsandbytes)")
    g.add_argument("--load-4bit", action="store_true", help="4-bit weights (CUDA + bitsandbytes)")
    g.add_argument("--conv-mode", default=None,
                   help="LLaVA chat template (vicuna_v1, llava_v1, llava_llama_2, mistral_instruct, chatml_direct, "
                        "plain); default from the checkpoint's text model (vicuna_v1 for LLaVA-1.5). Other families "
                        "render with their processor's chat template; for them this is the template their LLaVA-"
                        "protocol prompts arrive in (default vicuna_v1)")
    g.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                   help="LLaVA-1.5 only (other families' processors preprocess images themselves): pad: pad to "
                        "square with the image mean (the default); crop: the CLIP processor's resize + center crop "
                        "(llava-hf processors); resize: squash to a square")
    g.add_argument("--batch-size", type=int, default=16, help="rows per model call in batched steps (default %(default)s)")


def _positive(kind: type) -> object:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def add_backend_args(p: argparse.ArgumentParser, serving: bool = False) -> None:
    """``--backend`` and the flags of the remote backends. ``serving``: a model worker's (the backends that can
    serve one; its own ``--controller-url`` is where it registers)."""
    g = p.add_argument_group("backend")
    if serving:
        g.add_argument("--backend", default="local", choices=[n for n in backend_names() if n != "worker"],
                       help="local: load --model-path in this process; openai: a model served by OpenAI-compatible "
                            "servers at --openai-base-url (vLLM, SGLang, transformers serve): this worker is then an "
                            "ECSO guardrail in front of them (default %(default)s)")
    else:
        g.add_argument("--backend", default="local", choices=backend_names(),
                       help="local: load the model in this process; worker: a LLaVA worker behind --controller-url; "
                            "openai: an OpenAI-compatible chat endpoint at --openai-base-url (default %(default)s)")
        g.add_argument("--controller-url", default="http://127.0.0.1:10000",
                       help="controller for --backend worker (default %(default)s)")
    g.add_argument("--openai-base-url", nargs="+", default=None, metavar="URL",
                   help="--backend openai: base URL(s) up to /v1 of servers serving the same model; requests go "
                        "round robin to those that answer (default: $OPENAI_BASE_URL)")
    g.add_argument("--openai-model", default=None, metavar="ID",
                   help="--backend openai: the model id on those servers (default: the first id their /v1/models "
                        "lists)" + ("" if serving else "; --model-name works too"))
    g.add_argument("--openai-api-key-env", default=OPENAI_API_KEY_ENV, metavar="VAR",
                   help="--backend openai: the environment variable that holds the servers' API key (default "
                        "%(default)s; unset: no key). The key never goes on the command line")
    g.add_argument("--openai-top-logprobs", type=int, default=20, metavar="N",
                   help="--backend openai: first-token alternatives asked for when scoring yes/no (the score "
                        "verdict); the servers must allow that many (OpenAI and vLLM: 20) (default %(default)s)")
    g.add_argument("--upstream-retries", type=int, default=2, metavar="N",
                   help="--backend openai: other servers to try for a request that failed before any of its answer "
                        "was passed on (connection refused, 5xx, 429) (default %(default)s)")
    g.add_argument("--upstream-cooldown", type=_positive(float), default=10.0, metavar="S",
                   help="--backend openai: seconds a server that failed is skipped before it is tried again (a "
                        "429's Retry-After when given) (default %(default)g)")
    g.add_argument("--request-timeout", type=_positive(float), default=300.0,
                   help="seconds to wait for a remote answer and between pieces of its stream (default %(default)g)")


def add_decoding_args(p: argparse.ArgumentParser, temperature: float = 0.0, max_new_tokens: int = 1024) -> None:
    """The decoding options of :class:`~llava.ecso.config.ECSOConfig` (also a direct answer's), with this entry
    point's defaults; ``--max_new_tokens`` left out is ``max_new_tokens``, or ``TINY_MAX_NEW_TOKENS`` for a tiny
    random-weight model (see :func:`ecso_config`)."""
    add_option_args(p, ecso_options(lambda o: o.group == DECODING_GROUP), "decoding",
                    defaults={"temperature": temperature, "max_new_tokens": None},
                    default_text={"max_new_tokens": f"{max_new_tokens}; {TINY_MAX_NEW_TOKENS} for a tiny "
                                                    "random-weight --model-path, whose text is random"})
    p.set_defaults(**{_ENTRY_MAX_NEW_TOKENS: max_new_tokens})


def is_tiny_model(model_path: str | None) -> bool:
    """``model_path`` names a tiny random-weight model (``tiny``, ...) or a folder ``llava.model.tiny`` built."""
    if not model_path:
        return False
    from llava.model.tiny import is_tiny_name  # the model layer: loaded only when a model path is checked

    return is_tiny_name(model_path) or (Path(model_path).expanduser() / TINY_MARKER).is_file()


def ecso_config(args: argparse.Namespace, **overrides: Any) -> ECSOConfig:
    """:class:`ECSOConfig` from the parsed flags (``ecso_config_from_args``), with the answer length resolved: the
    flag when given, else the entry point's default, or ``TINY_MAX_NEW_TOKENS`` for a tiny random-weight model."""
    if getattr(args, "max_new_tokens", 0) is None:
        tiny = getattr(args, "backend", "local") == "local" and is_tiny_model(getattr(args, "model_path", None))
        args = argparse.Namespace(**{**vars(args), "max_new_tokens": TINY_MAX_NEW_TOKENS if tiny
                                     else getattr(args, _ENTRY_MAX_NEW_TOKENS)})
    return ecso_config_from_args(args, **overrides)


def add_ecso_args(p: argparse.ArgumentParser, batch_levers: bool = True, api_only: bool = False) -> None:
    """ECSO's flags; ``batch_levers=False`` leaves out the ones that only act on batch runs (not on streamed ones),
    ``api_only=True`` the ones an API request cannot carry (for front-ends that run ECSO through a worker)."""
    add_option_args(p, ecso_options(lambda o: o.group == ECSO_GROUP and (batch_levers or not o.batch_only)
                                    and (o.api or not api_only)), "ECSO")


def backend_from_args(args: argparse.Namespace) -> Backend:
    """The backend ``--backend`` names, built from the flags of :func:`add_model_args` and :func:`add_backend_args`."""
    name = args.backend
    if name == "local":
        return create_backend("local", model_path=args.model_path, conv_mode=args.conv_mode, device=args.device,
                              image_aspect_ratio=args.image_aspect_ratio, max_batch_size=args.batch_size,
                              model_base=args.model_base, model_name=args.model_name, load_8bit=args.load_8bit,
                              load_4bit=args.load_4bit, dtype=None if args.dtype == "auto" else args.dtype)
    if name == "worker":
        return create_backend("worker", controller_url=args.controller_url, model_name=args.model_name,
                              conv_mode=args.conv_mode, timeout=args.request_timeout,
                              image_aspect_ratio=args.image_aspect_ratio)
    if name == "openai":
        return create_backend("openai", base_url=args.openai_base_url, model_name=args.openai_model or args.model_name,
                              timeout=args.request_timeout, image_aspect_ratio=args.image_aspect_ratio,
                              api_key=os.environ.get(args.openai_api_key_env) or None, retries=args.upstream_retries,
                              cooldown=args.upstream_cooldown, top_logprobs=args.openai_top_logprobs)
    return create_backend(name)  # a registered backend without flags of its own
