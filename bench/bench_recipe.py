"""Choose the CPU recipes (presets `tiny` and `toy`) by measurement, on data sets no default was tuned on.

For each data set this script makes (16x16 images: smooth, dead leaves, textured, and patches of photographs you
pass with --photo; 2-D points: curves, clusters, and the built-in toy) it trains a teacher (pretrain.py), distills
it (distill.py) for each setting of a small grid, and prints one table per set: the Frechet distance in pixel space
to fresh clean images (points: the W2 distance, exact matching, and the mean distance to the clean support) of the
noisy data, Ambient-Full, Ambient-Truncated and DSD, the time of each stage, the spread of Proximal FD over the
last four snapshots (max |x - median| / median) and its drift (the last snapshot's over the run's lowest, minus 1).

    python bench/bench_recipe.py                          # the default recipes on all six made sets
    python bench/bench_recipe.py --sets photo --photo a.jpg,b.jpg   # ... on patches of your photographs
    python bench/bench_recipe.py --grid coarse --jobs 2   # the coarse grid (see GRIDS), 2 runs at a time
    python bench/bench_recipe.py --ceiling                # ... and each teacher trained on the clean set, for scale
    python bench/bench_recipe.py --quick                  # seconds: a smoke test of the whole path

Runs go under --out (default runs/bench-recipe); each finished run leaves result.json there, so a re-run skips it.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid       # noqa: E402
import pretrain  # noqa: E402
import sample    # noqa: E402

SIGMA = 0.2


# ----------------------------------------------------------------------------------------------
# Data sets, made here. Images: float (N, 3, 16, 16) in [0, 1] (quantised to uint8 on disk); points: (N, 2).

def smooth(n, seed, res=16):
    """A two-colour linear ramp plus one to three soft Gaussian blobs of random colour: smooth everywhere."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1)
    th = g.uniform(0, 2 * np.pi, n)[:, None, None]
    ramp = np.cos(th) * (xx - 0.5) + np.sin(th) * (yy - 0.5) + 0.5
    a, b = g.uniform(0, 1, (2, n, 3, 1, 1))
    img = a + (b - a) * ramp[:, None]
    for _ in range(3):
        on = g.random(n) < 0.7
        cx, cy, s = g.uniform(0, 1, n), g.uniform(0, 1, n), g.uniform(0.1, 0.3, n)
        w = np.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / (2 * s[:, None, None] ** 2))
        img += (on[:, None, None, None] * w[:, None]) * (g.uniform(0, 1, (n, 3, 1, 1)) - img)
    return np.clip(img, 0, 1)


def leaves(n, seed, res=16, up=2, discs=50):
    """The dead-leaves model: occluding discs of random colour with power-law radii (density ~ r^-3), the classic
    stand-in for the statistics of photographs; drawn at 2x and box-filtered."""
    g = np.random.default_rng(seed)
    s = res * up
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    img = np.tile(g.uniform(0, 1, (n, 3, 1, 1)), (1, 1, s, s))
    rmin, rmax = 1.0 * up, 10.0 * up
    for _ in range(discs):
        u = g.random(n)
        r = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5            # inverse CDF of p(r) ~ r^-3
        cx, cy = g.uniform(-2, s + 2, n), g.uniform(-2, s + 2, n)
        inside = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 <= r[:, None, None] ** 2
        img = np.where(inside[:, None], g.uniform(0, 1, (n, 3, 1, 1)), img)
    return img.reshape(n, 3, res, up, res, up).mean((3, 5))


