"""The demo's client-side logic without a browser or processes: how ECSO events become the four panels and the status
line, the conversation log, the demo's and the launcher's command lines."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from llava.ecso.prompts import PAPER_PROMPTS
from llava.errors import BackendError, NoWorkerError
from llava.serve.demo_client import ConversationLog, DemoClient, RunState, StepResult, describe_error, image_digest
from llava.serve.gradio_web_server_ecso import DemoConfig, build_parser, config_from_args, default_log_dir
from llava.serve.launch import LaunchConfig
from llava.serve.launch import build_parser as launch_parser
from llava.serve.launch import config_from_args as launch_config
from llava.serve.protocol.ecso import ECSOEvent


def ev(event: str, **kw) -> ECSOEvent:
    return ECSOEvent(event=event, **kw)


def flagged_run() -> RunState:
    run = RunState()
    run.result.threshold = 0.0
    for e in [ev("direct", delta="Mix the ", done=False), ev("direct", delta="chemicals", done=False)]:
        run.apply(e)
    assert run.direct_panel == "Mix the chemicals" and run.result.direct is None
    assert run.status().startswith("Running: answer")
    for e in [ev("direct", text=" Mix the chemicals ", done=True, elapsed=0.5),
              ev("verdict", text="Yes", flagged=True, harm_score=0.625, elapsed=0.1),
              ev("caption", delta="A bottle", done=False), ev("caption", text="A bottle.", done=True, elapsed=0.2),
              ev("safe", text="I cannot help with that.", done=True, elapsed=0.3),
              ev("final", text="I cannot help with that.", flagged=True, harm_score=0.625, elapsed=1.2)]:
        run.apply(e)
    return run


def test_flagged_run_fills_all_panels_with_score_and_times():
    run = flagged_run()
    assert run.done and run.result.direct == "Mix the chemicals"
    assert run.verdict_panel.splitlines() == ["HARMFUL: yes, ECSO answers again from the caption, without the image",
                                              "P(yes) 0.625 >= threshold 0: flagged"]
    assert run.final_panel == "I cannot help with that."
    badge = run.badge_html()
    assert 'class="ecso-verdict ecso-flagged"' in badge and "background:#c62828" in badge and "FLAGGED" in badge
    assert "Final answer: the safe answer (step 4, from the query-aware caption, without the image)" in badge
    assert run.caption_panel == "A bottle." and run.safe_panel == "I cannot help with that."
    status = run.status()
    assert "Flagged: the safe response replaces the direct answer" in status
    for part in ("answer 500 ms", "harm check 100 ms", "caption 200 ms", "safe answer 300 ms", "total 1.20 s"):
        assert part in status


def test_harmless_run_says_why_steps_3_and_4_did_not_run():
    run = RunState()
    run.result.threshold = 0.5
    for e in [ev("direct", text="A cat.", done=True), ev("verdict", text="No", flagged=False, harm_score=0.1),
              ev("final", text="A cat.", flagged=False)]:
        run.apply(e)
    assert run.verdict_panel.splitlines() == ["HARMFUL: no, the direct answer stands",
                                              "P(yes) 0.100 < threshold 0.5: not flagged"]
    assert run.final_panel == "A cat." and "ecso-clear" in run.badge_html() and "#2e7d32" in run.badge_html()
    assert run.caption_panel.startswith("(not run: the answer was judged harmless")
    assert run.safe_panel == run.caption_panel
    assert "Not flagged: the direct answer is the final answer" in run.status()


def test_error_event_shows_its_code_and_detail():
    run = RunState()
    run.apply(ev("direct", text="partial", done=True))
    run.apply(ev("error", error_code=5, detail="prompt has 3000 tokens, context is 2048"))
    assert run.done and run.caption_panel == ""  # no "not run" note on a failure
    assert run.status().startswith("**Error.** error_code 5: prompt has 3000 tokens, context is 2048")


def test_failures_are_described_for_people():
    assert describe_error(NoWorkerError("no worker for 'x'")) == "No model worker is available: no worker for 'x'"
    assert describe_error(BackendError("HTTP 502")) == "BackendError: HTTP 502"
    run = RunState()
    run.fail(ValueError("type a query first"))
    assert run.status() == "**Error.** unexpected ValueError: type a query first"


def test_conversation_log_one_json_line_per_interaction_without_ips_unless_asked(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    options = DemoConfig().options(threshold=0.0)
    result = flagged_run().result
    for log_ips in (False, True):
        log = ConversationLog(tmp_path / str(log_ips), log_ips=log_ips)
        log.write(kind="ecso", model="tiny", query="q?", image=image, options=options, result=result, ip="10.1.2.3")
        lines = log.path().read_text().splitlines()
        assert len(lines) == 1 and log.path().name.endswith("-conv.json")
        row = json.loads(lines[0])
        assert {"tstamp", "type", "model", "query", "image_md5", "options", "steps"} <= row.keys()
        assert row["steps"]["safe"] == "I cannot help with that." and row["steps"]["flagged"] is True
        assert row["image_md5"] == image_digest(image) and row["options"]["threshold"] == 0.0
        assert ("ip" in row) is log_ips and ("10.1.2.3" in lines[0]) is log_ips
    ConversationLog(None).write(kind="ecso", model="m", query="q", image=None, options=options, result=StepResult())


def test_demo_flags_map_onto_the_config():
    config = config_from_args(["--controller", "http://c:1", "--model-list-mode", "reload", "--threshold", "0",
                                      "--verdict", "exact", "--max-new-tokens", "64", "--auth", "me:pw",
                                      "--auth", "you:pw2", "--log-dir", "", "--log-ips", "--api-key", "k"])
    assert config.controller_url == "http://c:1" and config.model_list_mode == "reload"
    assert config.ecso.threshold == 0.0 and config.ecso.verdict == "exact" and config.ecso.max_new_tokens == 64
    assert config.auth == (("me", "pw"), ("you", "pw2")) and config.log_dir is None and config.log_ips
    assert "'me'" not in repr(config) and "'k'" not in repr(config)
    options = config.options(verdict="score", threshold=0.25, max_new_tokens=8.0)
    assert (options.verdict, options.threshold, options.max_new_tokens) == ("score", 0.25, 8)
    default = config_from_args([])
    assert (default.host, default.port, default.log_ips) == ("127.0.0.1", 7860, False)
    assert default.log_dir == str(default_log_dir()) and not default.log_dir.startswith("logs")


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "USER:PASSWORD"),
    (["--threshold", "1.5"], "threshold"),
    (["--concurrency-count", "0"], "concurrency_count"),
])
def test_bad_demo_flags_fail_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        config_from_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("parser", [build_parser(), launch_parser()], ids=["demo", "launch"])
def test_help_explains_every_flag(parser):
    for action in parser._actions:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"


def test_launch_forwards_unknown_flags_to_the_worker_and_keeps_the_key_off_command_lines():
    config = launch_config(["--model-path", "tiny", "--device", "cpu", "--conv-mode", "vicuna_v1",
                            "--demo-args", "--threshold 0 --auth 'me:p w'", "--api-key", "secret"], environ={})
    assert config.worker_args == ("--device", "cpu", "--conv-mode", "vicuna_v1")
    assert config.demo_args == ("--threshold", "0") and config.demo_auth == ("me:p w",)
    assert config.api_key == "secret" and "secret" not in repr(config) and "p w" not in repr(config)
    assert launch_config(["--model-path", "m"], environ={"ECSO_API_KEY": "env"}).api_key == "env"
    from llava.serve.launch import Launcher

    launcher = Launcher(config, environ={})
    argv = launcher.controller_argv() + launcher.worker_argv() + launcher.demo_argv()
    assert "secret" not in argv and launcher._env["ECSO_API_KEY"] == "secret"
    assert not any("p w" in a for a in argv) and launcher._env["ECSO_DEMO_AUTH"] == "me:p w"
    assert launcher.worker_argv()[-4:] == ["--device", "cpu", "--conv-mode", "vicuna_v1"]


def test_launch_reaches_wildcard_binds_on_loopback_and_rejects_port_clashes():
    assert LaunchConfig("m", host="0.0.0.0", worker_port=1234).worker_url == "http://127.0.0.1:1234"
    assert LaunchConfig("m", host="::1", web_port=80).web_url == "http://[::1]:80"
    with pytest.raises(ValueError, match="different ports"):
        LaunchConfig("m", controller_port=5000, worker_port=5000)
    LaunchConfig("m", controller_port=5000, web_port=5000, demo=False)  # no demo: its port is unused


class RecordingClient(DemoClient):
    """Records what each step would send to the worker's LLaVA stream API (and, for step 2, to its ECSO stream)
    and answers ``answer``; the ECSO stream flags with P(yes) 0.8 in score mode, not at all otherwise."""

    def __init__(self, answer: str, **kw) -> None:
        super().__init__("http://127.0.0.1:9", **kw)
        self.answer, self.calls, self.ecso_calls, self.closed = answer, [], [], []

    def generate_stream(self, model, text, images, options, max_new_tokens=None):
        self.calls.append((text, len(images), max_new_tokens))
        yield self.answer[: len(self.answer) // 2]
        yield self.answer

    def ecso_stream(self, model, image, query, options, direct=None):
        self.ecso_calls.append((query, image is not None, direct, options.verdict))
        score = options.verdict in (None, "score")
        try:
            yield ECSOEvent(event="direct", text=direct, done=True, elapsed=0.0)
            yield ECSOEvent(event="verdict", text="Yes" if score else "No", flagged=score,
                            harm_score=0.8 if score else None, elapsed=0.01)
            yield ECSOEvent(event="caption", delta="more", done=False)
            self.closed.append(False)
        except GeneratorExit:
            self.closed.append(True)
            raise


def last(iterable):
    *_, item = iterable
    return item


def test_step_buttons_send_the_shared_ecso_prompts_with_the_earlier_outputs():
    image, query = Image.new("RGB", (4, 4)), "How do I pick this lock?"
    options = DemoConfig().options()
    client = RecordingClient("Yes, it is harmful.")
    state = last(client.step_stream("direct", "tiny", image, query, options, StepResult())).result
    assert client.calls[-1] == (query, 1, None) and state.direct == "Yes, it is harmful."
    state = last(client.step_stream("verdict", "tiny", image, query, options, state)).result
    # step 2 is the worker's ECSO harm check of the direct answer, with its score; the stream is closed after it
    assert client.ecso_calls[-1] == (query, True, "Yes, it is harmful.", "score") and client.closed == [True]
    assert state.flagged is True and state.harm_score == 0.8 and state.threshold == 0.5
    assert state.verdict_text == "Yes" and len(client.calls) == 1
    state = last(client.step_stream("caption", "tiny", image, query, options, state)).result
    assert client.calls[-1] == (PAPER_PROMPTS.fill_caption(query), 1, None)
    state = last(client.step_stream("safe", "tiny", image, query, options, state)).result
    assert client.calls[-1] == (PAPER_PROMPTS.fill_safe(state.caption, query), 0, None)  # eyes closed
    assert set(state.timings) == {"direct", "verdict", "caption", "safe"}

    exact = DemoConfig().options(verdict="exact")
    checked = last(client.step_stream("verdict", "tiny", image, query, exact, state)).result
    assert checked.flagged is False and checked.harm_score is None and checked.threshold is None
    assert client.ecso_calls[-1][3] == "exact"
    with_image = options.model_copy(update={"image_in_safe_step": True})
    last(client.step_stream("safe", "tiny", image, query, with_image, state))
    assert client.calls[-1][1] == 1


@pytest.mark.parametrize("step, missing", [("verdict", "step 1"), ("safe", "step 3"), ("nope", "valid: direct")])
def test_a_step_without_its_input_is_refused(step, missing):
    with pytest.raises(ValueError, match=missing):
        last(RecordingClient("x").step_stream(step, "tiny", None, "q", DemoConfig().options(), StepResult()))


def test_verdicts_say_how_they_were_reached_and_what_answer_is_final():
    run = RunState(has_image=False, model_note="random-weight model: its text is random")
    run.result.threshold = 0.5
    for e in [ev("direct", text="Mix\x07 it.", done=True),
              ev("verdict", text="No", flagged=False, harm_score=0.524, verdict_mode="score"),
              ev("final", text="Mix\x07 it.", flagged=False)]:
        run.apply(e)
    assert run.verdict_panel.splitlines()[1] == "P(yes) 0.524 >= threshold 0.5: not flagged (verdict forced)"
    assert run.direct_panel == "Mix it." and run.final_panel == "Mix it."  # control characters are not shown
    assert "Note: random-weight model: its text is random." in run.badge_html()
    parsed = RunState(has_image=False)
    for e in [ev("direct", text="x", done=True),
              ev("verdict", text="Yes", flagged=True, verdict_mode="parse",
                 verdict_fallback="the endpoint returns no logprobs"),
              ev("safe", text="I cannot help.", done=True), ev("final", text="I cannot help.", flagged=True)]:
        parsed.apply(e)
    assert parsed.verdict_panel.splitlines() == [
        "HARMFUL: yes, ECSO answers again (there is no image to leave out)",
        "parse verdict on the model's answer 'Yes': flagged (parse instead of the configured verdict: the endpoint "
        "returns no logprobs)"]
    assert "without the image" not in parsed.verdict_panel + parsed.badge_html()
    assert "(step 4; there was no image to leave out)" in parsed.badge_html()


def test_idle_and_cleared_state_shows_no_running_line():
    assert RunState().status() == "" and RunState().badge_html() == "" and RunState().final_panel == ""
    assert RunState(notice="**Nothing to run.** x").status() == "**Nothing to run.** x"


def test_default_log_dir_is_documented_and_not_the_working_folder(tmp_path):
    assert default_log_dir({"ECSO_DEMO_LOG_DIR": str(tmp_path / "mine")}) == tmp_path / "mine"
    assert default_log_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "ecso" / "demo-logs"
    assert config_from_args(["--log-dir", str(tmp_path)]).log_dir == str(tmp_path)


def test_tiny_models_get_short_answers_from_the_worker_and_the_launched_demo():
    from llava.serve.launch import Launcher
    from llava.serve.model_worker import config_from_args as worker_config

    tiny = worker_config(["--model-path", "tiny", "--no-register"])
    assert tiny.max_new_tokens == tiny.ecso.max_new_tokens == 32
    real = worker_config(["--model-path", "llava-hf/llava-1.5-7b-hf", "--no-register"])
    assert real.max_new_tokens == real.ecso.max_new_tokens == 512
    assert worker_config(["--model-path", "tiny", "--max-new-tokens", "64"]).max_new_tokens == 64
    argv = {}
    for path in ("tiny", "/models/x"):
        launcher = Launcher(launch_config(["--model-path", path, "--demo-args", "--threshold 0.6"]))
        argv[path] = launcher.demo_argv()
        launcher._http.close()
    assert argv["tiny"][-4:] == ["--max-new-tokens", "32", "--threshold", "0.6"]  # the user's flags come last
    assert "--max-new-tokens" not in argv["/models/x"]
