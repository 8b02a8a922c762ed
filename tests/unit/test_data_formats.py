"""Every preference format TRL documents, read from the file layouts users bring, with the real tokenizers."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from prefopt.data.batching import tokenize_pairs
from prefopt.data.rows import read_rows
from prefopt.data.sources import FileData, load_rows
from prefopt.errors import ConfigError, DataError
from tests.helpers.config import compose_cfg

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 5?"},
]

# One row of each format (TRL's dataset-formats guide), as docs/data.md shows them.
FORMATS = {
    "standard": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "standard_implicit": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "conversational": {
        "prompt": TURNS,
        "chosen": [{"role": "assistant", "content": "8."}],
        "rejected": [{"role": "assistant", "content": "9."}],
    },
    "conversational_implicit": {
        "chosen": TURNS + [{"role": "assistant", "content": "8."}],
        "rejected": TURNS + [{"role": "assistant", "content": "9."}],
    },
}
EXPECTED = {
    "standard": ("The sky is", " blue.", " green."),
    "standard_implicit": ("The sky is", " blue.", " green."),
    "conversational": (tuple(TURNS), "8.", "9."),
    "conversational_implicit": (tuple(TURNS), "8.", "9."),
}


def write_jsonl(path, rows, newline="\n", bom=False):
    text = newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_trl_format_loads_with_its_prompt_and_completions(tmp_path, fmt):
    extra = {"score_chosen": 8.5, "score_rejected": 2.0, "id": "r-7"}
    pairs, stats = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{**FORMATS[fmt], **extra}] * 3)))
    assert stats.kept == 3
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == EXPECTED[fmt]
    assert pairs[0].metadata == extra  # extra columns are kept, not lost


def test_the_same_formats_load_from_parquet_and_a_hub_snapshot_directory(tmp_path):
    from datasets import Dataset

    rows = [{**FORMATS["conversational_implicit"], "score_chosen": float(i)} for i in range(4)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    pairs, _ = load_rows(str(tmp_path / "pairs.parquet"))
    assert pairs[3].prompt == tuple(TURNS) and pairs[3].chosen == "8." and pairs[3].metadata == {"score_chosen": 3.0}
    snapshot = tmp_path / "org__name"  # a hub data set as `huggingface-cli download --repo-type dataset` leaves it
    (snapshot / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(rows[:2]).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    train, held, info = FileData(path=str(snapshot), eval_split="test").load()
    assert (len(train), len(held), info["eval"]["kept"]) == (4, 2, 2) and held[0].rejected == "9."


def test_multi_turn_prompts_reach_the_model_whole_through_the_chat_template(real_tokenizer, tmp_path):
    name, tok = real_tokenizer
    eos = "<|im_end|>" if name == "qwen2.5" else "<|eot_id|>"
    for fmt in ("conversational", "conversational_implicit"):
        pairs, _ = load_rows(str(write_jsonl(tmp_path / f"{fmt}.jsonl", [FORMATS[fmt]])))
        (tp,), _ = tokenize_pairs(
            pairs,
            tok,
            max_length=256,
            max_prompt_length=128,
            completion_eos=eos,
            system_prompt="IGNORED: the row brings its own system message",
        )
        rendered = tok.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
        assert tp.prompt_ids == tuple(tok(rendered, add_special_tokens=False).input_ids)
        text = tok.decode(tp.prompt_ids)
        for m in TURNS:  # the system message and the earlier exchange are there, in order
            assert m["content"] in text
        assert text.index(SYSTEM["content"]) < text.index("What is 2 + 2?") < text.index("And 3 + 5?")
        assert "IGNORED" not in text
        assert tok.decode(tp.chosen_ids) == "8." + eos


def test_nested_fields_are_reached_by_dotted_paths_and_a_missing_one_is_named(tmp_path):
    rows = [
        {
            "question": f"What is {i} + 1?",
            "chosen": {"solution": f"{i + 1}", "correct": True},
            "rejected": {"solution": f"{i + 2}", "correct": False},
            "idx": i,
        }
        for i in range(3)
    ]
    fields = {"prompt": "question", "chosen": "chosen.solution", "rejected": "rejected.solution"}
    pairs, _ = load_rows(str(write_jsonl(tmp_path / "bpo.jsonl", rows)), fields=fields)
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ("What is 2 + 1?", "3", "4")
    assert pairs[2].metadata == {"chosen": {"correct": True}, "rejected": {"correct": False}, "idx": 2}
    del rows[1]["rejected"]["solution"]
    with pytest.raises(DataError, match=r"bpo\.jsonl: row 2: missing field 'rejected\.solution'"):
        load_rows(str(write_jsonl(tmp_path / "bpo.jsonl", rows)), fields=fields)
    with pytest.raises(
        DataError,
        match=r"row 1: field 'chosen' must be a string or a list of messages \(got dict "
        r"with fields \['correct', 'solution'\].*chosen\.solution",
    ):
        load_rows(str(tmp_path / "bpo.jsonl"), fields={"prompt": "question"})


def test_a_byte_order_mark_and_crlf_line_ends_load(tmp_path):
    rows = [{"prompt": "Combien font 2 + 2 ?", "chosen": "4 — évidemment", "rejected": "5"}] * 2
    pairs, _ = load_rows(str(write_jsonl(tmp_path / "win.jsonl", rows, newline="\r\n", bom=True)))
    assert [p.chosen for p in pairs] == ["4 — évidemment"] * 2 and pairs[0].prompt == "Combien font 2 + 2 ?"
    (tmp_path / "win.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode())
    assert [p.chosen for p in load_rows(str(tmp_path / "win.json"))[0]] == ["4 — évidemment"] * 2


def test_json_files_of_every_shape_load(tmp_path):
    rows = [FORMATS["standard"], FORMATS["conversational"]]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "lines.json", rows)  # JSON Lines saved with a .json name
    for name in ("list.json", "wrapped.json", "lines.json"):
        pairs, _ = load_rows(str(tmp_path / name))
        assert [p.chosen for p in pairs] == [" blue.", "8."], name


def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode() + b"\n"
    bad = b'{"prompt": "q", "chosen": "caf\xe9", "rejected": "b"}\n'  # Latin-1 é, as an old Windows tool writes it
    (tmp_path / "latin1.jsonl").write_bytes(good + good + bad)
    offset = 2 * len(good) + bad.index(b"\xe9")
    with pytest.raises(DataError) as err:
        read_rows(str(tmp_path / "latin1.jsonl"))
    assert str(err.value) == (
        f"{tmp_path / 'latin1.jsonl'}: line 3: byte 0xe9 at byte offset {offset} is not UTF-8; save the file as UTF-8"
    )
    (tmp_path / "latin1.json").write_bytes(b"[\n" + good + b",\n" + bad + b"]")
    with pytest.raises(DataError, match=r"latin1\.json: line 4: byte 0xe9 at byte offset \d+ is not UTF-8"):
        read_rows(str(tmp_path / "latin1.json"))


def test_implicit_prompt_rows_that_share_nothing_or_mix_formats_are_named(tmp_path):
    rows = [FORMATS["standard_implicit"], {"chosen": "Blue.", "rejected": "Green."}]
    with pytest.raises(DataError, match=r"row 2: no 'prompt' field and 'chosen'/'rejected' share no prompt"):
        load_rows(str(write_jsonl(tmp_path / "x.jsonl", rows)))
    with pytest.raises(DataError, match=r"row 2: has a 'prompt' but row 1 has none \(implicit prompt\)"):
        load_rows(str(write_jsonl(tmp_path / "x.jsonl", [FORMATS["standard_implicit"], FORMATS["standard"]])))
    with pytest.raises(DataError, match=r"row 1: missing field 'prompt'"):  # a null prompt is missing, not implicit
        load_rows(str(write_jsonl(tmp_path / "x.jsonl", [{**FORMATS["standard"], "prompt": None}])))
    turns = FORMATS["conversational_implicit"]
    two = {"chosen": turns["chosen"] + [{"role": "user", "content": "ok"}], "rejected": turns["rejected"]}
    with pytest.raises(
        DataError,
        match=r"row 1: field 'chosen': the completion must be one assistant message "
        r"\(got roles \['assistant', 'user'\]\)",
    ):
        load_rows(str(write_jsonl(tmp_path / "y.jsonl", [two])))


@pytest.mark.parametrize(
    "eval_size,total,held", [(0.05, 100, 5), (0.05, 10, 1), (0.5, 7, 3), (10, 100, 10), (3.0, 8, 3)]
)
def test_eval_size_is_a_fraction_or_a_count(tmp_path, eval_size, total, held):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(total)]
    train, evals, _ = FileData(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_size=eval_size).load()
    assert (len(train), len(evals)) == (total - held, held)
    assert evals[-1].prompt == f"q{total - 1}"  # held out from the end


def test_eval_size_larger_than_half_names_both_numbers(tmp_path):
    path = str(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(100)])
    )
    with pytest.raises(DataError, match=r"data\.source\.eval_size=64 is more than half of the 100 pairs"):
        FileData(path=path, eval_size=64).load()
    with pytest.raises(ConfigError, match=r"data\.source\.eval_size=0\.6: at most half"):
        FileData(path=path, eval_size=0.6).load()
    with pytest.raises(ConfigError, match=r"data\.source\.eval_size must be a fraction in \(0, 0\.5\] or a count"):
        FileData(path=path, eval_size=0).load()


def test_the_jsonl_preset_trains_on_an_implicit_prompt_conversation_file_and_warms_up_on_it(tiny_run, tmp_path):
    rows = [
        {
            "chosen": TURNS + [{"role": "assistant", "content": f"{i + 8}."}],
            "rejected": TURNS + [{"role": "assistant", "content": f"{i + 9}."}],
            "score_chosen": i,
        }
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows, newline="\r\n", bom=True)
    summary, run_dir = tiny_run(
        "data=jsonl",
        f"data.source.path={path}",
        "steps=2",
        "mathloop.warmup=true",
        "warmup.steps=2",
        "warmup.batch_size=4",
        "warmup.micro_batch_size=4",
        "mathloop.cache=false",
        "data.max_length=256",
        "data.max_prompt_length=192",
    )
    assert summary["status"] == "complete"
    assert summary["data"]["tokenize"]["train"]["pairs"] == 19 and summary["data"]["tokenize"]["eval"]["pairs"] == 1
    assert (
        summary["mathloop"]["warmup"]["cached"] is False and (run_dir / "warmup" / "policy" / "config.json").is_file()
    )


def test_the_readme_field_mapping_override_composes_into_the_source(tmp_path):
    rows = [
        {"question": "What is 3 + 5?", "chosen": {"solution": "\\boxed{8}"}, "rejected": {"solution": "\\boxed{9}"}}
    ] * 4
    path = write_jsonl(tmp_path / "bpo.jsonl", rows)
    cfg = compose_cfg(
        [
            "data=jsonl",
            f"data.source.path={path}",
            "data.source.fields={prompt: question, chosen: chosen.solution, rejected: rejected.solution}",
        ]
    )
    train, held, _ = instantiate(cfg.data.source).load()
    assert (len(train), len(held)) == (3, 1) and train[0].chosen == "\\boxed{8}" and cfg.data.truncation == "keep_end"
