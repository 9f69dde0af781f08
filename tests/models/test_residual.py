"""The residual user updater: the net's identity skip, the ``UserUpdater`` contract,
checkpoints that do not fit, and running inside the user-profile service's handler."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.lab.training.checkpoint import save_checkpoint
from infra.lab.training.residual import ResidualNet, save_residual, updater_of
from shared.events import ItemRated, RatingSubmitted, UserProfileUpdated
from shared.exceptions import ConfigurationError, NumericalError
from shared.handlers.user_profile import handle_ratings
from shared.kafka.message import Incoming, Source
from shared.models.residual import ResidualUpdater, load_residual_updater
from shared.models.updater import DEFAULT_PRIOR_RATING, UserState, UserUpdater, shrunk_mean_rating
from shared.types import MovieId, Vector
from tests.models.residual_data import DIM, T0, history, random_net, unit_rows


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """The nets here are tiny (see ``one_torch_thread``)."""


@pytest.fixture
def updater() -> ResidualUpdater:
    return updater_of(random_net())


# --- the net ------------------------------------------------------------------------------


def test_a_zero_output_layer_is_the_identity() -> None:
    net = random_net()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
    users = torch.from_numpy(unit_rows(5, seed=3) * 3.0)  # not unit: only the direction stays
    items = torch.from_numpy(unit_rows(5, seed=4))
    with torch.no_grad():
        out = net(users, items, torch.tensor([1.0, 2, 3, 4, 5]), torch.ones(5), torch.ones(5))
    expected = users / users.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)
    # A fresh net starts as the identity too (its output layer is zero-initialised).
    fresh = ResidualNet(DIM)
    with torch.no_grad():
        start = fresh(expected, items, torch.full((5,), 5.0), torch.zeros(5), torch.zeros(5))
    torch.testing.assert_close(start, expected)


def test_output_is_unit_length_and_depends_on_every_input() -> None:
    net = random_net()
    users = torch.from_numpy(unit_rows(1, seed=5))
    items = torch.from_numpy(unit_rows(1, seed=6))
    base = (users, items, torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([3.0]))
    with torch.no_grad():
        ref = net(*base)
        assert float(ref.norm()) == pytest.approx(1.0, abs=1e-5)
        for i, other in enumerate(
            [torch.tensor([1.0]), torch.tensor([500.0]), torch.tensor([40.0])], start=2
        ):
            args = list(base)
            args[i] = other
            assert not torch.allclose(net(*args), ref), f"input {i} is ignored"


# --- the UserUpdater contract -------------------------------------------------------------


def test_follows_the_protocol(updater: ResidualUpdater) -> None:
    assert isinstance(updater, UserUpdater)
    assert updater.model_version.startswith("residual-v1-")
    assert updater.dim == DIM


def test_the_centre_is_the_prior_every_new_user_starts_from() -> None:
    net = random_net()
    updater = updater_of(net)
    centre = updater.centre()
    assert centre.dtype == np.float32 and centre.shape == (DIM,)
    np.testing.assert_allclose(centre, net.prior_vector().detach().numpy(), atol=1e-6)
    centre[:] = 0.0  # a copy: the updater keeps its own
    assert float(np.linalg.norm(updater.centre())) == pytest.approx(1.0, abs=1e-5)


def test_no_vector_before_any_rating_then_unit_float32(updater: ResidualUpdater) -> None:
    state = updater.initial_state()
    assert updater.vector(state) is None
    assert updater.mean_rating(state) == pytest.approx(DEFAULT_PRIOR_RATING)
    for n in (1, 2, 10):
        later = history(updater, n, seed=n)
        vector = updater.vector(later)
        assert vector is not None and vector.dtype == np.float32 and vector.shape == (DIM,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
        assert later.vector is not None and later.vector.dtype == np.float32
        assert later.weight == 0.0
        assert later.n_ratings == n
        assert updater.mean_rating(later) == pytest.approx(shrunk_mean_rating(later))


def test_first_rating_is_applied_to_the_prior() -> None:
    net = random_net().double()
    updater = updater_of(net)
    item = unit_rows(1, seed=7)[0]
    state = updater.learn_one(updater.initial_state(), item, 4.0, T0)
    with torch.no_grad():
        expected = net(
            net.prior_vector()[None],
            torch.from_numpy(item.astype(np.float64))[None],
            torch.tensor([4.0], dtype=torch.float64),
            torch.zeros(1, dtype=torch.float64),
            torch.zeros(1, dtype=torch.float64),
        )[0].numpy()
    assert state.vector is not None
    np.testing.assert_allclose(state.vector, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("use_gap", "use_count"), [(True, True), (False, True), (True, False)])
def test_the_numpy_step_is_the_torch_nets_forward(use_gap: bool, use_count: bool) -> None:
    """The service runs the weights in numpy; the lab trains the torch module: on the
    same weights both give the same vectors (float64 rounding)."""
    torch.manual_seed(3)
    net = ResidualNet(DIM, hidden=32, layers=3, use_gap=use_gap, use_count=use_count).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.3)
    rng = np.random.default_rng(4)
    users, items = (
        unit_rows(64, seed=5).astype(np.float64),
        unit_rows(64, seed=6).astype(np.float64),
    )
    stars = rng.integers(1, 11, 64) / 2.0
    gaps, counts = rng.exponential(50.0, 64), rng.integers(0, 300, 64).astype(np.float64)
    with torch.no_grad():
        expected = net(*(torch.from_numpy(a) for a in (users, items, stars, gaps, counts))).numpy()
    got = updater_of(net).step(users, items, stars, gaps, counts)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_counters_follow_and_bookkeeping_is_untouched(updater: ResidualUpdater) -> None:
    state = history(updater, 3, seed=8).after("m-1", 3.0, 41)
    new = updater.learn_one(state, unit_rows(1, seed=9)[0], 2.5, T0 + timedelta(days=2))
    assert new.n_ratings == 4
    assert new.rating_sum == pytest.approx(state.rating_sum + 2.5)
    assert new.last_at == T0 + timedelta(days=2)
    assert new.rated == ("m-1",)
    assert new.ratings == (3.0,)
    assert new.last_offset == 41
    assert new is not state and state.n_ratings == 3  # pure


def test_learn_many_equals_learn_one_row_by_row(updater: ResidualUpdater) -> None:
    states = [updater.initial_state(), history(updater, 1, seed=10), history(updater, 7, seed=11)]
    states += [history(updater, 2, seed=12), updater.initial_state()]
    items = list(unit_rows(len(states), seed=13))
    ratings = [0.5, 5.0, 3.0, 4.5, 1.0]
    times = [T0 + timedelta(days=3, hours=h) for h in range(len(states))]

    batch = updater.learn_many(states, items, ratings, times)
    single = [updater.learn_one(*row) for row in zip(states, items, ratings, times, strict=True)]

    for b, s in zip(batch, single, strict=True):
        assert b.vector is not None and s.vector is not None
        np.testing.assert_allclose(b.vector, s.vector, rtol=1e-6, atol=1e-7)
        assert (b.n_ratings, b.rating_sum, b.last_at, b.weight) == (
            s.n_ratings,
            s.rating_sum,
            s.last_at,
            s.weight,
        )
    assert updater.learn_many([], [], [], []) == []


def test_state_survives_serialisation(updater: ResidualUpdater) -> None:
    state = history(updater, 4, seed=14).after("m-9", 4.0, 7)
    back = UserState.from_bytes(state.to_bytes())
    assert back.vector is not None and state.vector is not None
    np.testing.assert_array_equal(back.vector, state.vector)
    item = unit_rows(1, seed=15)[0]
    a = updater.learn_one(state, item, 4.0, T0 + timedelta(days=9))
    b = updater.learn_one(back, item, 4.0, T0 + timedelta(days=9))
    assert a.vector is not None and b.vector is not None
    np.testing.assert_array_equal(a.vector, b.vector)


def test_nan_and_infinity_are_numerical_errors(updater: ResidualUpdater) -> None:
    state = history(updater, 2, seed=16)
    item = unit_rows(1, seed=17)[0]
    bad = item.copy()
    bad[3] = np.nan
    with pytest.raises(NumericalError):
        updater.learn_one(state, bad, 4.0, T0)
    with pytest.raises(NumericalError):
        updater.learn_one(state, item, float("nan"), T0)
    with pytest.raises(NumericalError):
        updater.learn_one(state, np.full(DIM, np.inf, dtype=np.float32), 4.0, T0)
    with pytest.raises(NumericalError):
        updater.learn_many([state, state], [item, bad], [4.0, 4.0], [T0, T0])
    broken = replace(state, vector=np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(NumericalError):
        updater.vector(broken)
    with pytest.raises(NumericalError):
        updater.learn_one(broken, item, 4.0, T0)


def test_other_dimensions_are_refused(updater: ResidualUpdater) -> None:
    state = history(updater, 2, seed=18)
    wide = unit_rows(1, seed=19, dim=DIM + 1)[0]
    with pytest.raises(ValueError, match="dimension"):
        updater.learn_one(updater.initial_state(), wide, 4.0, T0)
    with pytest.raises(ValueError, match="dimension"):
        updater.learn_many([state], [wide], [4.0], [T0])
    narrow_state = replace(state, vector=unit_rows(1, seed=20, dim=DIM - 1)[0])
    with pytest.raises(ValueError, match="dimension"):
        updater.learn_one(narrow_state, unit_rows(1, seed=21)[0], 4.0, T0)


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_of_another_dimension_or_kind_is_refused(tmp_path: Path) -> None:
    save_residual(tmp_path / "ck", random_net(), {})
    with pytest.raises(ConfigurationError, match="16-d"):
        load_residual_updater(tmp_path / "ck", expected_dim=DIM + 4)
    save_checkpoint(tmp_path / "other", random_net(), {"kind": "fusion", "version": "x"})
    with pytest.raises(ConfigurationError, match="not a 'residual-updater'"):
        load_residual_updater(tmp_path / "other")
    # A config that promises another width than the weights have.
    save_residual(tmp_path / "lying", random_net(), {})
    config_file = tmp_path / "lying" / "config.json"
    config_file.write_text(config_file.read_text().replace('"hidden": 32', '"hidden": 64'))
    with pytest.raises(ConfigurationError, match="does not fit"):
        load_residual_updater(tmp_path / "lying")


# --- inside the user-profile service's handler --------------------------------------------


def test_works_inside_handle_ratings(updater: ResidualUpdater) -> None:
    vectors: dict[MovieId, Vector] = {f"m{i}": v for i, v in enumerate(unit_rows(4, seed=23))}
    events = [
        RatingSubmitted(user_id="alice", movie_id="m0", rating=5.0, occurred_at=T0),
        RatingSubmitted(user_id="bob", movie_id="m1", rating=2.0, occurred_at=T0),
        RatingSubmitted(
            user_id="alice", movie_id="m2", rating=4.0, occurred_at=T0 + timedelta(hours=5)
        ),
    ]
    batch = [Incoming(e, Source("ratings", 0, i, None, None, None)) for i, e in enumerate(events)]

    out, updated = handle_ratings(batch, {}, vectors, updater, T0, item_model_version="items-v9")

    profiles = {o.event.user_id: o.event for o in out if isinstance(o.event, UserProfileUpdated)}
    feedback = [o for o in out if isinstance(o.event, ItemRated)]
    assert set(profiles) == {"alice", "bob"} and len(feedback) == 3
    assert len(out) == 5  # no dead letters
    alice = profiles["alice"]
    assert alice.model_version == f"{updater.model_version}+items-v9"
    assert alice.n_ratings == 2 and alice.rated == ["m0", "m2"]
    expected = updater.initial_state()
    for e in (events[0], events[2]):
        expected = updater.learn_one(expected, vectors[e.movie_id], e.rating, e.occurred_at)
    assert expected.vector is not None
    np.testing.assert_allclose(alice.vector, expected.vector, rtol=1e-6, atol=1e-7)
    assert updated["alice"].state.last_offset == 2 and updated["bob"].state.last_offset == 1

    # A later batch continues from the stored bytes; a re-delivery is not applied again.
    stored = {u: s.to_bytes() for u, s in updated.items()}
    again = [Incoming(events[2], Source("ratings", 0, 2, None, None, None))]
    later = RatingSubmitted(
        user_id="alice", movie_id="m3", rating=1.0, occurred_at=T0 + timedelta(days=1)
    )
    again.append(Incoming(later, Source("ratings", 0, 3, None, None, None)))
    out2, updated2 = handle_ratings(again, stored, vectors, updater, T0)
    final = updater.learn_one(expected, vectors["m3"], 1.0, later.occurred_at)
    assert updated2["alice"].state.n_ratings == 3
    assert updated2["alice"].state.vector is not None and final.vector is not None
    np.testing.assert_allclose(updated2["alice"].state.vector, final.vector, rtol=1e-6, atol=1e-7)
    assert [type(o.event) for o in out2] == [ItemRated, UserProfileUpdated]
