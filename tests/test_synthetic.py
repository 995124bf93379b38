"""Synthetic routing workloads: seeded, valid traces whose statistics move the way their
parameters say, fits that recover known parameters, and the simulator on them."""

import math

import numpy as np
import pytest

from moetier.cli import main
from moetier.errors import MoetierError
from moetier.offload.planner import spare_slots
from moetier.trace.analyze import analyze
from moetier.trace.format import load_trace
from moetier.trace.simulate import simulate
from moetier.trace.synthetic import KINDS, affinity_mass, fit, generate, generate_like


@pytest.mark.parametrize("kind", list(KINDS))
def test_seeded_valid_and_distinct(kind):
    a = generate(kind, 3, 16, 4, 500, seed=7)
    b = generate(kind, 3, 16, 4, 500, seed=7)
    c = generate(kind, 3, 16, 4, 500, seed=8)
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.expert_ids, c.expert_ids)
    ids = a.expert_ids.astype(np.int64)
    assert ids.min() >= 0 and ids.max() < 16
    assert (np.sort(ids, axis=2)[..., 1:] != np.sort(ids, axis=2)[..., :-1]).all()  # distinct per token
    assert np.allclose(a.weights.astype(np.float32).sum(axis=2), 1, atol=1e-2)
    assert (np.diff(a.weights.astype(np.float32), axis=2) <= 0).all()  # router's descending k order


def test_uniform_load_close_to_one_over_e():
    E, K, N = 16, 2, 20000
    stats = analyze(generate("uniform", 2, E, K, N, seed=0))
    sd = math.sqrt((1 / E) * (1 - 1 / E) / (N * K))  # binomial-ish share noise
    for s in stats.layers:
        assert np.abs(s.load_E - 1 / E).max() < 5 * sd
        assert s.entropy_bits > math.log2(E) - 0.01


def test_lognormal_larger_sigma_lower_entropy():
    ent = {sig: np.mean([s.entropy_bits for s in analyze(generate("lognormal", 4, 32, 2, 4000, seed=1,
                                                                    sigma=sig)).layers]) for sig in (0.0, 0.5, 1.5)}
    assert ent[0.0] > ent[0.5] > ent[1.5]


def test_markov_concentration_raises_affinity_mass():
    uniform = analyze(generate("uniform", 3, 32, 2, 4000, seed=2))
    markov = analyze(generate("markov", 3, 32, 2, 4000, seed=2, concentration=3.0))
    u = np.mean([m[1] for m in uniform.affinity_mass])
    mk = np.mean([m[1] for m in markov.affinity_mass])
    assert u < 2.5 / 32 and mk > 3 * u


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_fit_recovers_lognormal_sigma(sigma):
    donor = generate("lognormal", 4, 64, 2, 4000, seed=11, sigma=sigma)
    assert fit("lognormal", donor)["sigma"] == pytest.approx(sigma, abs=0.1 * sigma + 0.05)


def test_fit_recovers_markov_concentration_and_matches_mass():
    donor = generate("markov", 3, 32, 2, 3000, seed=5, concentration=1.5, sigma=0.5)
    params = fit("markov", donor)
    assert params["concentration"] == pytest.approx(1.5, abs=0.3)
    assert params["sigma"] == pytest.approx(0.5, abs=0.1)
    twin = generate_like("markov", donor, seed=99, **params)
    assert affinity_mass(twin) == pytest.approx(affinity_mass(donor), abs=0.02)


def test_generate_like_copies_shape_and_fit_rejects_hotspot():
    donor = generate("uniform", 2, 8, 2, 100, seed=0, expert_bytes=123)
    twin = generate_like("hotspot", donor, 50, seed=1, period=10)
    assert (len(twin.moe_layers), twin.num_experts, twin.top_k, twin.expert_bytes, twin.num_tokens) == (2, 8, 2, 123, 50)
    with pytest.raises(MoetierError):
        fit("hotspot", donor)
    with pytest.raises(MoetierError):
        generate("uniform", 1, 4, 5, 10)
    with pytest.raises(MoetierError):
        generate("lognormal", 1, 4, 1, 10, concentration=1.0)


def test_hotspot_rotates():
    t = generate("hotspot", 1, 32, 2, 2000, seed=3, hot_experts=4, hot_prob=0.95, period=500)
    windows = [set(np.unique(t.expert_ids[0, w * 500:(w + 1) * 500][:, 0]).tolist()) for w in range(4)]
    loads = [np.bincount(t.expert_ids[0, w * 500:(w + 1) * 500].reshape(-1), minlength=32) for w in range(4)]
    tops = [set(np.argsort(-ld)[:4].tolist()) for ld in loads]
    assert all(len(w) >= 4 for w in windows)
    assert tops[0] != tops[1] and len(tops[0] & tops[1]) == 0  # the next 4 of the layer's order


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_lru_hit_rate_on_uniform_single_layer_is_the_kept_fraction(fraction):
    E = 32
    trace = generate("uniform", 1, E, 1, 6000, seed=4)
    slots = round(fraction * E)
    hits, misses = simulate(trace, "lru", slots)
    kept = slots - spare_slots(slots, E)  # between steps the planner keeps its spare slots free
    assert hits / (hits + misses) == pytest.approx(kept / E, abs=0.03)
    b_hits, _ = simulate(trace, "belady", slots)
    assert b_hits >= hits


def test_cli_synth_then_fit(tmp_path):
    donor = tmp_path / "donor.npz"
    assert main(["trace", "synth", "--kind", "lognormal", "--sigma", "1.0", "--layers", "2", "--experts", "16",
                 "--top-k", "2", "--tokens", "2000", "--seed", "3", "--out", str(donor)]) == 0
    out = tmp_path / "fitted.npz"
    assert main(["trace", "synth", "--kind", "lognormal", "--fit", str(donor), "--out", str(out)]) == 0
    t = load_trace(out)
    assert (len(t.moe_layers), t.num_experts, t.top_k, t.num_tokens) == (2, 16, 2, 2000)
    assert t.model_id.startswith("synthetic:lognormal:")
    assert main(["trace", "synth", "--kind", "uniform", "--out", str(out)]) == 2  # no shape
    assert main(["trace", "synth", "--kind", "uniform", "--sigma", "1", "--layers", "1", "--experts", "4",
                 "--top-k", "1", "--out", str(out)]) == 2
