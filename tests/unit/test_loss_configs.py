"""The loss yamls against the spec's table: keys, defaults, top-level beta, Hydra instantiation, bad values."""

from __future__ import annotations

import math
import re
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf

from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from prefopt.losses import LOSS_KEYS, Loss, PairLogps, available_losses, get_loss

# The defaults are read from docs/losses.md's two loss tables, so the document, the yamls and the functions are
# checked against each other and no third copy lives here.
DOCS = Path(__file__).resolve().parents[2] / "docs" / "losses.md"


def _split(cell):
    items, depth, cur = [], 0, ""
    for ch in cell:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return items + ([cur.strip()] if cur.strip() else [])


def _value(text):
    text = text.split(";")[0].strip()
    if text.startswith("`"):
        return text.strip("`")
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        return None  # not a default (e.g. mix's "list of {key, weight, ...}")


def documented_defaults(path: Path) -> dict[str, dict]:
    """{key: {hyper-parameter: default}} from the tables' `key` and `hyper-parameters (default)` columns."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_]+)`", cells[0])
        hparams = {}
        for item in _split(cells[2]):
            name = re.match(r"[a-z_]+", item)
            if name and "(" in item:
                value = _value(item[item.index("(") + 1 : item.rindex(")")])
                if value is not None:
                    hparams[name.group(0)] = value
        out.setdefault(keys[0], {}).update(hparams)
    return out


DOCUMENTED = documented_defaults(DOCS)
FIRST_BATCH_KEYS = {
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "slic",
    "caldpo",
    "simpo",
    "alpha_dpo",
    "bpo",
    "dpop",
    "rdpo",
    "orpo",
    "nca",
    "apo_zero",
    "apo_down",
    "rpo",
    "typo",
}
# Not in the tables: `sft` (a mixture's component, no hyper-parameters) and the mixtures' component lists.
SPEC_DEFAULTS = {
    **DOCUMENTED,
    "sft": {},
    "mix": {"beta": None, "components": [{"key": "dpo", "weight": 1.0}]},
    "mpo": {
        "beta": None,
        "components": [
            {"key": "dpo", "weight": 0.8},
            {"key": "bco_pair", "weight": 0.2},
            {"key": "sft", "weight": 1.0},
        ],
    },
}
REFERENCE_FREE = {"simpo", "orpo", "cpo", "sft"}
NEEDS = {"ld_dpo": ("prefix_logps",), "wpo": ("head_logps",)}
COMPOSITE = {"mix", "mpo"}  # reference and needs come from their components
WITH_BETA = sorted(k for k, v in SPEC_DEFAULTS.items() if "beta" in v)


def yaml_path(key):
    return conf_dir() / "loss" / f"{key}.yaml"


def test_yaml_stems_are_the_spec_keys():
    assert len(FIRST_BATCH_KEYS) == 17 and len(SPEC_DEFAULTS) == 17 + 13
    assert set(available_losses()) == set(SPEC_DEFAULTS)
    assert set(LOSS_KEYS) == set(SPEC_DEFAULTS)


@pytest.mark.parametrize("key", sorted(SPEC_DEFAULTS))
def test_yaml_shape(key):
    text = yaml_path(key).read_text(encoding="utf-8")
    assert text.startswith("# ") and len(text.splitlines()[0]) > 10
    node = OmegaConf.load(yaml_path(key))
    assert node._target_ == "prefopt.losses.Loss"
    assert node.key == key
    if key in COMPOSITE:
        assert node.reference is None and node.needs is None
    else:
        assert node.reference is (key not in REFERENCE_FREE)
        assert tuple(node.get("needs", ())) == NEEDS.get(key, ())
    if "beta" in SPEC_DEFAULTS[key]:
        default = "null" if SPEC_DEFAULTS[key]["beta"] is None else SPEC_DEFAULTS[key]["beta"]
        assert OmegaConf.to_container(node)["beta"] == f"${{top_or:beta,{default}}}"
    hparams = [k for k in node if k not in ("_target_", "key", "fn", "reference", "needs")]
    assert hparams == list(SPEC_DEFAULTS[key])  # same names, in the spec's order


@pytest.mark.parametrize("key", sorted(SPEC_DEFAULTS))
def test_get_loss_defaults_are_the_spec_defaults(key):
    loss = get_loss(key)
    assert isinstance(loss, Loss) and loss.key == key
    assert loss.hparams == SPEC_DEFAULTS[key]
    assert loss.reference is (key not in REFERENCE_FREE)
    assert loss.needs == NEEDS.get(key, ())
    # a flag stays a flag and a name a name (numbers: the document writes 0 for 0.0)
    kind = lambda v: type(v) if isinstance(v, (bool, str)) else "number"  # noqa: E731
    assert {k: kind(v) for k, v in loss.hparams.items()} == {k: kind(v) for k, v in SPEC_DEFAULTS[key].items()}


@pytest.mark.parametrize("key", sorted(set(SPEC_DEFAULTS) - COMPOSITE))
def test_function_defaults_are_the_spec_defaults(key):
    # A Loss built from the function alone (no yaml values) has the same defaults: direct calls agree.
    node = OmegaConf.load(yaml_path(key))
    loss = Loss(key, node.fn, reference=node.reference)
    assert loss.hparams == SPEC_DEFAULTS[key]


@pytest.mark.parametrize("key", sorted(SPEC_DEFAULTS))
@pytest.mark.parametrize("top_beta", [None, 0.3])
def test_every_yaml_instantiates_under_a_root_config(key, top_beta):
    root = OmegaConf.create({"beta": top_beta, "loss": OmegaConf.load(yaml_path(key))})
    loss = hydra.utils.instantiate(root.loss)
    assert isinstance(loss, Loss)
    assert loss.reference is (key not in REFERENCE_FREE)
    expected = dict(SPEC_DEFAULTS[key])
    if top_beta is not None and "beta" in expected:
        expected["beta"] = top_beta
    assert loss.hparams == expected
    # and it runs on a batch (with the optional fields, m = min(n_w, n_l) = 2 and 4)
    t = lambda *v: torch.tensor(v)  # noqa: E731
    policy = PairLogps(
        t(-5.0, -7.0),
        t(-6.0, -6.5),
        t(3, 4),
        t(2, 5),
        chosen_prefix=t(-4.0, -7.0),
        rejected_prefix=t(-6.0, -6.0),
        chosen_head=t(-1.0, -0.5),
        rejected_head=t(-2.0, -1.0),
    )
    reference = PairLogps(
        t(-5.5, -6.0), t(-5.0, -7.0), t(3, 4), t(2, 5), chosen_prefix=t(-4.5, -6.0), rejected_prefix=t(-5.0, -6.5)
    )
    out = loss(policy, reference if loss.reference else None)
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()


def test_get_loss_overrides_and_top_level_beta_absent():
    loss = get_loss("bpo", beta=0.05, alpha=1.0, form="savage")
    assert loss.hparams == {"beta": 0.05, "alpha": 1.0, "form": "savage"}
    assert get_loss("simpo", gamma=0.5).hparams == {"beta": 2.0, "gamma": 0.5}


# ------------------------------------------------------------------ bad values fail at construction

BAD = [
    ("beta", -0.1, "loss.beta must be > 0 (got -0.1)"),
    ("beta", 0, "loss.beta must be > 0"),
    ("beta", "abc", "loss.beta='abc': must be a number"),
    ("beta", math.inf, "loss.beta must be a finite number"),
]


@pytest.mark.parametrize("key", WITH_BETA)
@pytest.mark.parametrize("name, value, message", BAD)
def test_bad_beta_for_every_key(key, name, value, message):
    with pytest.raises(ConfigError) as err:
        get_loss(key, **{name: value})
    assert message in str(err.value) and f"'{key}'" in str(err.value)


@pytest.mark.parametrize(
    "key, hp, message",
    [
        ("bpo", {"alpha": 0}, "loss.alpha must be in (0, 1] (got 0)"),
        ("bpo", {"alpha": 1.5}, "loss.alpha must be in (0, 1] (got 1.5)"),
        ("bpo", {"alpha": -0.3}, "loss.alpha must be in (0, 1]"),
        (
            "bpo",
            {"form": "relu"},
            "loss.form must be one of logistic, hinge, square, exponential, truncated_quadratic, savage (got 'relu')",
        ),
        ("cdpo", {"label_smoothing": 0.5}, "loss.label_smoothing must be in [0, 0.5) (got 0.5)"),
        ("cdpo", {"label_smoothing": -0.1}, "loss.label_smoothing must be in [0, 0.5)"),
        ("robust", {"label_smoothing": 0.5}, "loss.label_smoothing must be in [0, 0.5) (got 0.5)"),
        ("robust", {"label_smoothing": 0.7}, "loss.label_smoothing must be in [0, 0.5)"),
        ("ipo", {"length_normalize": "yes"}, "loss.length_normalize='yes': must be true or false"),
        ("caldpo", {"calibration_weight": -1.0}, "loss.calibration_weight must be >= 0"),
        ("simpo", {"gamma": math.nan}, "loss.gamma must be a finite number"),
        ("dpop", {"dpop_lambda": -1}, "loss.dpop_lambda must be >= 0"),
        ("rdpo", {"length_alpha": -0.05}, "loss.length_alpha must be >= 0"),
        ("rpo", {"nll_weight": -1.0}, "loss.nll_weight must be >= 0"),
        ("typo", {"kl_weight": -1.0}, "loss.kl_weight must be >= 0"),
        ("alpha_dpo", {"momentum": 1.0}, "loss.momentum must be in [0, 1) (got 1.0)"),
        ("alpha_dpo", {"alpha": -0.2}, "loss.alpha must be >= 0"),
        ("alpha_dpo", {"gamma": "x"}, "loss.gamma='x': must be a number"),
    ],
)
def test_bad_hyperparameter_names_the_key(key, hp, message):
    with pytest.raises(ConfigError) as err:
        get_loss(key, **hp)
    assert message in str(err.value) and f"loss '{key}'" in str(err.value)


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"loss 'bpo' has no hyper-parameter gamma; valid: beta, alpha, form"):
        get_loss("bpo", gamma=1.0)
    with pytest.raises(ConfigError, match=r"loss 'dpo' has no hyper-parameter label_smoothing; valid: beta"):
        Loss("dpo", "prefopt.losses.sigmoid.dpo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"valid: beta, gamma, alpha, momentum"):
        Loss("alpha_dpo", "prefopt.losses.alpha_dpo.AlphaDPO", form="hinge")


def test_unknown_key_lists_the_available_ones():
    with pytest.raises(
        ConfigError, match=r"unknown loss 'kto'; available: alpha_dpo, aot, aot_unpaired, apo_down, .*typo, wpo$"
    ):
        get_loss("kto")


def test_bad_fn_and_reference_flag():
    with pytest.raises(ConfigError, match=r"loss.fn: cannot import 'prefopt.losses.sigmoid.nope'"):
        Loss("dpo", "prefopt.losses.sigmoid.nope")
    # A reference loss configured reference-free would never get its reference model.
    with pytest.raises(ConfigError, match=r"loss.reference is false but loss 'dpo' needs reference log-probs"):
        Loss("dpo", "prefopt.losses.sigmoid.dpo", reference=False)
    with pytest.raises(ConfigError, match=r"loss.reference must be true or false"):
        Loss("dpo", "prefopt.losses.sigmoid.dpo", reference="yes")


def test_bad_value_under_hydra_instantiate_chains_the_config_error():
    root = OmegaConf.create({"beta": -1.0, "loss": OmegaConf.load(yaml_path("dpo"))})
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(root.loss)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(x, ConfigError) and "loss.beta must be > 0 (got -1.0)" in str(x) for x in chain)


def test_stateless_losses_have_empty_state():
    loss = get_loss("dpo")
    assert loss.state_dict() == {}
    loss.load_state_dict({})
    with pytest.raises(ValueError, match="stateless"):
        loss.load_state_dict({"mu": 1.0})
    assert loss.eval() is loss and loss.training is False
    assert loss.train() is loss and loss.training is True


@pytest.mark.skipif(not (conf_dir() / "config.yaml").is_file(), reason="no root config yet")
@pytest.mark.parametrize(
    "overrides, beta",
    [(["loss=simpo"], 2.0), (["loss=simpo", "beta=0.3"], 0.3), (["loss=bpo", "beta=0.05", "loss.form=savage"], 0.05)],
)
def test_composed_run_config_reads_top_level_beta(overrides, beta):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    loss = hydra.utils.instantiate(cfg.loss)
    assert loss.hparams["beta"] == beta
    if "loss.form=savage" in overrides:
        assert loss.hparams["form"] == "savage"


@pytest.mark.parametrize(
    "overrides, betas",
    [
        (["loss=mpo"], {"dpo": 0.1, "bco_pair": 0.1}),  # no top-level beta: each component's own default
        (["loss=mpo", "beta=0.05"], {"dpo": 0.05, "bco_pair": 0.05}),  # the top-level beta reaches the components
        (["loss=mix", "beta=0.3"], {"dpo": 0.3}),
        (
            ["loss=mix", "beta=0.3", "loss.components=[{key: dpo, weight: 1.0, beta: 0.2}, {key: simpo, weight: 0.5}]"],
            {"dpo": 0.2, "simpo": 0.3},
        ),  # a component's own beta wins
    ],
)
def test_top_level_beta_reaches_mixture_components(overrides, betas):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    mix = hydra.utils.instantiate(cfg.loss)._impl
    got = {label: loss.hparams["beta"] for label, loss in zip(mix.labels, mix.losses) if "beta" in loss.hparams}
    assert got == betas
    assert "sft" not in got  # a component without a β is left alone
