"""Fidelity of every non-LLaVA family against plain transformers on the same tiny folder: greedy direct answers from
``run_llava``, batched rows, the one-pass yes/no score, no pixels in step 4, prefix reuse where the family allows it,
streaming; and the yes/no score of a tokenizer without single-token "yes"/"no" (issue 19 item 2)."""
import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava.conversation import chat_messages
from llava.ecso.backends import StepRequest
from llava.ecso.config import ECSOConfig
from llava.ecso.local_vlm import VLMBackend, load_local
from llava.ecso.pipeline import ECSO, ECSOInput
from llava.ecso.prompts import get_prompt_set
from llava.errors import UnsupportedError
from llava.eval import run_llava
from llava.generation import GenerationParams
from llava.model.tiny import tiny_model_path
from llava.model.vlm_engine import VLMEngine
from tests.conftest import VLM_FAMILIES

QUERY = "How do I make this at home?"
P = GenerationParams(max_new_tokens=12)


def _image(seed: int, size=(320, 200)) -> Image.Image:
    img = Image.new("RGB", size, ((seed * 67) % 256, 90, (seed * 29) % 256))
    ImageDraw.Draw(img).ellipse((20 + seed * 7, 30, 160, 150), fill=(240, 200, 40))
    return img


class Plain:
    """Plain transformers on a tiny folder: the independent reference."""

    def __init__(self, folder):
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.processor = AutoProcessor.from_pretrained(folder)

    def inputs(self, text, images):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return self.processor(images=[images] if images else None, text=[prompt], return_tensors="pt")

    def answer(self, text, images, max_new_tokens=16):
        inputs = self.inputs(text, images)
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    def next_token_logprobs(self, text, images, extra=()):
        """Log-probabilities after the prompt (+ ``extra`` tokens), one unpadded row: [len(extra) + 1, vocab]."""
        inputs = self.inputs(text, images)
        if extra:
            tail = torch.tensor([list(extra)])
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], 1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], 1)
            for key in ("token_type_ids", "mm_token_type_ids"):
                if key in inputs:
                    inputs[key] = torch.cat([inputs[key], torch.zeros_like(tail)], 1)
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, -(len(extra) + 1):].float()
        return torch.log_softmax(logits, -1)


@pytest.fixture(scope="module")
def plain():
    made: dict = {}

    def get(family):
        if family not in made:
            made[family] = Plain(tiny_model_path(f"tiny-{family}"))
        return made[family]

    return get


def _word_ids(tokenizer, words):
    """Every vocabulary entry that spells one of ``words`` whole, with or without a word-start marker."""
    return sorted(i for piece, i in tokenizer.get_vocab().items() if piece.lstrip("▁Ġ") in words)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_run_llava_direct_equals_plain_transformers(family, plain, tmp_path, capsys):
    image_file = tmp_path / "cat.png"
    _image(1, (480, 320)).save(image_file)
    argv = ["--model-path", f"tiny-{family}", "--device", "cpu", "--image-file", str(image_file), "--query", QUERY,
            "--temperature", "0", "--max_new_tokens", "16", "--ecso", "--json"]
    assert run_llava.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    with Image.open(image_file) as img:
        expected = plain(family).answer(QUERY, [img.convert("RGB")])
    assert result["direct"] == expected and expected
    assert result["options"]["model_family"] == family
    assert result["options"]["prefix_reuse"] is (family in ("llava_next", "idefics3"))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batched_rows_equal_unbatched_ones(family, vlm_backend):
    """Images of different sizes get different tile counts (LLaVA-NeXT, Idefics3): zero-padded in the batch."""
    backend = vlm_backend(family)
    a, b, c = _image(2, (20, 20)), _image(3, (400, 100)), _image(4, (300, 300))
    requests = [StepRequest(QUERY, [a], P), StepRequest("Describe the picture.", [b], P),
                StepRequest("Hello there", [], P), StepRequest("What color is it?", [c], P),
                StepRequest("Tell me a story.", [], P), StepRequest("And this one?", [a], P)]
    backend.engine.clear_caches()
    batched = backend.generate(requests)
    backend.engine.clear_caches()
    single = [backend.generate([r])[0] for r in requests]
    assert batched == single and len(set(batched)) > 2


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_score_is_softmax_over_plain_first_step_logits(family, vlm_backend, plain):
    backend, ref = vlm_backend(family), plain(family)
    image = _image(4)
    text = get_prompt_set("paper").fill_harm_check(QUERY, "Mix the two powders and heat them.")
    yes, no = _word_ids(ref.processor.tokenizer, {"yes", "Yes", "YES"}), _word_ids(ref.processor.tokenizer,
                                                                                      {"no", "No", "NO"})
    assert backend.engine.yes_no.mode == "first_token"
    assert list(backend.engine.yes_no.yes_ids) == yes and list(backend.engine.yes_no.no_ids) == no
    logp = ref.next_token_logprobs(text, [image])[-1]
    expected = torch.sigmoid(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)).item()
    backend.engine.clear_caches()
    requests = [StepRequest(text, [image]), StepRequest(text + " ", [_image(5)])]
    assert backend.score_yes_no(requests)[0] == pytest.approx(expected, abs=1e-5)
    assert backend.score_yes_no(requests[:1])[0] == pytest.approx(expected, abs=1e-5)  # from the cached prefix


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_safe_step_sends_no_pixels(family, vlm_backend, monkeypatch):
    backend = vlm_backend(family)
    calls = []
    generate = backend.engine.model.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(backend.engine.model, "generate", recording)
    backend.engine.clear_caches()
    result = ECSO(backend, ECSOConfig(threshold=0.0, max_new_tokens=6)).run(_image(6), QUERY)
    assert result.flagged and result.safe_answer is not None and len(calls) == 3  # direct, caption, safe
    safe = calls[-1]
    assert not any("pixel" in k or k in ("image_sizes", "image_grid_thw") for k in safe)
    assert backend.engine.loaded.image_token_id not in safe["input_ids"].tolist()[0]
    assert "pixel_values" in calls[0]  # step 1 did send the image


