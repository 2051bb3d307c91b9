"""How held-out answers are scored against their references.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_evaluation.py
"""

import pytest

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


# ------------------------------------------------------------------------------------------- eval suites
def test_each_metric_scores_whole_words_case_and_punctuation_aside():
    from entrypoints.evaluation import score_answer

    assert score_answer("Quendar.", "quendar") == {"exact_match": 1.0, "contains": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    s = score_answer("The capital is Quendar", "Quendar")
    assert (s["exact_match"], s["contains"]) == (0.0, 1.0)
    assert s["token_f1"] == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))  # 1 shared word of 4 and of 1
    assert s["rouge_l"] == pytest.approx(s["token_f1"])  # one word in common: the LCS is that word
    s = score_answer("lynx silver", "silver lynx")
    assert s["contains"] == 0.0 and s["token_f1"] == 1.0 and s["rouge_l"] == pytest.approx(0.5)  # order matters to LCS
    assert score_answer("Code 12", "1")["contains"] == 0.0
    assert score_answer("", "Quendar") == {"exact_match": 0.0, "contains": 0.0, "token_f1": 0.0, "rouge_l": 0.0}


def test_rouge_l_scores_answers_in_any_script():
    """Scored on Unicode-aware words (a tokenizer keeping [a-z0-9] only, rouge-score's default, scored every
    non-ASCII answer 0 against its reference); the longest common subsequence, not the shared words."""
    from entrypoints.evaluation import rouge_l

    assert rouge_l("Die Hauptstadt heißt Zürich", "heißt Zürich") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert rouge_l("東京 です", "東京") == pytest.approx(2 / 3)
    assert rouge_l("?!", "?!") == 1.0  # a reference of symbols only is compared as it is, not as nothing
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: precision 3/4, recall 3/4


def test_a_suite_summary_has_every_metric_the_items_own_score_and_the_count():
    from entrypoints.evaluation import suite_report
    from entrypoints.suites import Suite, SuiteItem

    items = (SuiteItem("s.jsonl:1", None, "Capital?", "Quendar", "exact_match"),
             SuiteItem("s.jsonl:2", None, "Animal?", "silver lynx", "contains"))
    suite = Suite("s", "s.jsonl", "f" * 64, items)
    report = suite_report(suite, ["I do not know", "no idea"], ["The capital is Quendar", "the silver lynx"], 8)
    assert report["before"] == {"exact_match": 0.0, "contains": 0.0, "token_f1": 0.0, "rouge_l": 0.0, "score": 0.0,
                                "count": 2}
    after = report["after"]
    assert after["exact_match"] == 0.0 and after["contains"] == 1.0
    assert after["score"] == 0.5  # item 1 by exact_match (0), item 2 by contains (1)
    assert [i["scores_after"]["contains"] for i in report["items"]] == [1.0, 1.0]
    assert report["items"][0]["source"] == "s.jsonl:1" and report["sha256"] == "f" * 64


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "Capital?"}', "no `reference` answer"),
    ('{"prompt": "Capital?", "reference": "  "}', "no `reference` answer"),
    ('{"prompt": "Capital?", "reference": "Q", "metric": "bleu"}', "unknown metric 'bleu'"),
    ('{"prompt": "Capital?", "reference": "Q", "answer": "Q"}', "unknown field(s) answer"),
    ('{"reference": "Q"}', "`prompt` (a string) or `messages`"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Q"}], "reference": "Q"}',
     "last turn of `messages` must be the user's question"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not a JSON object"),
])
def test_a_bad_suite_line_is_a_data_error_naming_file_and_line(tmp_path, line, message):
    from entrypoints.errors import DataError
    from entrypoints.suites import load_suite

    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "Animal?", "reference": "lynx"}\n\n' + line + "\n")
    with pytest.raises(DataError, match="s3://b/suites/facts.jsonl:3: ") as info:
        load_suite(path, "s3://b/suites/facts.jsonl", chat=True)
    assert message in str(info.value)


def test_an_empty_suite_and_messages_without_a_chat_template_are_refused(tmp_path):
    from entrypoints.errors import DataError
    from entrypoints.suites import load_suite

    path = tmp_path / "facts.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="facts.jsonl: the evaluation suite is empty"):
        load_suite(path, str(path), chat=True)
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}], "reference": "Q"}\n')
    assert load_suite(path, str(path), chat=True).items[0].prompt == "Hi"
    with pytest.raises(DataError, match="QLORA_DATA_FORMAT=text"):
        load_suite(path, str(path), chat=False)


def test_suite_answers_report_their_time_and_log_progress_on_long_suites(tiny_model, monkeypatch, caplog):
    """A 500-question suite takes minutes: the job says how far it is and how long each suite took (manifest)."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrypoints import evaluation
    from entrypoints.suites import Suite, SuiteItem

    monkeypatch.setattr(evaluation, "PROGRESS_SECONDS", 0.0)  # a progress line after every batch but the last
    tok = AutoTokenizer.from_pretrained(tiny_model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    items = tuple(SuiteItem(f"s.jsonl:{i}", None, f"Question {i}?", "yes", "contains") for i in range(5))
    suite = Suite("facts", "s.jsonl", "f" * 64, items)
    with caplog.at_level(logging.INFO, logger="qlora.evaluation"):
        answers, seconds = evaluation.answer_suites(model, tok, None, [suite], 2, batch_size=2, when="before")
    assert len(answers["facts"]) == 5 and seconds["facts"] > 0
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split(" in ")[0] for m in lines if m.startswith("answering")] == [
        "answering eval suite facts (before training): 2/5", "answering eval suite facts (before training): 4/5"]
    assert any(m.startswith("eval suite facts (before training): 5 answers in ") for m in lines)
    report = evaluation.suite_report(suite, answers["facts"], answers["facts"], 2,
                                     {"before": seconds["facts"], "after": 1.5})
    assert report["answer_seconds"] == {"before": seconds["facts"], "after": 1.5}


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_retried(tiny_model, caplog):
    """generation_batch_size=0 picks the batch from the free memory; when the estimate is wrong and a batch runs out
    of GPU memory, the batch is halved and retried, the answers are the same and in the samples' order."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrypoints import evaluation
    from entrypoints.suites import SuiteItem

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    items = [SuiteItem(f"s.jsonl:{i}", None, f"Question number {i}?" + " more" * i, "yes", "contains")
             for i in range(7)]
    assert evaluation.auto_generation_batch(model, 40, 8) == evaluation.CPU_GENERATION_BATCH
    expected = evaluation.generate_answers(model, tok, None, items, 3, batch_size=1)
    real_generate, sizes = model.generate, []

    def generate_within_two(**kwargs):  # a GPU that holds two rows at a time
        sizes.append(len(kwargs["input_ids"]))
        if len(kwargs["input_ids"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(**kwargs)

    model.generate = generate_within_two
    with caplog.at_level(logging.WARNING, logger="qlora.evaluation"):
        answers = evaluation.generate_answers(model, tok, None, items, 3, batch_size=0, what="eval suite s")
    assert answers == expected
    assert sizes[:3] == [7, 3, 1] and max(sizes) == 7 and all(n <= 2 for n in sizes[3:])
    assert "eval suite s: 7 prompts at once ran out of GPU memory; going on with 3" in caplog.text
    model.generate = lambda **kwargs: (_ for _ in ()).throw(ValueError("not a memory problem"))
    with pytest.raises(ValueError, match="not a memory problem"):
        evaluation.generate_answers(model, tok, None, items, 3, batch_size=2)
