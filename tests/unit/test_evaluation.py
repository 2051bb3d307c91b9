"""How held-out answers are scored against their references.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_evaluation.py
"""

from entrypoints.evaluation import answer_match


def _score(answers, references):
    return answer_match(answers, [{"reference": r} for r in references])


def test_an_answer_matches_its_reference_as_whole_words():
    assert _score(["It is Paris."], ["Paris"]) == 1.0
    assert _score(["The capital is Quendar"], ["quendar"]) == 1.0  # case and punctuation do not count
    assert _score(["Code 12"], ["1"]) == 0.0  # "1" inside "12" was a match before
    assert _score(["Parisian food"], ["Paris"]) == 0.0
    assert _score(["silver lynx, of course"], ["Silver Lynx"]) == 1.0


def test_references_without_words_are_left_out():
    assert _score(["anything"], ["?!"]) is None  # normalised to nothing: it matched every answer before
    assert _score(["yes", "x"], ["yes", "..."]) == 1.0
    assert _score([], []) is None
