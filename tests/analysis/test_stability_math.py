"""The analysis math on loops with known answers (no plant needed)."""
import math

import control as ct
import numpy as np
import pytest

from palsctl.analysis.stability import (
    FOPDT,
    analyze_loop,
    closed_loop,
    critical_gain_scale,
    discrete_plant,
    identify_fopdt,
    loop_tf,
    margins,
    pi_tf,
    plot_stability_map,
    recommend_gains,
    simulate_fopdt_response,
    stability_map,
)


def _brute_force(p: FOPDT, u: np.ndarray, sub: int = 2000) -> np.ndarray:
    """Fine-grid simulation of the continuous lag + dead time + moving-average sensor."""
    T, n = p.dt_s, len(u)
    h = T / sub
    t = np.arange(n * sub) * h + h / 2
    k = np.floor((t - p.delay_s) / T + 1e-12).astype(int)
    v = np.where(k >= 0, u[np.clip(k, 0, n - 1)], 0.0)
    a = math.exp(-h / p.tau_s)
    x = np.zeros(n * sub + 1)
    for i in range(n * sub):
        x[i + 1] = a * x[i] + (1 - a) * p.gain * v[i]
    cum = np.concatenate([[0.0], np.cumsum((x[:-1] + x[1:]) / 2) * h])
    out = []
    for kk in range(n):
        i1 = kk * sub
        if p.window_s == 0:
            out.append(x[i1])
        else:
            i0 = max(i1 - int(round(p.window_s / h)), 0)
            out.append((cum[i1] - cum[i0]) / p.window_s)
    return np.array(out)


@pytest.mark.parametrize("gain,tau,delay,dt,window", [
    (2.0, 0.5, 0.0, 1.0, 1.0),      # lag, window = period
    (1.5, 0.2, 1.7, 1.0, 1.0),      # dead time longer than a period, fractional part
    (1.0, 0.8, 0.4, 0.5, 1.3),      # window spans several periods, not a whole number
    (1.0, 0.3, 0.2, 1.0, 0.4),      # window shorter than the period
    (1.0, 0.3, 0.2, 1.0, 0.0),      # instantaneous sample
])
def test_discrete_plant_matches_a_fine_grid_simulation(gain, tau, delay, dt, window):
    p = FOPDT(gain=gain, tau_s=tau, delay_s=delay, dt_s=dt, window_s=window)
    u = np.array([0, 0, 1, 1, 1, -0.5, 2, 2, 2, 0, 0, 0, 1, 1], dtype=float)
    np.testing.assert_allclose(simulate_fopdt_response(p, u), _brute_force(p, u), atol=1e-5)


def test_discrete_plant_equals_c2d_of_averaged_lag():
    # no dead time, window = period: y_k = (Z(kT) − Z((k−1)T))/T with Z = ∫x, i.e.
    # c2d(G(s)/s) · (z − 1)/(T z)
    K, tau, T = 3.0, 0.7, 1.0
    ref = ct.c2d(ct.tf([K], [tau, 1, 0]), T, method="zoh") * ct.tf([1, -1], [T, 0], T)
    ours = ct.tf(discrete_plant(FOPDT(gain=K, tau_s=tau, delay_s=0, dt_s=T, window_s=T)))
    w = np.linspace(0.01, math.pi - 0.01, 50)
    z = np.exp(1j * w)
    np.testing.assert_allclose(ours(z), ref(z), rtol=1e-8)


def test_gain_margin_textbook_ogata_loop():
    # ZOH of 1/(s(s+1)) at T = 1 s: G(z) = (e⁻¹z + 1 − 2e⁻¹)/((z − 1)(z − e⁻¹)). The closed
    # loop K·G is stable for 0 < K < (1 − e⁻¹)/(1 − 2e⁻¹) ≈ 2.3922 (Jury; Ogata, Discrete-Time
    # Control Systems), where a complex pair crosses the unit circle.
    G = ct.tf(ct.c2d(ct.tf(1, [1, 1, 0]), 1.0, method="zoh"))
    k_crit = (1 - math.exp(-1)) / (1 - 2 * math.exp(-1))
    m = margins(G)
    assert m.gain_margin == pytest.approx(k_crit, rel=1e-6)
    assert m.gain_margin_db == pytest.approx(20 * math.log10(k_crit), rel=1e-6)
    assert critical_gain_scale(G) == pytest.approx(k_crit, rel=1e-6)
    assert m.phase_margin_deg == pytest.approx(ct.stability_margins(G)[1], abs=1e-6)


