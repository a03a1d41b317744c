"""The CLI's outputs equal the golden capture (tests/golden.py): help texts, `info --json` keys,
analytic profiles, and, on the machine kind they were captured on, generated text and the
weights a seeded fp32 training writes. Regenerate with `python tests/golden.py capture` when a
change is meant to alter them."""

from __future__ import annotations

import golden
import pytest


@pytest.fixture(scope="module")
def want():
    return golden.load()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return golden.train_run(tmp_path_factory.mktemp("golden"))


def test_help_texts_are_unchanged(want):
    assert golden.differences(want["help"], golden.capture_help()) == []


def test_info_keys_are_unchanged(want):
    assert golden.capture_info_keys() == want["info_keys"]


def test_analytic_profiles_are_unchanged(want, trained):
    assert golden.differences(want["profile"], golden.capture_profiles(trained[0])) == []


def test_checkpoint_layout_is_unchanged(want, trained):
    got = trained[1]
    assert (
        got["layout"] == want["train"]["layout"]
        and got["config_keys"] == want["train"]["config_keys"]
    )
    assert {k: sorted(v) for k, v in got["tensors"].items()} == {
        k: sorted(v) for k, v in want["train"]["tensors"].items()
    }


def _same_machine(want) -> None:
    if golden.machine() != want["machine"]:
        pytest.skip(
            f"golden numbers were captured with {want['machine']}; "
            f"this machine has {golden.machine()}"
        )


def test_seeded_fp32_weights_are_unchanged(want, trained):
    _same_machine(want)
    assert golden.differences(want["train"], trained[1]) == []


def test_generated_text_is_unchanged(want, trained):
    _same_machine(want)
    assert golden.differences(want["generate"], golden.capture_generate(trained[0])) == []
