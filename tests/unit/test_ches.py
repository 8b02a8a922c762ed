"""CHES (Razin et al., arXiv 2410.08847, Definition 2): the formula on hand-made hidden states, the scorer on
the tiny model against its own hidden states, the pair file scored, and data.drop_top_ches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefopt.ches_scores import (
    CHESFilter,
    ches,
    ches_filter,
    ches_from_hidden,
    drop_top,
    score_file,
    score_pairs,
    scored_path,
)
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import tokenize_pairs
from prefopt.data.sources import FileData, PreferencePair
from prefopt.errors import ConfigError
from prefopt.models import ModelSpec, load_model, load_tokenizer
from tests.helpers.config import TINY_SPEC, compose_cfg

TOKENIZE = dict(max_length=128, max_prompt_length=64, chat_template=True, system_prompt=None)


def test_the_paper_formula_on_hand_made_hidden_states():
    # y+ has two tokens, y- four; H = 2.
    h_chosen = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # Σ = (4, 2), mean (2, 1)
    h_rejected = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0], [1.0, 1.0]])  # Σ = (4, 4), mean (1, 1)
    got = ches_from_hidden(h_chosen, h_rejected)
    assert got["ches"] == pytest.approx(4.0)  # <(4,2),(4,4)> − ||(4,2)||² = 24 − 20
    assert got["ches_length_normalized"] == pytest.approx(-2.0)  # <(2,1),(1,1)> − ||(2,1)||² = 3 − 5
    h_rejected = torch.tensor([[4.0, 2.0], [4.0, 2.0]])  # the same direction as y+: similar responses
    got = ches_from_hidden(h_chosen, h_rejected)
    assert got["ches"] == pytest.approx(8 * 4 + 4 * 2 - 20)  # <(4,2),(8,4)> − 20 = 20
    assert got["ches_length_normalized"] == pytest.approx(2 * 4 + 1 * 2 - 5)  # <(2,1),(4,2)> − 5 = 5
    # The score is not symmetric: it is centred on the preferred response.
    swapped = ches_from_hidden(h_rejected, h_chosen)
    assert swapped["ches"] == pytest.approx(40 - 80)


def test_the_batched_formula_matches_numpy():
    rng = np.random.default_rng(0)
    sc, sr = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    nc, nr = rng.integers(1, 9, size=5).astype(float), rng.integers(1, 9, size=5).astype(float)
    raw = ches(torch.tensor(sc), torch.tensor(sr)).numpy()
    np.testing.assert_allclose(raw, np.einsum("ij,ij->i", sc, sr) - np.einsum("ij,ij->i", sc, sc))
    mc, mr = sc / nc[:, None], sr / nr[:, None]
    ln = ches(torch.tensor(sc), torch.tensor(sr), torch.tensor(nc), torch.tensor(nr)).numpy()
    np.testing.assert_allclose(ln, np.einsum("ij,ij->i", mc, mr) - np.einsum("ij,ij->i", mc, mc))


@pytest.fixture(scope="module")
def tiny():
    spec = ModelSpec(**TINY_SPEC)
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    train, _, _ = ArithmeticData(n_train=10, n_eval=2).load()
    return spec, tok, model, train


def _direct(model, prompt_ids, completion_ids) -> torch.Tensor:
    """The hidden states that predict each completion token, from one unpadded forward with all states out."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    p = len(prompt_ids)
    return states[p - 1 : p + len(completion_ids) - 1]


def test_the_scorer_matches_the_models_own_hidden_states(tiny):
    _, tok, model, train = tiny
    model.eval()
    # Pairs of different lengths, so the batch is padded; the tiny model's random init makes scores non-trivial.
    pairs = train[:6] + [PreferencePair(train[0].prompt, train[0].chosen, train[1].chosen + " and more", "long")]
    got = score_pairs(model, tok, pairs, dict(TOKENIZE, completion_eos=None))
    tokenized, _ = tokenize_pairs(pairs, tok, **TOKENIZE)
    assert len(got) == len(tokenized) == len(pairs)
    for score, t in zip(got, tokenized):
        want = ches_from_hidden(
            _direct(model, t.prompt_ids, t.chosen_ids), _direct(model, t.prompt_ids, t.rejected_ids)
        )
        assert score is not None
        assert score["ches"] == pytest.approx(want["ches"], rel=1e-4, abs=1e-3)
        assert score["ches_length_normalized"] == pytest.approx(want["ches_length_normalized"], rel=1e-4, abs=1e-4)
    assert len({round(s["ches"], 3) for s in got if s}) > 1  # not one constant


def test_drop_top_drops_exactly_the_top_share():
    rows = [f"pair{i}" for i in range(10)]
    values = [0.5, 3.0, -1.0, 7.0, None, 2.0, 3.0, 0.0, 9.0, 1.0]  # 9 scored; None is kept
    kept, record = drop_top(rows, values, 0.25)
    # ⌊0.25 · 9⌋ = 2: the two highest, 9.0 (pair8) and 7.0 (pair3)
    assert kept == [r for r in rows if r not in ("pair8", "pair3")]
    assert record == {
        "share": 0.25,
        "pairs": 10,
        "scored": 9,
        "dropped": 2,
        "kept": 8,
        "threshold": 7.0,
        "highest_kept": 3.0,
    }
    kept, record = drop_top(rows, values, 0.4)  # ⌊3.6⌋ = 3: a tie at 3.0 drops the earlier pair (pair1)
    assert "pair1" not in kept and "pair6" in kept and record["dropped"] == 3
    kept, record = drop_top(rows, values, 0.0)
    assert kept == rows and record["dropped"] == 0 and record["threshold"] is None


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "a lot", True])
def test_bad_shares_are_refused_in_one_line(value):
    with pytest.raises(ConfigError) as err:
        CHESFilter(value)
    assert "data.drop_top_ches must be a share in [0, 1)" in str(err.value) and "\n" not in str(err.value)