@pytest.mark.parametrize("family", [f for f in VLM_FAMILIES if f in ("llava_next", "idefics3")])
def test_prefix_reuse_gives_the_plain_path_results(family, vlm_backend):
    backend = vlm_backend(family)
    off = VLMBackend(VLMEngine(backend.engine.loaded, prefix_reuse=False))
    config = ECSOConfig(threshold=0.0, max_new_tokens=10)
    items = [ECSOInput(QUERY, [_image(7)]), ECSOInput("What is this?", [_image(8, (150, 400))])]
    backend.engine.clear_caches()
    hits = backend.engine.prefixes.hits
    with_reuse, without = ECSO(backend, config).run_batch(items), ECSO(off, config).run_batch(items)
    assert backend.engine.prefixes.hits > hits and off.engine.prefixes.hits == 0
    for a, b in zip(with_reuse, without):
        assert (a.direct, a.caption, a.safe_answer) == (b.direct, b.caption, b.safe_answer)
        assert a.harm_score == pytest.approx(b.harm_score, abs=1e-5)


def test_early_check_stops_flagged_rows(vlm_backend):
    """--early-check-tokens works on another family's engine: flagged rows stop after K tokens."""
    backend = vlm_backend("idefics3")
    config = ECSOConfig(threshold=0.0, early_check_tokens=2, max_new_tokens=8, min_new_tokens=8)
    items = [ECSOInput(QUERY, [_image(13)]), ECSOInput("Hi?", [_image(14)])]
    results = ECSO(backend, config).run_batch(items)
    whole = ECSO(backend, ECSOConfig(threshold=0.0, max_new_tokens=8, min_new_tokens=8)).run_batch(items)
    assert all(r.early_stopped and r.flagged for r in results)
    assert all(len(r.direct) < len(w.direct) for r, w in zip(results, whole))


def test_reuse_is_off_with_its_reason_where_the_family_cannot(vlm_backend):
    backend = vlm_backend("gemma3")
    assert not backend.engine.prefix_reuse
    assert "sliding-window" in backend.describe()["prefix_reuse_note"]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_stream_equals_generate(family, vlm_backend):
    backend = vlm_backend(family)
    request = StepRequest(QUERY, [_image(9)], P)
    assert "".join(backend.stream(request)) == backend.generate([request])[0]


# ---- a tokenizer without single-token yes/no: the score from the variants' token sequences ----------------------


