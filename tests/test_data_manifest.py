"""data/ and data/SOURCES.md stay in sync: every listed file exists, every file there is listed, the third-party
files match their checksums (byte-for-byte copies), and nothing in git is over 5 MB."""
import hashlib
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.data_manifest import (CHECKSUMS, DATA_DIR, SOURCES, checksums, expand_braces, listed_files,
                                 missing_files, present_files)

MAX_BYTES = 5 * 1024 * 1024
# Written by this project (SOURCES.md's second table); everything else in data/ is third-party and checksummed.
OWN_FILES = {"SOURCES.md", "LICENSES.md", "SHA256SUMS", ".gitattributes"}


def test_brace_expansion_as_bash():
    assert expand_braces("a/{x,y}_{1..2}.png") == ["a/x_1.png", "a/x_2.png", "a/y_1.png", "a/y_2.png"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain.csv") == ["plain.csv"]


def test_every_listed_file_exists():
    assert missing_files(DATA_DIR) == []


def test_every_file_in_data_is_listed():
    listed = listed_files()
    unlisted = [f for f in present_files() if f not in listed]
    assert unlisted == [], f"files in data/ missing from {SOURCES.relative_to(REPO_ROOT)}: {unlisted}"


def test_the_listing_counts_match_the_sources():
    listed = listed_files()
    assert sum(p.startswith("figstep/images/SafeBench-Tiny/") for p in listed) == 50
    assert sum(p.startswith("mmsafetybench/processed_questions/") for p in listed) == 13
    assert OWN_FILES <= set(listed)


def test_third_party_files_match_their_checksums():
    sums = checksums()
    assert set(sums) == set(listed_files()) - OWN_FILES, "SHA256SUMS must cover exactly the third-party files"
    changed = [name for name, digest in sums.items()
               if hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() != digest]
    assert changed == [], f"not byte-for-byte copies any more (see {CHECKSUMS.name}): {changed}"


def test_no_data_file_over_5_mb():
    big = {f: (DATA_DIR / f).stat().st_size for f in present_files() if (DATA_DIR / f).stat().st_size > MAX_BYTES}
    assert big == {}


def test_a_missing_file_fails_with_its_name(tmp_path):
    """The fixture's check on a copy of data/ with one file removed: it names that file (and a missing SOURCES.md
    is itself reported), so a broken checkout fails instead of skipping."""
    copy = tmp_path / "data"
    copy.mkdir()
    (copy / "SOURCES.md").write_text(SOURCES.read_text(encoding="utf-8"), encoding="utf-8")
    for name in listed_files():
        if name != "mme/llava_mme_gt.jsonl" and name != "SOURCES.md":
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).touch()
    assert missing_files(copy) == ["data/mme/llava_mme_gt.jsonl"]
    (copy / "SOURCES.md").unlink()
    assert missing_files(copy) == ["data/SOURCES.md"]


def test_the_ref_data_fixture_fails_a_test_naming_the_missing_file(tmp_path):
    """A real pytest run of a test using ``ref_data`` against a data/ folder without one listed file: the test
    errors (never skips), and the message names the file."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_uses_data(ref_data):\n    pass\n", encoding="utf-8")
    conftest = tmp_path / "conftest.py"
    conftest.write_text(
        "import pathlib, shutil\nimport tests.data_manifest as m\nimport tests.conftest as c\n"
        "ref_data = c.ref_data\n"
        f"copy = pathlib.Path({str(tmp_path / 'data')!r})\n"
        "shutil.copytree(m.DATA_DIR, copy, ignore=shutil.ignore_patterns('llava_mme_gt.jsonl'))\n"
        "c.DATA_DIR = copy\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(probe)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 error" in out.stdout and "skipped" not in out.stdout
    assert "data/mme/llava_mme_gt.jsonl" in out.stdout


@pytest.mark.parametrize("name", ["figstep/LICENSE", "xstest/LICENSE", "LICENSES.md"])
def test_license_texts_are_there(name):
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    assert {"figstep/LICENSE": "MIT License", "xstest/LICENSE": "Attribution 4.0 International",
            "LICENSES.md": "CC BY-NC 4.0"}[name] in text