def test_a_bad_variant_and_a_bad_share_in_the_config_are_reported():
    from prefopt import compose

    cfg = compose_cfg(["data.drop_top_ches=1.0", "data.ches_score=cosine"])
    with pytest.raises(ConfigError, match=r"data.drop_top_ches must be a share in \[0, 1\)"):
        compose.build(cfg)
    cfg = compose_cfg(["data.ches_score=cosine", "data.drop_top_ches=0.1"])
    with pytest.raises(ConfigError, match="data.ches_score must be one of raw, length_normalized"):
        compose.build(cfg)
    assert compose.build(compose_cfg([])).ches_filter is None  # off by default
    assert ches_filter(compose_cfg(["data.drop_top_ches=0.2"]).data) == CHESFilter(0.2, "length_normalized")


class _Hardware:
    is_main = True
    torch_device = torch.device("cpu")

    def barrier(self):
        pass


def test_the_filter_scores_with_the_reference_and_records_the_count(tiny, tmp_path):
    spec, tok, model, train = tiny
    rows = train[:10]
    tokenize = dict(TOKENIZE, completion_eos=None)
    kept, record = CHESFilter(0.3, "raw").apply(rows, spec, tok, tokenize, _Hardware(), tmp_path)
    scores = [s["ches"] for s in score_pairs(model, tok, rows, tokenize)]  # the same tiny init (its own seed)
    top = sorted(range(10), key=lambda i: -scores[i])[:3]
    assert kept == [r for i, r in enumerate(rows) if i not in top]
    assert record["dropped"] == 3 and record["pairs"] == 10 and record["source"] == "reference model"
    assert record["threshold"] == pytest.approx(sorted(scores)[-3], rel=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "ches.jsonl").read_text().splitlines()]
    assert [x["pair_id"] for x in lines] == [r.pair_id for r in rows]


def test_the_filter_uses_the_scores_a_pair_file_carries(tmp_path):
    rows = [
        PreferencePair("p", "a", "b", f"r{i}", metadata={"ches_length_normalized": float(v)})
        for i, v in enumerate([1, 5, 3, 4])
    ]
    kept, record = CHESFilter(0.5).apply(
        rows, spec=None, tokenizer=None, tokenize={}, hardware=_Hardware(), run_dir=tmp_path
    )
    assert [r.pair_id for r in kept] == ["r0", "r2"] and record["source"] == "pair file"
    assert record["threshold"] == 4.0 and record["highest_kept"] == 3.0


def test_a_pair_file_is_scored_row_by_row(tiny, tmp_path):
    _, tok, model, train = tiny
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "note": i} for i, p in enumerate(train[:4])
    ]
    rows.insert(2, {"prompt": "x", "chosen": "same", "rejected": "same"})  # identical: kept, not scored
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = FileData(path=str(path))
    out = scored_path(source, tmp_path / "run")
    assert out == tmp_path / "pairs.ches.jsonl"
    record = score_file(model, tok, source, dict(TOKENIZE, completion_eos=None), out, {"model": "tiny"})
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: w[k] for k in r} for w, r in zip(written, rows)] == rows  # the rows as they were
    assert "ches" not in written[2] and all("ches" in w for i, w in enumerate(written) if i != 2)
    want = score_pairs(model, tok, train[:4], dict(TOKENIZE, completion_eos=None))
    assert [w["ches"] for i, w in enumerate(written) if i != 2] == pytest.approx([s["ches"] for s in want])
    assert record["ches"]["scored"] == 4 and record["ches"]["unscored"] == 1
    assert json.loads(out.with_name(out.name + ".provenance.json").read_text())["model"] == "tiny"
    # The scored file trains with data.drop_top_ches and no model: its rows carry the scores.
    loaded, _, _ = FileData(path=str(out), eval_size=1).load()
    assert all("ches_length_normalized" in p.metadata for p in loaded)


def test_the_pair_stage_keeps_its_cache_key_unless_ches_is_on():
    from prefopt.mathloop.stages.sampling import PairsConfig

    assert "ches" not in PairsConfig().fingerprint()
    assert PairsConfig(ches=True).fingerprint()["ches"] is True
    with pytest.raises(ConfigError, match="pairs.ches must be true or false"):
        PairsConfig(ches="yes")


def test_write_pairs_keeps_the_scores(tmp_path):
    from prefopt.mathloop.stages.sampling import write_pairs

    pairs = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "pair_id": "0-1-2", "ches": 1.5, "ches_length_normalized": 0.5}
    ]
    write_pairs(tmp_path / "pairs.jsonl", pairs, {"policy": "x"})
    assert json.loads((tmp_path / "pairs.jsonl").read_text()) == pairs[0]
