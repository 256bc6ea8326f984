"""Where samples differ from clean images: pixel FD split into its mean term and the rest, total variance, and power
per band of spatial period, each against a set of fresh clean images (bench_recipe.py writes SET-fresh.npy).

  python bench/bench_spectrum.py --fresh runs/bench-recipe/texture-fresh.npy RUN/best.pt TEACHER/latest.pt:full

A checkpoint is a generator or a teacher (":full" / ":truncated" picks the teacher's sampler); it draws as many samples
as there are fresh images, from seeds 0, 1, ... Ratios are sample / clean: 1 is right, < 1 too little (blurred, or
too alike), > 1 too much (grain, noise). Bands are periods in pixels, from the image's width down to 2 px (Nyquist).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid      # noqa: E402  (the project's own modules, from the checkout this script sits in)
import sample   # noqa: E402

BANDS = ((8, None), (4, 8), (2.67, 4), (2, 2.67))   # periods in px (lower, upper); None: up to the image's width


def band_power(x):
    """Mean power of (N, C, H, W) images per band of BANDS (each image's mean removed first)."""
    x = np.asarray(x, np.float64)
    power = np.abs(np.fft.fft2(x - x.mean((2, 3), keepdims=True))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(x.shape[2]), np.fft.fftfreq(x.shape[3]), indexing='ij')
    period = 1 / np.maximum(np.hypot(fy, fx), 1e-9)          # in pixels; the DC term gets a huge period
    return np.array([power[..., (period >= lo) & (period < (hi or x.shape[3]) + 1e-6)].mean() for lo, hi in BANDS])


def describe(x, clean):
    """Pixel FD of x to clean, its mean term, and x's total variance and band power as ratios to clean's."""
    fx, fc = fid.sample_features(x, 'pixel'), fid.sample_features(clean, 'pixel')
    (mu, cov), (mu0, cov0) = fid.stats_of(fx), fid.stats_of(fc)
    return dict(fd=fid.frechet_distance(mu, cov, mu0, cov0), mean=float(((mu - mu0) ** 2).sum()),
                var=float(np.trace(cov) / np.trace(cov0)), bands=band_power(x) / band_power(clean))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--fresh', required=True, help='clean images, (N, 3, H, W) in [-1, 1], e.g. SET-fresh.npy')
    p.add_argument('checkpoints', nargs='+', help='generator or teacher checkpoints; TEACHER:full|truncated')
    a = p.parse_args(argv)
    clean = np.load(a.fresh) if os.path.isfile(a.fresh) else None
    if clean is None or clean.ndim != 4 or clean.shape[1] != 3:
        raise SystemExit(f'error: --fresh {a.fresh}: needs an existing .npy of clean images (N, 3, H, W), '
                         f'e.g. SET-fresh.npy from bench_recipe.py')
    torch.set_num_threads(1)
    names = ' '.join(f'{lo:g}-{hi or "W"}px' for lo, hi in BANDS)
    print(f'{"checkpoint":60s}    FD  mean   var  band power ratios, periods {names}')
    for spec in a.checkpoints:
        path, _, mode = spec.partition(':')
        net, ckpt = sample.load_net(path, 'cpu')
        batches = sample.generate(net, ckpt, list(range(len(clean))), 100, 'cpu', mode or None)
        r = describe(torch.cat([x for _, x in batches]).clamp(-1, 1).numpy(), clean)
        print(f'{spec[-60:]:60s} {r["fd"]:5.2f} {r["mean"]:5.2f} {r["var"]:5.3f} ' +
              ' '.join(f'{b:5.3f}' for b in r['bands']), flush=True)


if __name__ == '__main__':
    main()
