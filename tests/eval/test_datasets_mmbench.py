"""MMBench reader: the real text-only tsv, the pinned prompt, and a tsv with a base64 image column."""
import base64
import io

import pandas as pd
import pytest
from PIL import Image

from llava.eval.benchmarks.mmbench import MMBENCH_PROMPT_SUFFIX
from llava.eval.datasets import BenchmarkConfig, DatasetError, answer_fields, load_samples


@pytest.fixture(scope="module")
def tsv(ref_data):
    return ref_data / "mmbench" / "mmbench_dev_20230712_text_only.tsv"


@pytest.fixture(scope="module")
def samples(tsv):
    return load_samples("mmbench", BenchmarkConfig(tsv))


def test_prompt_suffix_is_llavas_single_prediction_prompt():
    assert MMBENCH_PROMPT_SUFFIX == "Answer with the option's letter from the given choices directly."


def test_all_rows_including_circular_copies(samples):
    assert len(samples) == 4377 and len({s.id for s in samples}) == 4377
    assert sum(s.meta["index"] >= 1_000_000 for s in samples) > 0
    assert all(s.image is None for s in samples)


def test_prompt_built_like_model_vqa_mmbench_on_real_rows(samples):
    by_index = {s.meta["index"]: s for s in samples}
    s = by_index[34]  # no hint, four options
    assert s.query == ("Which one is the correct caption of this image?\n"
                       "A. A woman is riding a motorcycle down the street.\n"
                       "B. The house appears to be clean and beautifully decorated.\n"
                       "C. An elephant is chasing a dog around in the dirt.\n"
                       "D. A woman is walking her dog and has stopped at a corner and is looking at all the lights "
                       "and buildings.\n"
                       "Answer with the option's letter from the given choices directly.")
    s = by_index[241]  # hint, two options (C and D are nan)
    assert s.query.startswith("The passage below describes an experiment.")
    assert s.query.endswith("Figure: snowboarding down a hill.\n"
                            "Identify the question that Madelyn and Tucker's experiment can best answer.\n"
                            "A. Does Madelyn's snowboard slide down a hill in less time when it has a thin layer of "
                            "wax or a thick layer of wax?\n"
                            "B. Does Madelyn's snowboard slide down a hill in less time when it has a layer of wax or "
                            "when it does not have a layer of wax?\n" + MMBENCH_PROMPT_SUFFIX)
    assert s.meta["option_letters"] == ["A", "B"] and s.meta["answer"] == "B"
    fields = answer_fields(s)
    assert (fields["id"], fields["index"], fields["round"], fields["image"]) == ("241", 241, 0, None)
    assert fields["meta"]["hint"].startswith("The passage") and "index" not in fields["meta"]


def test_strict_refuses_a_tsv_without_images(tsv):
    with pytest.raises(DatasetError, match="no image column"):
        load_samples("mmbench", BenchmarkConfig(tsv, strict=True))


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_column_decoded_to_bytes_and_index_references(tsv, tmp_path):
    table = pd.read_table(tsv, nrows=3)
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    table["image"] = [base64.b64encode(red).decode(), base64.b64encode(blue).decode(), str(table["index"][0])]
    table["category"] = "cat"
    table["l2-category"] = "l2"
    path = tmp_path / "mmbench.tsv"
    table.to_csv(path, sep="\t", index=False)
    samples = load_samples("mmbench", BenchmarkConfig(path, strict=True))
    assert [s.image for s in samples] == [red, blue, red]
    assert Image.open(io.BytesIO(samples[1].image)).getpixel((0, 0)) == (0, 0, 255)
    assert samples[0].meta["category"] == "cat" and samples[0].meta["l2-category"] == "l2"
    table.loc[1, "image"] = float("nan")
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(DatasetError, match="has no image"):
        load_samples("mmbench", BenchmarkConfig(path, strict=True))
    assert load_samples("mmbench", BenchmarkConfig(path))[1].image is None