def texture(n, seed, res=16):
    """Two-colour gratings (sine or square wave) of random orientation and period 2.5-6 px: texture everywhere."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    th, period, phase = g.uniform(0, np.pi, n), g.uniform(2.5, 6, n), g.uniform(0, 2 * np.pi, n)
    wave = np.sin(2 * np.pi * (np.cos(th)[:, None, None] * xx + np.sin(th)[:, None, None] * yy) / period[:, None, None]
                  + phase[:, None, None])
    wave = np.where(g.random(n)[:, None, None] < 0.5, np.sign(wave), wave) * 0.5 + 0.5
    a, b = g.uniform(0, 1, (2, n, 3, 1, 1))
    return a + (b - a) * wave[:, None]


def curves(n, seed):
    """Two interleaved spiral arms (a 1-D support, long compared with sigma_n)."""
    g = np.random.default_rng(seed)
    t, arm = g.uniform(0.25, 1, n), g.integers(0, 2, n)
    ang = 3 * np.pi * t + np.pi * arm
    return np.stack([1.6 * t * np.cos(ang), 1.6 * t * np.sin(ang)], 1)


def clusters(n, seed):
    """Nine tight clusters (std 0.03) on a 3x3 grid, 2 sigma_n apart across and 5 sigma_n apart down."""
    g = np.random.default_rng(seed)
    k = g.integers(0, 9, n)
    centre = np.stack([(k % 3 - 1) * 2 * SIGMA, (k // 3 - 1) * 5 * SIGMA], 1)
    return centre + 0.03 * g.standard_normal((n, 2))


def moons(n, seed):
    """Two interleaved half circles of radius 1 (a classic 2-D set), blurred by 0.02."""
    g = np.random.default_rng(seed)
    k, t = g.integers(0, 2, n), g.uniform(0, np.pi, n)
    x = np.stack([np.where(k, 1 - np.cos(t), np.cos(t)), np.where(k, 0.5 - np.sin(t), np.sin(t))], 1)
    return x + 0.02 * g.standard_normal((n, 2))


def gaussians(n, seed):
    """Eight tight Gaussians (std 0.05) on a circle of radius 2: well-separated modes, a spread of 1.4."""
    g = np.random.default_rng(seed)
    a = 2 * np.pi * g.integers(0, 8, n) / 8
    return 2 * np.stack([np.cos(a), np.sin(a)], 1) + 0.05 * g.standard_normal((n, 2))


def checker(n, seed):
    """A checkerboard: uniform on eight unit squares in [-2, 2]^2, a density that fills an area."""
    x = np.random.default_rng(seed).uniform(-2, 2, (4 * n, 2))
    return x[(np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0][:n]


def photo(n, seed, res=16):
    """Patches of real photographs (--photo FILE[,FILE...]): square crops 1-4x larger than res (log-uniform, at
    most the photograph's height), area-averaged down to res, half flipped left-right. Train and fresh sets are
    different crops of the same photographs."""
    g = np.random.default_rng(seed)
    try:
        photos = [Image.open(f).convert('RGB') for f in PHOTO.split(',')]
    except OSError as e:                                   # not an image, or unreadable
        raise SystemExit(f'--photo {PHOTO}: {e}')
    if min(min(im.size) for im in photos) < res:
        raise SystemExit(f'--photo {PHOTO}: each photograph must be at least {res}x{res} pixels')
    out = np.empty((n, res, res, 3), np.float32)
    for i in range(n):
        im = photos[g.integers(len(photos))]
        w = min(res * 2 ** g.uniform(0, 2), *im.size)
        x, y = g.uniform(0, im.width - w), g.uniform(0, im.height - w)
        out[i] = np.asarray(im.resize((res, res), Image.BOX, box=(x, y, x + w, y + w))) / 255
    out = np.where(g.random(n)[:, None, None, None] < 0.5, out[:, :, ::-1], out)
    return out.transpose(0, 3, 1, 2)


PHOTO = None   # --photo
SETS = dict(smooth=smooth, leaves=leaves, texture=texture, photo=photo, curves=curves, clusters=clusters,
            toy=pretrain.toy_points, moons=moons, gaussians=gaussians, checker=checker)
POINTS = ('curves', 'clusters', 'toy', 'moons', 'gaussians', 'checker')


def write_set(name, folder, n, n_fresh, stretch=1.0, move=0.0):
    """The clean training set as the file pretrain.py reads (uint8 NHWC images, float points: stretch x + move) and
    the fresh clean evaluation set (seed 1) in model units, made once here for every run. Returns the two paths."""
    moved = f'-x{stretch:g}+{move:g}' if (stretch, move) != (1, 0) else ''
    path, fresh_path = (os.path.join(folder, f'{name}{end}.npy') for end in (moved, '-fresh'))
    train, fresh = SETS[name](n, 0), SETS[name](n_fresh, 1)
    if name in POINTS:
        np.save(path, (stretch * train + move).astype(np.float32))
        np.save(fresh_path, fresh.astype(np.float32))
        return path, fresh_path
    to_u8 = lambda x: np.rint(x * 255).astype(np.uint8)
    np.save(path, to_u8(train).transpose(0, 2, 3, 1))
    np.save(fresh_path, to_u8(fresh).astype(np.float32) / 127.5 - 1)
    return path, fresh_path


# ----------------------------------------------------------------------------------------------
# The grid. A setting is (teacher flags, distillation flags), on top of the preset's defaults.

S25 = {'--sigma-init': '2.5'}                               # SiD's, the tiny default until the sigma-init grid
CLAMP = {'--fake-sigma': 'clamp'}      # the fake net's noise levels clamped to sigma_n: tiny's until --grid fake-sigma
OLD = {'--lr': '1e-4', '--glr': '1e-4', '--kimg': '32', **S25, **CLAMP}   # tiny distillation before this study
NEW = {'--lr': '3e-4', '--glr': '5e-5', '--ema-rampup': '0.25', '--kimg': '32', **S25, **CLAMP}   # its first choice
TINY = dict(NEW, **{'--sigma-init': '1.0'})                               # the default before fake-sigma, at 32 kimg
TINY128 = dict(TINY, **{'--kimg': '128'})                              # the default before --grid fake-sigma
FS128 = dict(TINY128, **{'--fake-sigma': 'above'})                   # the tiny default until --grid ema-rampup
EMA128 = dict(FS128, **{'--ema-rampup': '0.5'})                     # the tiny default until --grid fake-steps-88
FS2_88 = dict(EMA128, **{'--kimg': '88', '--fake-steps': '2'})   # K = 2 in EMA128's time, the default until COS88
COS88 = dict(FS2_88, **{'--glr-end': '0'})   # glr falls on a cosine to 0; today's tiny default is COS88 with --kimg 64
SEED01 = (({}, {}), ({'--loss': 'ambient', '--seed': '1'}, {'--seed': '1'}))   # teacher and distillation, seeds 0, 1
SEED2 = ({'--loss': 'ambient', '--seed': '2'}, {'--seed': '2'})                 # and seed 2
TOY = {'--lr': '1e-4', '--glr': '1e-4', '--ema-rampup': '0.05', '--kimg': '512',   # toy distillation before the study
       '--tmax': '800', '--alpha': '1.2', '--fake-steps': '1'}   # SiD's, toy's until 2026-12-07
T1000, T3000 = ({'--kimg': k, '--loss': 'ambient'} for k in ('1000', '3000'))   # toy teachers before 'ambient-x0'
TOY_LONG = dict(TOY, **{'--kimg': '2048', '--ema-rampup': '0.25', '--lr': '5e-5', '--glr': '5e-5'})
TOY_X0, TOY_DIST = dict(T3000, **{'--loss': 'ambient-x0'}), dict(TOY_LONG, **{'--sigma-init': '0.5'})   # toy until 12-07
ALL4 = {'--tmax': '450', '--fake-steps': '2', '--kimg': '1408', '--alpha': '1.0', '--lr': '1e-4', '--glr': '1e-4'}
ALL4_G = dict(ALL4, **{'--kimg': '4224', '--glr': '5e-5'})
GRIDS = {   # (teacher flags, distill flags); explicit, so a row means the same after the defaults move ('' = a switch)
    'defaults': [({}, {})],
    'coarse': [({}, dict(OLD, **{'--ema-rampup': '0.05'})), ({}, dict(OLD, **{'--ema-rampup': '0.25'})),
               ({}, dict(OLD, **{'--glr': '3e-5', '--ema-rampup': '0.25'})), ({}, NEW)],
    'fine': [({}, dict(OLD, **{'--gen-sigma-min': '', '--ema-rampup': '0.25', '--batch': '64'})),
             ({}, dict(NEW, **{'--alpha': '1.0'})), ({}, dict(NEW, **{'--glr': '1e-4'})),
             ({}, dict(NEW, **{'--tmax': '400'}))],
    'tmax': [({}, dict(NEW, **{'--tmax': '1000'}))],
    'fake-lr': [({}, dict(NEW, **{'--lr': '1e-3'}))],
    'sigma-init': [({}, TINY), ({}, dict(NEW, **{'--sigma-init': '0.5'}))],
    'gen-sigma-min': [({}, dict(TINY, **{'--gen-sigma-min': ''}))],
    'batch': [({}, dict(TINY, **{'--batch': '64'}))],
    'points': [(T1000, TOY), (T1000, dict(TOY, **{'--ema-rampup': '0.25'})),
               (T1000, dict(TOY, **{'--glr': '3e-5', '--ema-rampup': '0.25'})), (T3000, TOY),
               (T3000, dict(TOY, **{'--kimg': '1024'})), (T3000, dict(TOY, **{'--lr': '3e-4', '--glr': '3e-4'}))],
    'points-long': [(T3000, dict(TOY, **{'--kimg': '2048'})),
                    (T3000, dict(TOY, **{'--kimg': '2048', '--ema-rampup': '0.25'})),
                    (T3000, TOY_LONG)],
    'points-sigma-init': [(T3000, dict(TOY_LONG, **{'--sigma-init': '1.0'})),
                          (T3000, dict(TOY_LONG, **{'--sigma-init': '0.5'}))],
    'x0': [({'--loss': 'ambient-x0'}, TINY128)],     # Eq. (3) reweighted, teacher and fake net
    'seeds': [({'--loss': loss, '--seed': s}, dict(TINY128, **{'--seed': s}))   # seeds 1, 2 of the
              for loss in ('ambient', 'ambient-x0') for s in '12'],                             # default and of x0
    'fake-x0': [(t, dict(TINY128, **{'--loss': 'ambient-x0', '--force-loss': '', **d})) for t, d in SEED01],
    'fake-sigma': [(t, dict(FS128, **d)) for t, d in SEED01],   # the fake net's sigma above sigma_n, seeds 0 and 1
    'after-fake-sigma': [({}, dict(FS128, **d)) for d in ({'--fake-steps': '2'}, {}, {'--gen-sigma-min': ''},
                                                          {'--lr': '1e-3'})],   # knobs revisited on FS128
    'fake-steps': [({}, dict(FS128, **{'--fake-steps': '2'}))],   # two fake-score steps per generator step
    'generator-knobs': [({}, dict(FS128, **d)) for d in ({'--gbeta1': '0.9'}, {'--ema-rampup': '0.5'},
                                                         {'--alpha': '1.0'})],   # the generator's, on FS128
    'ema-rampup': [(t, dict(EMA128, **d)) for t, d in SEED01],   # EMA half-life kimg / 2: EMA128, seeds 0, 1
    'after-ema': [({}, FS2_88), ({}, dict(EMA128, **{'--ema-rampup': '1.0'})),   # on EMA128: K = 2; a longer EMA;
                  ({}, dict(EMA128, **{'--kimg': '68', '--fake-steps': '3'}))],     # K = 3 in the same time
    'fake-steps-88': [(t, dict(FS2_88, **d)) for t, d in SEED01],   # K = 2 in EMA128's time, seeds 0 and 1
    'seed-1': [(t, dict(FS2_88, **d)) for t, d in SEED01[1:]],   # fake-steps-88's seed-1 row alone (its cache)
    'seed-2': [(SEED2[0], dict(FS2_88, **SEED2[1]))],   # a third teacher and run
    'gen-sigma-min-88': [({}, dict(FS2_88, **{'--gen-sigma-min': ''}))],   # smooth's drift: from sigma < sigma_n?
    'fs2-knobs': [({}, dict(FS2_88, **d)) for d in ({'--alpha': '1.0'}, {'--glr': '1e-4'})],   # on FS2_88
    'glr-cosine': [({}, COS88)],   # not in the paper: glr falls to 0 on a cosine; does it stop the drift?
    'glr-cosine-seed-1': [(t, dict(COS88, **d)) for t, d in SEED01[1:]],   # COS88 at seed 1 (fake-steps-88's teachers)
    'glr-cosine-seed-2': [(SEED2[0], dict(COS88, **SEED2[1]))],   # seed-2's teacher
    'glr-end-quarter': [(t, dict(COS88, **{'--glr-end': '0.25'}, **d)) for t, d in SEED01],   # between FS2_88 and COS88
    'points-x0': [(TOY_X0, TOY_DIST)],   # the toy default until 2026-12-07
    'points-cosine': [(TOY_X0, TOY_DIST), (TOY_X0, dict(TOY_DIST, **{'--glr-end': '0'}))],   # tiny's cosine on points
    'points-modes': [(TOY_X0, dict(TOY_DIST, **d)) for d in ({'--sigma-init': '1.0'}, {'--kimg': '4096'})],   # gaussians
    'points-lr': [(TOY_X0, dict(TOY_DIST, **{'--lr': '1e-4', '--glr': '1e-4'}))],   # both nets 2x faster
    'points-glr': [(TOY_X0, dict(TOY_DIST, **{'--glr': '1e-4'}))],                    # the generator alone
    'points-tmax': [(TOY_X0, dict(TOY_DIST, **d)) for d in ({}, *({'--tmax': t} for t in ('350', '450', '600')))],
    'points-tmax-seed-1': [(dict(TOY_X0, **{'--seed': '1'}), dict(TOY_DIST, **{'--seed': '1'}, **d))
                           for d in ({}, {'--tmax': '450'})],
    'points-seed-checks': [(dict(TOY_X0, **{'--seed': '1'}), dict(TOY_DIST, **{'--seed': '1', '--glr-end': '0'})),
                           (dict(TOY_X0, **{'--seed': '2'}), dict(TOY_DIST, **{'--seed': '2'}))],   # seed 1's drift
    'points-gen-sigma-min': [(dict(TOY_X0, **t), dict(TOY_DIST, **{'--gen-sigma-min': ''}, **d))   # generator's sigma
                             for t, d in (({}, {}), ({'--seed': '1'}, {'--seed': '1'}))],           # >= sigma_n only
    'bf16': [({'--precision': 'bf16'}, dict(COS88, **{'--precision': 'bf16'}))],   # tiny in bf16 autocast, both stages
    'points-fake': [(TOY_X0, dict(TOY_DIST, **d)) for d in   # alpha 1.0 (AFHQ's), K = 2 in the same time
                    ({}, {'--alpha': '1.0'}, {'--fake-steps': '2', '--kimg': '1408'})],
    # the fake net's lr: 1e-4 stops Hubble's blow-up at 40 kimg, 2e-4 lies between; and what each costs where calm
    **{g: v for lr in ('1e-4', '2e-4') for g, v in (
        (f'fake-lr-{lr}', [({}, {'--lr': lr})]),
        (f'bf16-fake-lr-{lr}', [({'--precision': 'bf16'}, dict(COS88, **{'--precision': 'bf16', '--lr': lr}))]),
        (f'teacher-240-fake-lr-{lr}', [({'--kimg': '240'}, {'--lr': lr})]))},   # from retina-240's teacher
    'distill-seed-1': [({}, {'--seed': '1'})],   # the same teacher, another distillation seed: is a blow-up chance?
    **{g: [(t, {'--seed': '1', **d}) for d in ({}, {'--lr': '2e-4'})]   # the default and 2e-4 at distillation seed 1:
       for g, t in (('seed-1-lrs', {}), ('teacher-240-seed-1-lrs', {'--kimg': '240'}))},   # is either's loss chance?
    'teacher-240-seed-1-glr-3e-5': [({'--kimg': '240'}, {'--seed': '1', '--glr': '3e-5'})],   # retina's drift: G too fast?
    'teacher-240-seed-2': [({'--kimg': '240'}, {'--seed': '2'})],   # the retina's default at a third distillation seed
    'teacher-240-alpha-1': [({'--kimg': '240'}, {'--seed': s, **d}) for s in '02' for d in ({'--alpha': '1.0'}, {})],
    'teacher-240-dmd-seed-2': [({'--kimg': '240'}, {'--seed': '2', '--method': 'dmd'})],   # D-DMD: no gap term
    'teacher-240-sigma-init-1.5': [({'--kimg': '240'}, {'--seed': s, '--sigma-init': '1.5'}) for s in '02'],   # G's grain
    'teacher-240-gen-sigma-min': [({'--kimg': '240'}, {'--seed': s, '--gen-sigma-min': ''}) for s in '02'],   # G's grain
    'teacher-240-gbeta1-0.9': [({'--kimg': '240'}, {'--seed': s, '--gbeta1': '0.9'}) for s in '02'],   # Adam's walk
    'teacher-240': [({'--kimg': '240'}, {})],   # the default since 2026-12-06: 120 missed modes
    'teacher-240-kimg-64': [({'--kimg': '240'}, {'--kimg': '64'})],   # the 30-minute target: a shorter distillation
    'teacher-120': [({'--kimg': '120'}, {})],   # the teacher's budget before 2026-12-06
    'teacher-240-seeds-1-2': [({'--kimg': '240', '--seed': s}, {'--seed': s}) for s in '12'],   # two more teachers
    'points-sigma-init-low': [(TOY_X0, dict(TOY_DIST, **{'--sigma-init': s})) for s in ('0.25', '0.125')],   # sharper G
    'points-combos': [(TOY_X0, dict(TOY_DIST, **{'--tmax': '450', **d})) for d in (   # checker's knobs, combined
        {'--fake-steps': '2', '--kimg': '1408'}, {'--lr': '1e-4', '--glr': '1e-4'},
        {'--fake-steps': '2', '--kimg': '1408', '--alpha': '1.0'}, ALL4)],
    'points-all4-long': [(TOY_X0, dict(TOY_DIST, **{**ALL4, '--kimg': k})) for k in ('2816', '4224')],   # 2x, 3x
    'points-all4': [(TOY_X0, dict(TOY_DIST, **{**ALL4, '--kimg': '4224'}))],   # checker's best, on every set
    'points-all4-glr-5e-5': [(TOY_X0, dict(TOY_DIST, **ALL4_G))],   # glr at half the fake net's: today's toy
    **{f'points-all4-glr-5e-5-seed-{s}': [(dict(TOY_X0, **{'--seed': s}), dict(TOY_DIST, **ALL4_G, **{'--seed': s}))]
       for s in '12'},   # today's toy, teacher and distillation at seeds 1 and 2
    'points-all4-cosine': [(TOY_X0, dict(TOY_DIST, **ALL4_G, **{'--glr-end': '0'}))],   # today's toy, tiny's cosine
    'points-all4-cosine-seed-1': [(dict(TOY_X0, **{'--seed': '1'}),
                                   dict(TOY_DIST, **ALL4_G, **{'--glr-end': '0', '--seed': '1'}))],
}


def as_args(flags):
    """A grid row's {flag: value} as command-line arguments ('' marks a switch)."""
    return [x for k, v in flags.items() for x in (k, v) if x]


def distances(x, fresh, support):
    """Distance of samples x to the fresh clean set: the Frechet distance of fid.py's 'pixel' features (pixels for
    images, random Fourier features for points); for points also W2 (1000-point matching) and the mean distance to
    the clean support (`support`: a dense clean sample). Between two clean sets of 1000 points W2 is already
    0.13-0.16 (standard deviation up to 0.06 across draws), so for points FD is the sharper distribution distance."""
    fd = fid.frechet_distance(*fid.stats_of(fid.sample_features(x, 'pixel')),
                              *fid.stats_of(fid.sample_features(fresh, 'pixel')))
    if support is not None:
        return dict(fd=fd, w2=fid.w2_matching(x[:1000], fresh[:1000]), support=fid.curve_distance(x, support))
    return dict(fd=fd)


def posterior_mean(y, support, sigma=SIGMA):
    """E[x0 | y] for y = x0 + sigma eps, with a dense clean sample as the law of x0 (points only). On the noisy
    data this is what Ambient-Truncated would output with a perfect teacher: the best a sigma_n-denoiser can do."""
    d2 = (y ** 2).sum(1)[:, None] + (support ** 2).sum(1)[None] - 2 * y @ support.T
    w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * sigma ** 2))
    return (w @ support / w.sum(1, keepdims=True)).astype(np.float32)


