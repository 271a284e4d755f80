"""Known-answer tests of the video metrics (distill_mixins.eval.fd / motion / video); `pytest -s` prints figures."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from distill_mixins.eval import (
    VideoFeatureNet,
    between_speeds,
    diversity,
    diversity_stats,
    evaluate_clips,
    fd_floor,
    frechet_distance,
    frechet_distance_gaussian,
    frechet_video_distance,
    motion_diversity,
    prompt_adherence,
    prompt_adherence_per_clip,
    temporal_consistency,
    temporal_consistency_per_clip,
    track,
    video_features,
)
from distill_mixins.toy.clips import (
    DIRECTIONS,
    RADIUS,
    SIZE,
    SPEEDS,
    ClipSpec,
    make_clips,
    render,
    render_specs,
    trajectory,
)

N = 1024
"""Clips per set for the FD tests (the demo's evaluation size)."""
N_MOTION = 256
"""Clips per set for the tracking-based metrics (their figures barely move between 256 and 1,024 clips)."""
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


# ---------------------------------------------------------------- degradations of real clips


def blur(video: torch.Tensor, sigma: float = 1.0, first: int = 0) -> torch.Tensor:
    """Gaussian blur (5x5, replicate padding) of frames ``first:``; earlier frames kept."""
    k = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    n, c, t, h, w = video.shape
    x = video.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)
    out = x.reshape(n, t, c, h, w).permute(0, 2, 1, 3, 4)
    return torch.cat([video[:, :, :first], out[:, :, first:]], dim=2)


def with_speed(specs: list[ClipSpec], speed: float) -> torch.Tensor:
    return render_specs([dataclasses.replace(s, speed=speed) for s in specs])


def smeared(specs: list[ClipSpec]) -> torch.Tensor:
    """What an ODE-less 1-step predictor outputs: the average of the condition's futures (both speeds)."""
    return 0.5 * (with_speed(specs, SPEEDS[0]) + with_speed(specs, SPEEDS[1]))


def opposite(specs: list[ClipSpec]) -> torch.Tensor:
    return render_specs([dataclasses.replace(s, direction=OPPOSITE[s.direction]) for s in specs])


def noisy(video: torch.Tensor, std: float, seed: int = 3) -> torch.Tensor:
    return video + std * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))


def shuffled(video: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """Frames in a random order (the same for every clip): the shape jumps."""
    return video[:, :, torch.randperm(video.shape[2], generator=torch.Generator().manual_seed(seed))]


def no_bounce(specs: list[ClipSpec]) -> torch.Tensor:
    """The shapes keep going through the wall (centres not reflected), leaving the frame."""
    start = torch.tensor([s.start for s in specs], dtype=torch.float64)
    step = torch.tensor([DIRECTIONS[s.direction] for s in specs], dtype=torch.float64)
    speed = torch.tensor([s.speed for s in specs], dtype=torch.float64)
    free = start[:, None] + speed[:, None, None] * torch.arange(8, dtype=torch.float64)[None, :, None] * step[:, None]
    shapes = torch.tensor([s.shape == "circle" for s in specs]).long()
    colors = torch.tensor([(1.0, -1.0, -1.0)] * len(specs))
    return render(free, shapes, colors)


# ---------------------------------------------------------------- Frechet distance: the formula


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def test_fd_gaussian_closed_form_commuting_covariances():
    """S_a = Q diag(a) Q^T, S_b = Q diag(b) Q^T: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2 exactly."""
    d = 6
    q = _rotation(d, 0)
    a = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.5, 0.25, 3.0, 1.0, 16.0], dtype=torch.float64)
    mu_a = torch.arange(d, dtype=torch.float64)
    mu_b = mu_a + torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    got = frechet_distance_gaussian(mu_a, q @ torch.diag(a) @ q.T, mu_b, q @ torch.diag(b) @ q.T)
    want = float((mu_a - mu_b).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    print(f"\nFD closed form: got {got:.12f} want {want:.12f}")
    assert got == pytest.approx(want, rel=1e-10)


def test_fd_gaussian_non_commuting_matches_eigvals_of_product():
    """tr((S_a^1/2 S_b S_a^1/2)^1/2) = sum sqrt(eig(S_a S_b)) (similar matrices): an independent computation."""
    g = torch.Generator().manual_seed(1)
    d = 8
    ma, mb = torch.randn(d, d, dtype=torch.float64, generator=g), torch.randn(d, d, dtype=torch.float64, generator=g)
    sa, sb = ma @ ma.T + 0.1 * torch.eye(d, dtype=torch.float64), mb @ mb.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu_a, mu_b = torch.randn(d, dtype=torch.float64, generator=g), torch.randn(d, dtype=torch.float64, generator=g)
    cross = torch.linalg.eigvals(sa @ sb).real.clamp(min=0).sqrt().sum()
    want = float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross)
    assert frechet_distance_gaussian(mu_a, sa, mu_b, sb) == pytest.approx(want, rel=1e-9)