@pytest.mark.parametrize("g", [0.1, 0.5, 1.5])
def test_gain_margin_of_pure_integrator_loop_is_found_at_z_minus_one(g):
    # L = g/(z − 1): closed-loop pole 1 − g·k, unstable when k > 2/g (pole crosses at z = −1).
    # PM: |L| = 1 at 2 sin(ω/2) = g, PM = 90° − ω/2.
    L = ct.tf([g], [1, -1], 1.0)
    m = margins(L)
    assert m.gain_margin == pytest.approx(2 / g, rel=1e-9)
    assert m.gm_freq_hz == pytest.approx(0.5, rel=1e-9)          # Nyquist frequency
    assert m.phase_margin_deg == pytest.approx(90 - math.degrees(math.asin(g / 2)), rel=1e-9)


@pytest.mark.parametrize("K,ki", [(50.0, 0.01), (2.0, 0.9), (0.5, 1.0)])
def test_pi_on_one_sample_delay_plant_known_limit(K, ki):
    # An instant plant read by a sensor averaging over one period is y_{k+1} = K·u_k.
    # With pure I action (kp = 0): poles 0 and 1 − K·ki·dt → GM = 2/(K·ki·dt).
    p = FOPDT(gain=K, tau_s=0.0, delay_s=0.0, dt_s=1.0, window_s=1.0)
    r = analyze_loop(p, kp=0.0, ki=ki)
    assert r.stable == (K * ki < 2)
    if r.stable:
        assert r.margins.gain_margin == pytest.approx(2 / (K * ki), rel=1e-5)


@pytest.mark.parametrize("kp,ki", [(0.005, 0.01), (0.01, 0.03), (0.02, 0.005), (0.03, 0.05)])
def test_margins_agree_with_poles_and_gain_sweep(kp, ki):
    p = FOPDT(gain=50.0, tau_s=0.3, delay_s=0.2, dt_s=1.0, window_s=1.0)
    r = analyze_loop(p, kp=kp, ki=ki)
    L = loop_tf(p, pi_tf(kp, ki, 1.0))
    # the poles are those of python-control's feedback loop
    np.testing.assert_allclose(sorted(np.abs(r.poles)), sorted(np.abs(ct.poles(closed_loop(
        p, kp=kp, ki=ki)))), atol=1e-6)
    assert r.stable == (max(abs(x) for x in r.poles) < 1)
    k_sweep = critical_gain_scale(L)
    if r.stable:
        assert r.margins.gain_margin == pytest.approx(k_sweep, rel=1e-6)
        assert analyze_loop(p, kp=kp * k_sweep * 0.99, ki=ki * k_sweep * 0.99).stable
        assert not analyze_loop(p, kp=kp * k_sweep * 1.01, ki=ki * k_sweep * 1.01).stable
        assert r.phase_margin_deg == pytest.approx(ct.stability_margins(L)[1], abs=1e-4)
    else:
        assert k_sweep < 1


def test_step_metrics_are_ct_step_info_of_the_closed_loop():
    p = FOPDT(gain=50.0, tau_s=0.3, delay_s=0.2, dt_s=1.0, window_s=1.0)
    r = analyze_loop(p, kp=0.004, ki=0.012)
    info = ct.step_info(closed_loop(p, kp=0.004, ki=0.012), T=np.arange(200.0))
    assert r.step.settling_time_s == pytest.approx(info["SettlingTime"])
    assert r.step.rise_time_s == pytest.approx(info["RiseTime"])
    assert r.step.overshoot_pct == pytest.approx(info["Overshoot"], abs=1e-6)


def test_identify_fopdt_recovers_known_plant():
    true = FOPDT(gain=-40.0, tau_s=0.6, delay_s=0.3, dt_s=1.0, window_s=1.0)
    u = np.r_[np.zeros(5), np.full(25, 4.0)]
    y = simulate_fopdt_response(true, u) + 1000.0
    rng = np.random.default_rng(0)
    est = identify_fopdt(y + rng.normal(0, 0.2, y.shape), u + 10, dt_s=1.0, window_s=1.0)
    assert est.gain == pytest.approx(true.gain, rel=0.02)
    assert est.tau_s == pytest.approx(true.tau_s, abs=0.1)
    assert est.delay_s == pytest.approx(true.delay_s, abs=0.1)
    assert est.fit_rms < 0.5