def samples(spec, path, n, mode=None):
    """n samples in the set's own units (sample.generate's are in model units, pretrain.noisy_dataset's; --stretch
    and --move are undone, so that a stretched set scores as the set itself)."""
    net, ckpt = sample.load_net(path, 'cpu')
    x = torch.cat([x for _, x in sample.generate(net, ckpt, list(range(n)), 100, 'cpu', mode)]).numpy()
    return base(spec, sample.data_units(x, ckpt))


def base(spec, x):
    """Data units -> the set's own: undo --stretch and --move."""
    return (x - spec.get('move', 0.0)) / spec.get('stretch', 1.0)


def spread(metrics_file):
    """max |x - median| / median of the Proximal FD over the last four snapshots (a stable recipe stays within 0.2), and
    drift: how far the last snapshot's Proximal FD is above the run's lowest, which the four can miss."""
    every = [json.loads(l)['proximal_fd'] for l in open(metrics_file)]
    vals, med = every[-4:], float(np.median(every[-4:]))
    return dict(proximal=[round(v, 4) for v in vals], spread=max(abs(v - med) for v in vals) / med if med else math.nan,
                drift=every[-1] / min(every) - 1 if min(every) > 0 else math.nan)


def script(name, outdir, *args, threads=1):
    """Run a stage into outdir once: a finished run (its time.json) is reused. Returns the stage's seconds."""
    timing = os.path.join(outdir, 'time.json')
    if os.path.isfile(timing):
        return json.load(open(timing))['seconds']
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    resume = ['--resume'] if os.path.isfile(os.path.join(outdir, 'latest.pt')) else []   # an interrupted run goes on
    r = subprocess.run([sys.executable, os.path.join(ROOT, name), '--outdir', outdir, *args, *resume], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f'{name} {" ".join(args)} failed:\n{r.stderr[-2000:]}')
    seconds = time.time() - t
    json.dump(dict(seconds=seconds), open(timing, 'w'))
    return seconds