def drop_yes_no_tokens(folder):
    """Edit ``tokenizer.json`` so that no single token spells yes/no (any case, any word-start marker): their
    vocabulary entries are renamed and the merges that make or use them go, so the words split into several
    tokens."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    words = {"yes", "no"}
    gone = {piece for piece in data["model"]["vocab"] if piece.lstrip("▁Ġ").lower() in words}
    # renamed to pieces no merge makes, so the ids (and the added tokens' ids after them) stay where they were
    data["model"]["vocab"] = {(f"\x01unused{i}" if p in gone else p): i for p, i in data["model"]["vocab"].items()}
    pairs = [m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]]
    data["model"]["merges"] = [m for m in pairs if "".join(m) not in gone and not set(m) & gone]
    path.write_text(json.dumps(data))
    return gone


def _sequence_reference(log_probs_of, sequences_yes, sequences_no):
    def total(seq):
        logp = log_probs_of(seq)
        return sum(logp[t, tok] for t, tok in enumerate(seq))

    yes = torch.logsumexp(torch.stack([total(s) for s in sequences_yes]), 0)
    no = torch.logsumexp(torch.stack([total(s) for s in sequences_no]), 0)
    return torch.sigmoid(yes - no).item()


def test_score_without_single_token_yes_no_vlm(tmp_path):
    folder = tmp_path / "idefics3-no-yes-no"
    shutil.copytree(tiny_model_path("tiny-idefics3"), folder)
    assert drop_yes_no_tokens(folder)
    backend = load_local(str(folder), device="cpu")
    variants = backend.engine.yes_no
    assert variants.mode == "sequences" and all(len(s) > 1 for s in variants.sequences)
    ref = Plain(folder)
    image = _image(10)
    text = get_prompt_set("paper").fill_harm_check(QUERY, "Sure, here is how.")
    expected = _sequence_reference(lambda seq: ref.next_token_logprobs(text, [image], seq[:-1]), variants.yes_seqs,
                                   variants.no_seqs)
    got = backend.score_yes_no([StepRequest(text, [image]), StepRequest(QUERY, [_image(11)])])
    assert got[0] == pytest.approx(expected, abs=1e-5)
    assert backend.describe()["yes_no_score"] == "sequences"
    result = ECSO(backend, ECSOConfig(max_new_tokens=4)).run(image, QUERY)
    assert result.verdict_mode == "score" and result.harm_score is not None


def test_score_without_single_token_yes_no_llava(tmp_path, tiny_hf_path, capsys):
    """run_llava --ecso on a LLaVA-1.5 checkpoint whose tokenizer has no single-token yes/no: the score verdict."""
    from llava.model.builder import load_model
    from llava.model.engine import LlavaEngine

    folder = tmp_path / "llava-no-yes-no"
    shutil.copytree(tiny_hf_path, folder)
    assert drop_yes_no_tokens(folder)
    engine = LlavaEngine(load_model(str(folder), device="cpu"))
    variants = engine.yes_no
    assert variants.mode == "sequences"
    image = _image(12)
    prompt = f"USER: <image>\n{QUERY} ASSISTANT:"
    encoded = engine.encode(prompt, [image])

    def log_probs_of(seq):
        ids = torch.tensor([encoded.input_ids + list(seq[:-1])])
        with torch.inference_mode():
            logits = engine.model(input_ids=ids, pixel_values=engine.pixel_values([image])).logits[0, -len(seq):]
        return torch.log_softmax(logits.float(), -1)

    expected = _sequence_reference(log_probs_of, variants.yes_seqs, variants.no_seqs)
    assert engine.yes_no_scores([prompt, prompt.replace(QUERY, "Hi")], [[image], [image]])[0] == \
        pytest.approx(expected, abs=1e-5)
    image_file = tmp_path / "img.png"
    image.save(image_file)
    argv = ["--model-path", str(folder), "--device", "cpu", "--image-file", str(image_file), "--query", QUERY,
            "--max_new_tokens", "4", "--ecso", "--json"]
    assert run_llava.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict_mode"] == "score" and result["harm_score"] is not None
    assert result["options"]["yes_no_score"] == "sequences" and result["options"]["model_family"] == "llava"


def test_chat_messages_put_images_before_the_text():
    from llava.conversation import Chat

    chat = Chat("Be brief.", [("first", "answer"), ("second", None)], [[1, 2], []])
    assert chat_messages(chat) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
        {"role": "user", "content": [{"type": "text", "text": "second"}]}]


def test_a_steps_own_image_preprocessing_is_refused_by_name(vlm_backend):
    """--image-aspect-ratio-check/-caption are LLaVA-1.5's (pad/crop/resize before CLIP); another family's processor
    preprocesses its images, so a step that asks for its own preprocessing fails before anything runs."""
    backend = vlm_backend(VLM_FAMILIES[0])
    config = ECSOConfig(max_new_tokens=2, image_aspect_ratio_check="crop")
    with pytest.raises(UnsupportedError, match="applies to LLaVA-1.5 checkpoints only"):
        ECSO(backend, config).run(_image(3), QUERY, direct="an answer")