def _exact_moments(z: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Samples (N, D) whose sample mean and unbiased sample covariance are exactly ``mu`` and ``cov``."""
    z = z - z.mean(0)
    white = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T
    return mu + z @ torch.linalg.cholesky(cov).T


def test_fd_from_samples_with_exact_moments_matches_closed_form():
    """Feature sets built to have given sample moments: frechet_distance = the diagonal closed form."""
    g = torch.Generator().manual_seed(2)
    s1 = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)
    s2 = torch.tensor([2.0, 1.0, 0.25, 0.5], dtype=torch.float64)
    mu1 = torch.zeros(4, dtype=torch.float64)
    mu2 = torch.tensor([1.0, 0.0, -0.5, 2.0], dtype=torch.float64)
    fa = _exact_moments(torch.randn(500, 4, dtype=torch.float64, generator=g), mu1, torch.diag(s1))
    fb = _exact_moments(torch.randn(700, 4, dtype=torch.float64, generator=g), mu2, torch.diag(s2))
    want = float((mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum())
    assert frechet_distance(fa, fb) == pytest.approx(want, rel=1e-9)


def test_fd_from_large_gaussian_samples_matches_closed_form():
    """Plain samples, N = 1,000,000 per set, D = 2: the sampling error of this FD is ~2.5e-3 relative (its sd, from
    the variance of the sample means and variances), asserted at 1e-2 (4 sd)."""
    g = torch.Generator().manual_seed(3)
    s1 = torch.tensor([1.0, 4.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 1.0], dtype=torch.float64)
    mu2 = torch.tensor([0.5, 0.0], dtype=torch.float64)
    fa = torch.randn(1_000_000, 2, dtype=torch.float64, generator=g) * s1.sqrt()
    fb = mu2 + torch.randn(1_000_000, 2, dtype=torch.float64, generator=g) * s2.sqrt()
    want = float(mu2.pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum())  # 2.25
    got = frechet_distance(fa, fb)
    print(f"\nFD of 1e6 Gaussian samples: {got:.5f}, closed form {want:.5f} (rel {abs(got - want) / want:.1e})")
    assert got == pytest.approx(want, rel=1e-2)


def test_fd_zero_on_itself_and_symmetric():
    g = torch.Generator().manual_seed(4)
    fa = torch.randn(300, 16, dtype=torch.float64, generator=g)
    fb = 0.5 + 2.0 * torch.randn(400, 16, dtype=torch.float64, generator=g)
    assert abs(frechet_distance(fa, fa)) < 1e-8
    assert frechet_distance(fa, fb) == pytest.approx(frechet_distance(fb, fa), rel=1e-9)
    assert frechet_distance(fa, fb) > 1.0


def test_fd_errors_and_rank_warning():
    fa = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="feats_b has 1 sample"):
        frechet_distance(fa, fa[:1])
    with pytest.raises(ValueError, match="different feature dims 4 and 3"):
        frechet_distance(fa, fa[:, :3])
    with pytest.raises(ValueError, match="2-D features"):
        frechet_distance(fa.flatten(), fa)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(fa, torch.full((10, 4), float("nan")))
    with pytest.warns(UserWarning, match="rank-deficient"):
        frechet_distance(fa, torch.randn(3, 4, dtype=torch.float64))


# ---------------------------------------------------------------- the feature network


def test_feature_net_is_fixed_by_its_seed():
    a, b, other = VideoFeatureNet(), VideoFeatureNet(), VideoFeatureNet(seed=1)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.convs[0].weight, other.convs[0].weight)
    assert not any(p.requires_grad for p in a.parameters())
    clips = make_clips(8, 0).video
    fa = video_features(clips, net=a)
    assert fa.dtype == torch.float64 and fa.shape == (8, a.dim)
    assert torch.equal(fa, video_features(clips, net=b))
    assert torch.allclose(video_features(clips, net=a, batch_size=3), fa, rtol=1e-5, atol=1e-6)


def test_feature_net_weights_pinned():
    """Golden values: the weights are the same on every machine (they depend only on the seed and torch's CPU RNG)."""
    w = VideoFeatureNet().convs[0].weight.flatten().double()
    print(f"\nfirst weights {w[:3].tolist()}, abs sum {float(w.abs().sum()):.10f}")
    assert w[:3].tolist() == pytest.approx(GOLDEN_FIRST_WEIGHTS, abs=1e-7)
    assert float(w.abs().sum()) == pytest.approx(GOLDEN_ABS_SUM, rel=1e-6)


GOLDEN_FIRST_WEIGHTS = [0.007334694266319275, 0.18987758457660675, -0.09033164381980896]
GOLDEN_ABS_SUM = 174.2138870995841


def test_clip_shape_errors():
    clips = make_clips(2, 0).video
    with pytest.raises(ValueError, match="5-D"):
        video_features(clips[0])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        video_features(clips[:, :1])
    with pytest.raises(ValueError, match="2 prompts for 1 clips"):
        prompt_adherence(clips[:1], ["red square moving left"] * 2)
    with pytest.raises(ValueError, match="not a toy prompt"):
        temporal_consistency(clips, ["red square moving left", "a cat"])
    with pytest.raises(ValueError, match="one shape"):
        diversity(clips, clips[:1])
    broken = clips.clone()
    broken[0, :, 3] = float("nan")  # a NaN frame has no shape: it fails adherence and scores 0 consistency there
    prompts = make_clips(2, 0).prompts
    assert prompt_adherence_per_clip(broken, prompts).ok.tolist() == [False, True]
    clean = temporal_consistency_per_clip(clips, prompts)
    assert float(temporal_consistency_per_clip(broken, prompts)[0]) == pytest.approx(float(clean[0]) * 6 / 7, rel=0.03)


# ---------------------------------------------------------------- FD on clips: floor and degradations


@pytest.fixture(scope="module")
def real_sets():
    return make_clips(N, 11), make_clips(N, 12)


@pytest.fixture(scope="module")
def motion_set():
    return make_clips(N_MOTION, 13)


@pytest.fixture(scope="module")
def real_feats(real_sets):
    t0 = time.perf_counter()
    fa = video_features(real_sets[0].video)
    print(f"\nvideo_features on {N} clips: {time.perf_counter() - t0:.2f} s, D = {fa.shape[1]}")
    return fa, video_features(real_sets[1].video)


def test_fd_floor_and_degraded_sets(real_sets, real_feats):
    """Every degradation of the second real set is >= 3x the floor (real vs real) away from the first real set."""
    other = real_sets[1]
    fa, fb = real_feats
    floor = frechet_distance(fa, fb)
    degraded = {
        "blurred (sigma 1 px)": blur(other.video, 1.0),
        "smeared (mean of both speeds)": smeared(other.specs),
        "noisy (std 0.1)": noisy(other.video, 0.1),
        "colour-swapped (RGB -> GBR)": other.video[:, [1, 2, 0]],
        "static (speed 0)": with_speed(other.specs, 0.0),
        "frames shuffled": shuffled(other.video),
    }
    print(f"\nFD floor (real {N} vs real {N}): {floor:.4f}")
    ratios = {}
    for name, clips in degraded.items():
        fd = frechet_distance(fa, video_features(clips))
        ratios[name] = fd / floor
        print(f"FD(real, {name}) = {fd:.4f}  ({fd / floor:.1f}x floor)")
    assert 0.0 < floor < 0.3  # measured 0.12: sampling noise of 1,024 vs 1,024 clips
    for name, ratio in ratios.items():
        assert ratio >= 3.0, name


def test_frechet_video_distance_and_fd_floor_helpers():
    a, b = make_clips(200, 21).video, make_clips(200, 22).video
    floor = fd_floor(a, b)
    assert floor == pytest.approx(frechet_distance(video_features(b), video_features(a)), rel=1e-6)
    assert frechet_video_distance(a, a) < 1e-6


# ---------------------------------------------------------------- tracking and prompt adherence


def test_track_recovers_true_centres(motion_set):
    clips = motion_set
    tr = track(clips.video, clips.prompts)
    start = torch.tensor([s.start for s in clips.specs], dtype=torch.float64)
    step = torch.tensor([DIRECTIONS[s.direction] for s in clips.specs], dtype=torch.float64)
    speed = torch.tensor([s.speed for s in clips.specs], dtype=torch.float64)
    err = (tr.centers - trajectory(start, step, speed)).abs().max()
    circle = torch.tensor([s.shape == "circle" for s in clips.specs])
    print(f"\ntracking error on clean clips: max {err:.3f} px; area square {tr.areas[~circle].mean():.2f} px "
          f"(64), circle {tr.areas[circle].mean():.2f} px ({math.pi * RADIUS**2:.2f})")
    assert err < 0.3
    assert tr.areas[~circle].mean() == pytest.approx(4 * RADIUS**2, rel=0.03)
    assert tr.areas[circle].mean() == pytest.approx(math.pi * RADIUS**2, rel=0.03)
    noisy_tr = track(noisy(clips.video, 0.2), clips.prompts)
    assert (noisy_tr.centers - tr.centers).abs().max() < 0.5


def test_prompt_adherence_known_answers(motion_set):
    clips = motion_set
    video, prompts, specs = clips.video, clips.prompts, clips.specs
    t0 = time.perf_counter()
    real = prompt_adherence(video, prompts)
    elapsed = time.perf_counter() - t0
    opp = prompt_adherence_per_clip(opposite(specs), prompts)
    # a start closer than 1 px to a wall on the motion axis looks the same in both directions (within 1.5 px)
    axis = torch.tensor([0 if s.direction in ("left", "right") else 1 for s in specs])
    start = torch.tensor([s.start for s in specs], dtype=torch.float64)[torch.arange(len(specs)), axis]
    clear = (start - RADIUS > 1.0) & (SIZE - RADIUS - start > 1.0)
    figures = {
        "real": real,
        "real + noise 0.1": prompt_adherence(noisy(video, 0.1), prompts),
        "real + blur 1 px": prompt_adherence(blur(video), prompts),
        "opposite direction": float(opp.ok.double().mean()),
        "opposite, start > 1 px from the walls": float(opp.ok[clear].double().mean()),
        "static": prompt_adherence(with_speed(specs, 0.0), prompts),
        "smeared": prompt_adherence(smeared(specs), prompts),
        "frames shuffled": prompt_adherence(shuffled(video), prompts),
    }
    print(f"\nprompt_adherence on {N_MOTION} clips: {elapsed:.2f} s")
    for name, value in figures.items():
        print(f"adherence {name}: {value:.4f}")
    assert figures["real"] == 1.0 and figures["real + noise 0.1"] == 1.0 and figures["real + blur 1 px"] == 1.0
    assert figures["opposite direction"] <= 0.1
    assert figures["opposite, start > 1 px from the walls"] == 0.0
    assert figures["static"] == 0.0 and figures["smeared"] <= 0.05 and figures["frames shuffled"] == 0.0


def test_between_speeds_known_answers(motion_set):
    """Clips at a constant speed between the data's two (2.5 px/frame) that miss the prompt are all counted, real
    clips and speeds outside the range (static, 4 px/frame) are not."""
    video, prompts, specs = motion_set.video, motion_set.prompts, motion_set.specs
    midway = with_speed(specs, 0.5 * (SPEEDS[0] + SPEEDS[1]))
    missed = 1.0 - prompt_adherence(midway, prompts)
    figures = {"real": between_speeds(video, prompts), "midway": between_speeds(midway, prompts),
               "static": between_speeds(with_speed(specs, 0.0), prompts),
               "4 px/frame": between_speeds(with_speed(specs, 4.0), prompts)}
    print(f"\nbetween_speeds: {figures}; midway clips missing the prompt: {missed:.4f}")
    assert figures["real"] == 0.0 and figures["static"] == 0.0 and figures["4 px/frame"] <= 0.02
    assert missed >= 0.9 and figures["midway"] == pytest.approx(missed, abs=1e-12)  # every miss fits 2.5 px/frame
    tracks = track(midway, prompts)
    assert between_speeds(midway, prompts, tracks=tracks) == figures["midway"]
    with pytest.raises(ValueError, match="resolution=1.0 leaves no speed"):
        between_speeds(video, prompts, resolution=1.0)


def test_prompt_adherence_needs_the_bounce():
    """Shapes heading for a near wall that keep going (no reflection) fail; the same clips bouncing pass."""
    specs = []
    for i, direction in enumerate(DIRECTIONS):
        for speed in SPEEDS:
            for offset in (0.0, 1.0, 2.0, 5.0):
                near = RADIUS + 1.0 + offset if direction in ("left", "up") else SIZE - RADIUS - 1.0 - offset
                other = 10.0 + 3 * i
                start = (near, other) if direction in ("left", "right") else (other, near)
                specs.append(ClipSpec("red", "square" if i % 2 else "circle", direction, speed, start))
    prompts = [s.prompt for s in specs]
    assert prompt_adherence(render_specs(specs), prompts) == 1.0
    assert prompt_adherence(no_bounce(specs), prompts) == 0.0


# ---------------------------------------------------------------- temporal consistency and diversity


def test_temporal_consistency_known_answers(motion_set):
    clips = motion_set
    video, prompts, specs = clips.video, clips.prompts, clips.specs
    t0 = time.perf_counter()
    real = temporal_consistency(video, prompts)
    elapsed = time.perf_counter() - t0
    figures = {
        "real": real,
        "real + noise 0.1": temporal_consistency(noisy(video, 0.1), prompts),
        "smeared": temporal_consistency(smeared(specs), prompts),
        "frames t >= 1 blurred (1 px)": temporal_consistency(blur(video, 1.0, first=1), prompts),
        "all frames blurred (1 px)": temporal_consistency(blur(video, 1.0), prompts),
        "motion blur (3-frame mean)": temporal_consistency((video + video.roll(1, 2) + video.roll(-1, 2)) / 3, prompts),
        "static": temporal_consistency(with_speed(specs, 0.0), prompts),
    }
    print(f"\ntemporal_consistency on {N_MOTION} clips: {elapsed:.2f} s")
    for name, value in figures.items():
        print(f"consistency {name}: {value:.4f}")
    assert figures["real"] >= 0.95 and figures["static"] >= 0.99 and figures["real + noise 0.1"] >= 0.93
    assert figures["smeared"] <= 0.8
    assert figures["motion blur (3-frame mean)"] <= 0.8
    assert figures["frames t >= 1 blurred (1 px)"] <= figures["real"] - 0.04
    # blurring every frame, frame 0 included, keeps the shape the same over time (FD sees the blur instead)
    assert figures["all frames blurred (1 px)"] >= 0.95


def test_diversity_known_answers(motion_set):
    clips = motion_set
    slow, fast = with_speed(clips.specs, SPEEDS[0]), with_speed(clips.specs, SPEEDS[1])
    g = torch.Generator().manual_seed(5)
    random_speed = [dataclasses.replace(s, speed=SPEEDS[int(i)]) for s, i in
                    zip(clips.specs, torch.randint(2, (N_MOTION,), generator=g), strict=True)]
    t0 = time.perf_counter()
    same = diversity(slow, slow)
    elapsed = time.perf_counter() - t0
    figures = {
        "identical sets": same,
        "speed 2 vs speed 3": diversity(slow, fast),
        "real vs real, random speeds": diversity(clips.video, render_specs(random_speed)),
        "smeared vs smeared": diversity(smeared(clips.specs), smeared(clips.specs)),
        "noisy copies (std 0.1)": diversity(noisy(slow, 0.1, 1), noisy(slow, 0.1, 2)),
    }
    motion = {
        "identical sets": motion_diversity(slow, slow, clips.prompts),
        "speed 2 vs speed 3": motion_diversity(slow, fast, clips.prompts),
        "real vs real, random speeds": motion_diversity(clips.video, render_specs(random_speed), clips.prompts),
        "noisy copies (std 0.1)": motion_diversity(noisy(slow, 0.1, 1), noisy(slow, 0.1, 2), clips.prompts),
    }
    print(f"\ndiversity on {N_MOTION} clips: {elapsed:.3f} s")
    for name, value in figures.items():
        print(f"diversity {name}: {value:.4f}")
    for name, value in motion.items():
        print(f"motion_diversity {name}: {value:.4f} px")
    assert figures["identical sets"] == 0.0 and figures["smeared vs smeared"] == 0.0
    assert figures["speed 2 vs speed 3"] > 0.2
    assert 0.3 < figures["real vs real, random speeds"] / figures["speed 2 vs speed 3"] < 0.7
    assert motion["identical sets"] == 0.0 and motion["speed 2 vs speed 3"] > 3.0
    # pixel diversity counts noise (clamping at -1 keeps half of it on the background: 0.1 sqrt(1 - 1/pi));
    # motion diversity does not
    assert figures["noisy copies (std 0.1)"] == pytest.approx(0.1 * math.sqrt(1 - 1 / math.pi), rel=0.05)
    assert motion["noisy copies (std 0.1)"] < 0.2


def test_diversity_stats_known_answers(motion_set):
    """Speed split: 1 for speed 2 vs speed 3, 0 for the same speed, ~0.5 for independent random speeds (binomial
    over 256 conditions: within 4 standard deviations); the standard error is the per-condition spread / sqrt(N)."""
    clips = motion_set
    slow, fast = with_speed(clips.specs, SPEEDS[0]), with_speed(clips.specs, SPEEDS[1])
    g = torch.Generator().manual_seed(5)
    random_speed = [dataclasses.replace(s, speed=SPEEDS[int(i)]) for s, i in
                    zip(clips.specs, torch.randint(2, (N_MOTION,), generator=g), strict=True)]
    same, split = diversity_stats(slow, slow, clips.prompts), diversity_stats(slow, fast, clips.prompts)
    assert (same.mean, same.stderr, same.speed_split, same.conditions) == (0.0, 0.0, 0.0, N_MOTION)
    assert split.speed_split == 1.0 and split.speed_conditions == N_MOTION
    assert split.mean == pytest.approx(diversity(slow, fast), rel=1e-12)
    real = diversity_stats(clips.video, render_specs(random_speed), clips.prompts)
    assert abs(real.speed_split - 0.5) <= 4 * math.sqrt(0.25 / real.speed_conditions)
    per_condition = (slow[:, :, 1:] - fast[:, :, 1:]).pow(2).flatten(1).mean(1).double().sqrt()
    assert split.stderr == pytest.approx(float(per_condition.std() / math.sqrt(N_MOTION)), rel=1e-9)
    smeared_stats = diversity_stats(smeared(clips.specs), smeared(clips.specs), clips.prompts)
    assert math.isnan(smeared_stats.speed_split) and smeared_stats.speed_conditions == 0  # nothing follows the prompt
    print(f"\ndiversity_stats, real vs real with random speeds: {real}")


def test_evaluate_clips():
    real, real_again, gen = make_clips(200, 31), make_clips(200, 32), make_clips(200, 33)
    again = with_speed(gen.specs, SPEEDS[0])
    m = evaluate_clips(gen.video, real.video, gen.prompts, generated_again=again, real_again=real_again.video)
    print(f"\nevaluate_clips(real, real): {m}")
    assert m.prompt_adherence == 1.0 and m.temporal_consistency >= 0.95 and m.num_clips == 200
    assert m.fd_floor is not None and m.diversity is not None and m.diversity > 0
    bare = evaluate_clips(gen.video, real.video, gen.prompts)
    assert bare.fd == pytest.approx(m.fd, rel=1e-9) and bare.prompt_adherence == m.prompt_adherence
    assert bare.diversity is None and bare.motion_diversity is None and bare.fd_floor is None
    assert set(m.to_dict()) == {"fd", "prompt_adherence", "temporal_consistency", "diversity", "motion_diversity",
                                "fd_floor", "num_clips", "between_speeds"}
    assert m.between_speeds == 0.0