def references(spec):
    """The fresh clean evaluation set and, for points, a dense clean sample of the support."""
    return np.load(spec['fresh']), SETS[spec['set']](20000, 2) if spec['set'] in POINTS else None


def ceiling(spec):
    """The same teacher flags and budget on the CLEAN set (sigma_n = 0), Heun to sigma = 0: what the net can do with
    no noise at all. Trained and scored once per teacher."""
    clean_dir = spec['teacher_dir'] + '-clean'
    script('pretrain.py', clean_dir, '--data', spec['data'], '--sigma', '0', '--device', 'cpu', *spec['teacher'],
           threads=spec['threads'])
    cache = os.path.join(clean_dir, 'eval.json')
    if not os.path.isfile(cache):
        fresh, support = references(spec)
        json.dump(distances(samples(spec, os.path.join(clean_dir, 'latest.pt'), len(fresh)), fresh, support),
                  open(cache, 'w'))
    return json.load(open(cache))


def train_teacher(spec):
    """The teacher of a setting, shared by the settings with the same teacher flags. Returns its seconds."""
    return script('pretrain.py', spec['teacher_dir'], '--data', spec['data'], '--sigma',
                  str(SIGMA * spec.get('stretch', 1)), '--device', 'cpu', *spec['teacher'], threads=spec['threads'])


