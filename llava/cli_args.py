"""Command-line flags shared by every entry point (run_llava, the CLI, the worker, benchmark generation), each
mapped onto one typed config. One definition per flag, so ``--help`` reads the same everywhere."""
from __future__ import annotations

import argparse
import logging

from llava.ecso.prompts import PROMPT_SETS, VERDICT_MODES
from llava.mm_utils import ASPECT_RATIOS

__all__ = ["add_model_args", "add_backend_args", "add_ecso_args", "add_decoding_args", "ecso_config_from_args",
           "backend_from_args", "setup_logging"]


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
                   help="checkpoint folder or hub id (llava-hf/llava-1.5-7b-hf, liuhaotian/llava-v1.5-7b); 'tiny' "
                        "(or 'tiny-original') builds a local random-weight test model whose outputs are random text")
    g.add_argument("--model-base", default=None, help="base model for LoRA checkpoints (merge them first; see README)")
    g.add_argument("--model-name", default=None,
                   help="name to report (default: the folder name); with --backend worker/openai, the served model")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype; auto: float16 on CUDA, float32 on CPU")
    g.add_argument("--load-8bit", action="store_true", help="8-bit weights (CUDA + bitsandbytes)")
    g.add_argument("--load-4bit", action="store_true", help="4-bit weights (CUDA + bitsandbytes)")
    g.add_argument("--conv-mode", default=None,
                   help="chat template (vicuna_v1, llava_v1, llava_llama_2, mistral_instruct, chatml_direct, plain); "
                        "default from the checkpoint's text model (vicuna_v1 for LLaVA-1.5)")
    g.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                   help="pad: pad to square with the image mean (LLaVA-1.5, the default); crop: the CLIP processor's "
                        "resize + center crop (llava-hf processors); resize: squash to a square")
    g.add_argument("--batch-size", type=int, default=16, help="rows per model call in batched steps")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="local", choices=["local", "worker", "openai"],
                   help="local: load the model in this process; worker: a LLaVA worker behind --controller-url; "
                        "openai: an OpenAI-compatible chat endpoint at --openai-base-url")
    g.add_argument("--controller-url", default="http://127.0.0.1:10000", help="controller for --backend worker")
    g.add_argument("--openai-base-url", default=None,
                   help="base URL (…/v1) for --backend openai (default: $OPENAI_BASE_URL); key from OPENAI_API_KEY")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds per remote request")


def add_decoding_args(p: argparse.ArgumentParser, temperature: float = 0.0, max_new_tokens: int = 1024) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1, help="beam count")
    g.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens,
                   help="new tokens per generated step")


def add_ecso_args(p: argparse.ArgumentParser, batch_levers: bool = True) -> None:
    """ECSO's flags; ``batch_levers=False`` leaves out the ones that only act on batch runs (not on streamed ones)."""
    g = p.add_argument_group("ECSO")
    g.add_argument("--verdict", default="score", choices=VERDICT_MODES,
                   help="score: P(yes) vs P(no) of the first answer token in one forward pass (default); exact: the "
                        "paper's code, flagged only if the answer is exactly 'yes'/'yes.'; parse: first word yes/no")
    g.add_argument("--threshold", type=float, default=0.5, help="score mode: flag when P(yes) >= threshold")
    g.add_argument("--prompt-set", default="paper", choices=sorted(PROMPT_SETS), help="ECSO prompt templates")
    g.add_argument("--image-in-safe-step", action="store_true",
                   help="keep the image in step 4 (the paper's utility scripts did; its safety scripts did not)")
    g.add_argument("--verdict-max-new-tokens", type=int, default=16,
                   help="exact/parse verdicts: tokens to generate (enough to tell 'yes.' from anything longer)")
    if batch_levers:
        g.add_argument("--speculative-caption", action="store_true",
                       help="generate the caption together with the direct answer (batched): flagged samples finish one "
                            "generation sooner, benign ones pay for an unused caption; pays off on GPUs, not CPUs")
        g.add_argument("--early-check-tokens", type=int, default=0, metavar="K",
                       help="also check the direct answer after its first K tokens and stop it there if flagged (a "
                            "flagged answer is discarded anyway); cuts flagged samples' cost, benign ones pay one more "
                            "check. Batch runs on the local backend; 0 = off (the paper checks whole answers only)")
        g.add_argument("--skip-check-regex", default=None, metavar="RE",
                       help="answers fully matching RE skip the harm check and pass, e.g. '\\(?[A-E]\\)?\\.?' for lone "
                            "option letters on multiple-choice benchmarks; default: every answer is checked (the paper)")


def ecso_config_from_args(args: argparse.Namespace):
    from llava.ecso.pipeline import ECSOConfig

    return ECSOConfig(verdict=args.verdict, threshold=args.threshold, prompt_set=args.prompt_set,
                      max_new_tokens=args.max_new_tokens, verdict_max_new_tokens=args.verdict_max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                      image_in_safe_step=args.image_in_safe_step,
                      speculative_caption=getattr(args, "speculative_caption", False),
                      early_check_tokens=getattr(args, "early_check_tokens", 0),
                      skip_check_regex=getattr(args, "skip_check_regex", None))


def backend_from_args(args: argparse.Namespace):
    from llava.ecso.backends import create_backend

    name = getattr(args, "backend", "local")
    if name == "local":
        return create_backend("local", model_path=args.model_path, conv_mode=args.conv_mode, device=args.device,
                              image_aspect_ratio=args.image_aspect_ratio, max_batch_size=args.batch_size,
                              model_base=args.model_base, model_name=args.model_name, load_8bit=args.load_8bit,
                              load_4bit=args.load_4bit, dtype=None if args.dtype == "auto" else args.dtype)
    if name == "worker":
        return create_backend("worker", controller_url=args.controller_url, model_name=args.model_name,
                              conv_mode=args.conv_mode, timeout=args.request_timeout,
                              image_aspect_ratio=args.image_aspect_ratio)
    return create_backend("openai", base_url=args.openai_base_url, model_name=args.model_name,
                          timeout=args.request_timeout, image_aspect_ratio=args.image_aspect_ratio)