def test_recommendation_meets_margins_and_is_fastest_on_the_grid(tmp_path):
    p = FOPDT(gain=50.0, tau_s=0.3, delay_s=0.2, dt_s=1.0, window_s=1.0)
    kp = np.linspace(0, 0.03, 11)
    ki = np.linspace(0.002, 0.03, 11)
    smap = stability_map(p, kp, ki)
    assert smap.stable.any() and (~smap.stable).any()
    rec = recommend_gains(p, smap=smap)
    assert rec.analysis is not None and rec.analysis.meets_margins
    assert rec.analysis.gain_margin_db >= 6 and rec.analysis.phase_margin_deg >= 45
    ok = smap.stable & (smap.gain_margin_db >= 6) & (smap.phase_margin_deg >= 45)
    assert rec.analysis.step.settling_time_s == pytest.approx(np.nanmin(
        np.where(ok, smap.settling_time_s, np.nan)))
    png = plot_stability_map(smap, tmp_path / "map.png", current=(0.01, 0.01),
                             recommended=(rec.kp, rec.ki))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fopdt_validates():
    with pytest.raises(ValueError):
        FOPDT(gain=1.0, tau_s=-1.0, delay_s=0.0, dt_s=1.0, window_s=1.0)
    with pytest.raises(ValueError):
        FOPDT(gain=1.0, tau_s=1.0, delay_s=0.0, dt_s=0.0, window_s=1.0)


@pytest.mark.parametrize("tau,delay,window", [(0.5, 0.0, 1.0), (0.3, 1.4, 0.6), (0.0, 0.5, 2.5)])
def test_closed_form_zoh_maps_equal_c2d(tau, delay, window):
    p = FOPDT(gain=-3.0, tau_s=tau, delay_s=delay, dt_s=1.0, window_s=window)
    a, b = discrete_plant(p), discrete_plant(p, method="closed-form")
    for m1, m2 in ((a.A, b.A), (a.B, b.B), (a.C, b.C)):
        np.testing.assert_allclose(np.asarray(m1), np.asarray(m2), atol=1e-9)
    u = np.r_[0.0, 1.0, 1.0, -2.0, 0.5, 0.5, 0.5]
    ref = ct.forced_response(a, T=np.arange(len(u)) * 1.0, U=u).outputs
    np.testing.assert_allclose(simulate_fopdt_response(p, u), np.ravel(ref), atol=1e-9)


def test_settling_time_of_data_matches_ct_step_info():
    from palsctl.analysis.stability import settling_time_of
    t = np.arange(40) * 0.5
    y = 1 - np.exp(-t / 2.0) * np.cos(1.3 * t)
    assert settling_time_of(t, y) == pytest.approx(ct.step_info(y, t, yfinal=1.0)["SettlingTime"])
    assert math.isnan(settling_time_of(t, 0.5 * y))       # never reaches the band


def test_margins_on_random_loops_match_brute_force_sweeps():
    """PM against a dense frequency sweep, GM against a gain sweep on the poles."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(80):
        p = FOPDT(gain=rng.uniform(0.1, 100), tau_s=rng.uniform(0, 2), delay_s=rng.uniform(0, 2),
                  dt_s=1.0, window_s=float(rng.choice([0.5, 1.0, 2.0])))
        kp, ki = rng.uniform(0, 1.5) / p.gain, rng.uniform(0.001, 1.5) / p.gain
        r = analyze_loop(p, kp=kp, ki=ki)
        if not r.stable:
            continue
        checked += 1
        L = loop_tf(p, pi_tf(kp, ki, 1.0))
        w = np.concatenate([np.geomspace(1e-7, 0.5, 20000), np.linspace(0.5, np.pi, 20000)])
        z = np.exp(1j * w)
        Lv = np.polyval(np.ravel(L.num[0][0]), z) / np.polyval(np.ravel(L.den[0][0]), z)
        cross = np.flatnonzero(np.diff(np.sign(np.abs(Lv) - 1)))
        ph = np.degrees(np.angle(Lv[cross]))
        pm_ref = min(np.where(ph <= 0, 180 + ph, ph - 180)) if cross.size else math.inf
        assert r.phase_margin_deg == pytest.approx(pm_ref, abs=0.5)
        assert r.margins.gain_margin == pytest.approx(critical_gain_scale(L), rel=1e-5)
    assert checked >= 15