def per_teacher(spec, key, compute):
    """A score kept once per teacher, under key in its eval.json: compute() runs the first time it is asked for."""
    cache = os.path.join(spec['teacher_dir'], 'eval.json')
    ev = json.load(open(cache))
    if key not in ev:
        ev[key] = compute()
        json.dump(ev, open(cache, 'w'))
    return ev[key]


def floor(spec):
    """The distance of 2,000 of the training set's clean images (the images the noisy set is made of) to the fresh
    set: what a perfect model scores at this sample size. Scored once per teacher."""
    def score():
        fresh, support = references(spec)
        clean = base(spec, pretrain.load_data(spec['data'])[0])
        return distances(clean[pick(len(clean), len(fresh))], fresh, support)
    return per_teacher(spec, 'floor', score)


def perfect_at_stop(spec):
    """What a perfect teacher's Ambient-Truncated scores with the sampler as it is: Algorithm 3 returns D at the last
    of its 18 levels >= sigma_n (1.4-1.5x sigma_n here), so E[x0 | x] at that level, on fresh clean points noised to
    it (points only; once per teacher). Returns the distances and the level, in the set's units."""
    def score():
        ckpt = torch.load(os.path.join(spec['teacher_dir'], 'latest.pt'), weights_only=True)
        levels = sample.karras_sigmas(sample.default_steps(ckpt))
        level = float(levels[levels >= ckpt['sigma_n']].min()) * ckpt['config'].get('data_scale', 1.0)
        level /= spec.get('stretch', 1.0)
        fresh, support = references(spec)
        clean = SETS[spec['set']](len(fresh), 3)
        y = clean + level * np.random.default_rng(3).standard_normal(clean.shape)
        return dict(level=level, **distances(posterior_mean(y, support, level), fresh, support))
    return per_teacher(spec, 'perfect_stop', score)


