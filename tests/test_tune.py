"""Tune mode: the search space from TOML, the block-wise split, best_params round trip, resumption."""
import tomllib

import optuna
import pytest

import uavloc as U


def test_search_space_is_read_from_toml_with_types(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[tune.space."geometry.min_inliers"]\nlow = 10\nhigh = 30\n'
                 '[tune.space."features.backend"]\nchoices = ["aliked", "xfeat"]\n')
    s = U.load_settings(str(f))
    space = U.search_space(s)
    assert space["geometry.min_inliers"] == {"low": 10, "high": 30}
    assert space["features.backend"]["choices"] == ("aliked", "xfeat")
    assert space["scale.virtual_zoom"] == {"low": 0.7, "high": 1.3}      # settings.toml's own entries stay
    values = {k: s.value(k) for k in space}
    trial = optuna.trial.FixedTrial({**values, "geometry.min_inliers": 17, "features.backend": "xfeat"})
    params = U.suggest(trial, space, s)
    assert params["geometry.min_inliers"] == 17 and isinstance(params["geometry.min_inliers"], int)
    assert params["features.backend"] == "xfeat"
    assert s.with_values(params).geometry.min_inliers == 17 and s.geometry.min_inliers == 12


@pytest.mark.parametrize("table, words", [
    ('[tune.space."geometry.nope"]\nlow = 1\nhigh = 2\n', "'geometry.nope' is not a setting"),
    ('[tune.space."geometry.min_inliers"]\nlow = 5\nhigh = 5\n', "low < high"),
    ('[tune.space."features.backend"]\nchoices = []\n', "non-empty list"),
])
def test_bad_search_space_is_a_usage_error(table, words, tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(table)
    with pytest.raises(U.UsageError, match=words):
        U.search_space(U.load_settings(str(f)))


def test_tune_split_hides_blocks_and_keeps_a_holdout_apart():
    s = U.load_settings()
    train = [i for i in range(1, 120) if i % 7]          # gaps like test ids interleaved with train ids
    sp = U.tune_split(train, s)
    val = [i for b in sp.val_blocks for i in b]
    assert set(sp.fit) | set(val) | set(sp.holdout) == set(train)
    assert not (set(sp.fit) & set(val)) and not (set(sp.holdout) & (set(sp.fit) | set(val)))
    assert len(sp.holdout) == round(0.2 * len(train))
    for block in sp.val_blocks:                          # each block is consecutive in train order
        pos = [train.index(i) for i in block]
        assert pos == list(range(pos[0], pos[0] + len(pos)))
    assert sum(len(b) >= 2 for b in sp.val_blocks) >= len(sp.val_blocks) - 1
    assert U.tune_split(train, s) == sp                  # seeded: the same split every run


def test_best_params_round_trip_into_settings(tmp_path):
    params = {"features.match_threshold": 0.2143, "geometry.min_inliers": 26, "localize.search_radius": 204.5}
    path = tmp_path / "best_params.toml"
    path.write_text(U.params_toml(params, "test"))
    s = U.load_settings(str(path))
    assert s.features.match_threshold == 0.2143 and s.geometry.min_inliers == 26
    assert s.localize.search_radius == 204.5
    tuned = tomllib.loads(U.apply_params(U.DEFAULT_SETTINGS.read_text(), params))
    assert tuned["geometry"]["min_inliers"] == 26 and tuned["features"]["match_threshold"] == 0.2143
    assert tuned["features"]["backend"] == U.load_settings().features.backend   # the rest untouched


def test_study_resumes_after_a_kill(tmp_path):
    s = U.load_settings(None, None, ["tune.storage=sqlite:///" + str(tmp_path / "t.db"), "tune.study=t"])
    space = U.search_space(s)

    def objective(trial):
        p = U.suggest(trial, space, s)
        return -abs(p["geometry.min_inliers"] - 20)

    study, _ = U.open_study(s, tmp_path, "fp")
    study.optimize(objective, n_trials=3)
    study.ask()                              # a trial left RUNNING, as by a killed process
    first = [(t.number, t.params) for t in study.trials[:3]]
    assert first[0][1]["geometry.min_inliers"] == 12     # trial 0 is the base settings

    study, _ = U.open_study(s, tmp_path, "fp")
    states = [t.state for t in study.trials]
    assert states[3] == optuna.trial.TrialState.FAIL
    study.optimize(objective, n_trials=2)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5 and [(t.number, t.params) for t in study.trials[:3]] == first
    assert len({tuple(sorted(t.params.items())) for t in done}) == 5     # no trial repeated
    with pytest.raises(U.UsageError, match="other data"):
        U.open_study(s, tmp_path, "another fingerprint")
