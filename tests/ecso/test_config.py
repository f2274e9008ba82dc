"""ECSO's options are declared once (llava/ecso/config.py); the flags, the API's request model, the demo's panel and
the config's own checks are generated from the declarations."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from llava.cli_args import add_decoding_args, add_ecso_args, ecso_config
from llava.ecso.config import ECSOConfig, ecso_config_from_args, ecso_options
from llava.errors import InvalidRequestError
from llava.serve.gradio_web_server_ecso import PANEL_OPTIONS, DemoConfig
from llava.serve.protocol.ecso import ECSOOptions


def _parser(batch_levers: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_decoding_args(p, temperature=0.2, max_new_tokens=64)
    add_ecso_args(p, batch_levers=batch_levers)
    return p


def test_every_field_is_a_declared_option():
    names = [f.name for f in dataclasses.fields(ECSOConfig)]
    assert [o.name for o in ecso_options()] == names
    assert all(o.help for o in ecso_options())
    assert {o.name: o.type for o in ecso_options()}["threshold"] is float
    assert {o.name: o.nullable for o in ecso_options()}["top_p"] is True


def test_flags_are_generated_and_map_back_onto_the_config():
    flagged = {o.name for o in ecso_options(lambda o: o.flag is not None)}
    args = _parser().parse_args(["--verdict", "exact", "--threshold", "0.25", "--top-p", "0.9", "--num_beams", "2",
                                 "--skip-check-regex", "[A-E]", "--early-check-tokens", "3", "--image-in-safe-step"])
    assert flagged <= set(vars(args))
    config = ecso_config(args)  # resolves the entry point's answer length (tiny models: shorter)
    assert (config.verdict, config.threshold, config.top_p, config.num_beams) == ("exact", 0.25, 0.9, 2)
    assert (config.temperature, config.max_new_tokens) == (0.2, 64)  # the entry point's defaults
    assert config.skip_check_regex == "[A-E]" and config.early_check_tokens == 3 and config.image_in_safe_step
    streamed = vars(_parser(batch_levers=False).parse_args([]))
    assert not {o.name for o in ecso_options(lambda o: o.batch_only)} & set(streamed)
    only_ecso = argparse.ArgumentParser()
    add_ecso_args(only_ecso)
    assert ecso_config_from_args(only_ecso.parse_args([])) == ECSOConfig()  # options without flags keep defaults


def test_api_model_and_demo_panel_come_from_the_declarations():
    api = [o.name for o in ecso_options(lambda o: o.api)]
    assert list(ECSOOptions.model_fields) == api
    assert ECSOOptions.model_fields["threshold"].description == next(o.help for o in ecso_options()
                                                                    if o.name == "threshold")
    assert [o.name for o in PANEL_OPTIONS] == ["verdict", "threshold", "max_new_tokens", "temperature"]
    options = DemoConfig().options(max_new_tokens=8.0, verdict="")
    assert options.max_new_tokens == 8 and options.verdict == "score" and set(options.model_dump()) == set(api)
    with pytest.raises(TypeError, match="no control for"):
        DemoConfig().options(top_p=0.5)


@pytest.mark.parametrize("kwargs, words", [
    ({"verdict": "maybe"}, "unknown verdict mode 'maybe'; valid: score, exact, parse"),
    ({"threshold": 1.5}, "threshold must be in [0, 1], got 1.5"),
    ({"prompt_set": "x"}, "unknown prompt set 'x'"),
    ({"early_check_tokens": -1}, "early_check_tokens must be an integer >= 0, got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"skip_check_regex": "("}, "is not a valid regular expression"),
    ({"num_beams": 1.5}, "num_beams must be an integer, got 1.5"),
    ({"image_aspect_ratio_check": "square"}, "unknown image aspect ratio 'square'; valid: pad, crop, resize"),
    ({"truncate_chars": -5}, "truncate_chars must be an integer >= 0, got -5"),
])
def test_the_config_checks_each_declared_range(kwargs, words):
    with pytest.raises(InvalidRequestError) as info:
        ECSOConfig(**kwargs)
    assert words in str(info.value)


def test_streaming_drops_only_what_streams_ignore():
    config = ECSOConfig(speculative_caption=True, early_check_tokens=4, skip_check_regex="x")
    assert config.ignored_when_streaming() == ["speculative_caption", "early_check_tokens"]
    streamed = config.for_streaming()
    assert not streamed.ignored_when_streaming() and streamed.skip_check_regex == "x"
    assert "early_check_tokens" not in ECSOConfig().to_dict() and ECSOConfig().to_dict()["truncate_chars"] == 1927


def test_step_options_parse_record_and_reach_the_prompts():
    args = _parser().parse_args(["--force-verdict", "no", "--image-aspect-ratio-caption", "crop", "--truncate-chars",
                                 "0"])
    config = ecso_config(args)
    assert (config.force_verdict, config.image_aspect_ratio_caption, config.truncate_chars) == (False, "crop", 0)
    assert ecso_config(_parser().parse_args(["--force-verdict", "yes"])).force_verdict is True
    recorded = config.to_dict()
    assert recorded["image_aspect_ratio_caption"] == "crop" and "image_aspect_ratio_check" not in recorded
    assert recorded["truncate_chars"] == 0 and ECSOConfig(truncate_chars=5).to_dict()["truncate_chars"] == 5
    answer = "x" * 3000
    assert answer in config.prompts().fill_harm_check("q", answer)  # 0: the whole answer
    assert "x" * 1928 not in ECSOConfig().prompts().fill_harm_check("q", answer)
    assert ECSOConfig(truncate_chars=4).prompts().fill_harm_check("q", "abcdefgh").count("abcd\n") == 1
    assert "force_verdict" not in ECSOOptions.model_fields  # a request can never turn the check off