def pick(n, k):
    """The k training images (of n) that the noisy-data and clean-data rows score."""
    return np.random.default_rng(0).choice(n, min(k, n), replace=False)


def one(spec):
    """One setting on one set, run once (result.json); the floor and (with --ceiling) the ceiling are added, also to
    finished runs."""
    torch.set_num_threads(spec['threads'])
    if spec.get('teacher_only'):
        return train_teacher(spec)
    done = os.path.join(spec['dir'], 'result.json')
    if not os.path.isfile(done):
        evaluate(spec, done)
    res = json.load(open(done))
    if 'floor' not in res['best'] or 'drift' not in res:   # finished runs gain what later versions added
        res['best']['floor'] = floor(spec)
        res.update(spread(os.path.join(spec['dir'], 'metrics.jsonl')))
        json.dump(res, open(done, 'w'), indent=1)
    if spec['set'] in POINTS and 'perfect_stop' not in res['best']:
        res['best']['perfect_stop'] = perfect_at_stop(spec)
        json.dump(res, open(done, 'w'), indent=1)
    if spec['ceiling'] and 'clean' not in res['best']:
        res['best']['clean'] = ceiling(spec)
        json.dump(res, open(done, 'w'), indent=1)
    return res


def evaluate(spec, done):
    """The teacher (shared by settings with the same teacher flags), distillation, the evaluation -> done."""
    out, teacher_dir = spec['dir'], spec['teacher_dir']
    t_time = train_teacher(spec)
    d_time = script('distill.py', out, '--data', spec['data'], '--teacher', os.path.join(teacher_dir, 'latest.pt'),
                    '--device', 'cpu', *spec['distill'], threads=spec['threads'])
    points = spec['set'] in POINTS
    fresh, support = references(spec)
    t0, teacher = time.time(), os.path.join(teacher_dir, 'latest.pt')
    cache = os.path.join(teacher_dir, 'eval.json')
    if not os.path.isfile(cache):                   # the teacher's samplers and the noisy data, once per teacher
        t_ckpt = torch.load(teacher, weights_only=True)          # the teacher's own noisy set, in the set's units
        noisy = base(spec, sample.data_units(fid.teachers_noisy_set(t_ckpt, spec['data'])[0], t_ckpt))
        noisy = noisy[pick(len(noisy), len(fresh))]
        perfect = dict(perfect=distances(posterior_mean(noisy, support), fresh, support)) if points else {}
        json.dump(dict(noisy=distances(noisy, fresh, support), **perfect,
                       full=distances(samples(spec, teacher, len(fresh), 'full'), fresh, support),
                       truncated=distances(samples(spec, teacher, len(fresh), 'truncated'), fresh, support)),
                  open(cache, 'w'))
    dsd = distances(samples(spec, os.path.join(out, 'best.pt'), len(fresh)), fresh, support)
    res = dict(set=spec['set'], teacher=spec['teacher'], distill=spec['distill'], teacher_s=t_time, distill_s=d_time,
               best=dict(json.load(open(cache)), dsd=dsd),
               latest=distances(samples(spec, os.path.join(out, 'latest.pt'), len(fresh)), fresh, support),
               **spread(os.path.join(out, 'metrics.jsonl')))
    res['eval_s'] = time.time() - t0
    json.dump(res, open(done, 'w'), indent=1)


def table(results):
    for name in dict.fromkeys(r['set'] for r in results):
        rows = [r for r in results if r['set'] == name]
        keys = ('fd', 'w2', 'support') if name in POINTS else ('fd',)
        label = f'{fid.label_of("pixel", True)} / W2 / mean distance to the clean support' if name in POINTS else \
            'pixel FD to clean'
        print(f'\n{name} ({label}; clean: 2,000 clean training images, the floor at this sample size; DSD is best.pt, '
              f'then latest.pt; spread: max |x - median| / median of Proximal FD over the last 4 snapshots; '
              f'drift: the last Proximal FD / the lowest - 1; minutes per stage)')
        print(f'{"teacher flags":16s} {"distill flags":44s} ' + ''.join(f'{c:>{8 * len(keys)}s}' for c in (
              'clean', 'noisy', 'full', 'trunc', 'DSD', 'latest')) + ''.join(f' {c:>6s}' for c in (
              'spread', 'drift', 't_min', 'd_min')))
        for r in rows:
            b = dict(r['best'], latest=r['latest'])
            cells = ''.join(''.join(f'{b[c][k]:8.3f}' for k in keys) for c in ('floor', 'noisy', 'full', 'truncated',
                                                                                 'dsd', 'latest'))
            print(f'{" ".join(r["teacher"]) or "-":16s} {" ".join(r["distill"]) or "-":44s} {cells} '
                  f'{r["spread"]:6.2f} {r["drift"]:6.2f} {r["teacher_s"] / 60:5.1f} {r["distill_s"] / 60:5.1f}')
        ceilings = {' '.join(r['teacher']) or '-': r['best']['clean'] for r in rows if 'clean' in r['best']}
        for flags, c in ceilings.items():
            print(f'Ceiling, the teacher ({flags}) trained on the clean set: ' +
                  ' / '.join(f'{c[k]:.3f}' for k in keys))
        if 'perfect' in rows[0]['best']:
            print('Ambient-Truncated with a perfect teacher (E[x0 | y] on the noisy data): ' +
                  ' / '.join(f'{rows[0]["best"]["perfect"][k]:.3f}' for k in keys))
        if 'perfect_stop' in rows[0]['best']:
            p = rows[0]['best']['perfect_stop']
            print(f'... and at the level where the 18-step sampler stops ({p["level"]:.3f}, E[x0 | x] on clean points '
                  'noised to it): ' + ' / '.join(f'{p[k]:.3f}' for k in keys))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sets', default=','.join(s for s in SETS if s != 'photo'),
                   help=f'comma-separated, from {", ".join(SETS)}')
    p.add_argument('--grid', default='defaults', choices=list(GRIDS))
    p.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each (--jobs 1: one run on two '
                   'threads; two such invocations side by side oversubscribe 2 cores, measured 6x slower)')
    p.add_argument('--n', type=int, default=20000, help='training set size')
    p.add_argument('--out', default=os.path.join('runs', 'bench-recipe'))
    p.add_argument('--quick', action='store_true', help='a smoke test: tiny sets and budgets')
    p.add_argument('--photo', help='the photographs the set `photo` crops, comma-separated image files')
    p.add_argument('--stretch', type=float, default=1.0, help='points: train on stretch * x + move at stretch * '
                   'sigma_n and score the samples mapped back: the same problem in other units (default 1)')
    p.add_argument('--move', type=float, default=0.0, help='points: see --stretch (default 0)')
    p.add_argument('--ceiling', action='store_true', help='also train each teacher on the clean set and score it '
                   '(Heun to sigma = 0): is the noise or the net the limit?')
    a = p.parse_args(argv)
    global PHOTO
    PHOTO, names = a.photo, a.sets.split(',')
    if set(names) - set(SETS):
        raise SystemExit(f'--sets {a.sets}: choose from {", ".join(SETS)}')
    if 'photo' in names and not (a.photo and all(map(os.path.isfile, a.photo.split(',')))):
        raise SystemExit(f'--photo {a.photo}: the set photo needs existing image files (--photo a.jpg,b.png)')
    if (a.stretch, a.move) != (1, 0) and (set(names) - set(POINTS) or a.stretch <= 0):
        raise SystemExit(f'--stretch {a.stretch:g} --move {a.move:g}: for point sets ({", ".join(POINTS)}), stretch > 0')
    os.makedirs(a.out, exist_ok=True)
    quick_t = ['--kimg', '0.5', '--snap', '0.25', '--tick', '0.25'] if a.quick else []
    quick_d = ['--kimg', '0.128', '--snap', '0.032', '--tick', '0.032', '--fid-num', '100', '--batch', '32'] \
        if a.quick else []   # batch 32: four snapshots on every preset
    specs = []
    for name in names:
        data, fresh = write_set(name, a.out, 300 if a.quick else a.n, 200 if a.quick else 2000, a.stretch, a.move)
        where = os.path.splitext(os.path.basename(data))[0]                    # the set, stretched and moved
        for teacher, dist in GRIDS[a.grid]:
            t, d = as_args(teacher) + quick_t, as_args(dist) + quick_d
            tag = lambda flags: '_'.join(f.strip('-') for f in flags) or 'default'
            specs.append(dict(set=name, data=data, fresh=fresh, teacher=t, distill=d, threads=1 if a.jobs > 1 else 2,
                              ceiling=a.ceiling, stretch=a.stretch, move=a.move,
                              teacher_dir=os.path.join(a.out, f'{where}-teacher-{tag(t)}'),
                              dir=os.path.join(a.out, f'{where}-{tag(t)}-distill-{tag(d)}')))
    # The teachers first (each once), then the distillations, a.jobs at a time.
    teachers = list({s['teacher_dir']: dict(s, teacher_only=True) for s in specs}.values())
    for batch in (teachers, specs):
        procs = []
        for s in batch:
            while sum(q.poll() is None for q in procs) >= a.jobs:
                time.sleep(1)
            procs.append(subprocess.Popen([sys.executable, __file__, '--one', json.dumps(s)]))
        for q in procs:
            q.wait()
    done = [s for s in specs if os.path.isfile(os.path.join(s['dir'], 'result.json'))]
    for s in specs:
        if s not in done:
            print(f'failed: {s["dir"]}', file=sys.stderr)
    table([json.load(open(os.path.join(s['dir'], 'result.json'))) for s in done])
    return len(done) == len(specs)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--one']:
        one(json.loads(sys.argv[2]))
    else:
        sys.exit(0 if main() else 1)
