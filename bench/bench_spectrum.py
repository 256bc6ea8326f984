"""Where samples differ from clean images: pixel FD split into its mean term and the rest, total variance, and power
per band of spatial period, each against a set of fresh clean images (bench_recipe.py writes SET-fresh.npy).

  python bench/bench_spectrum.py --fresh runs/bench-recipe/texture-fresh.npy RUN/best.pt TEACHER/latest.pt:full

A checkpoint is a generator or a teacher (":full" / ":truncated" picks the teacher's sampler); it draws as many samples
as there are fresh images, from seeds 0, 1, ... Ratios are sample / clean: 1 is right, < 1 too little (blurred, or
too alike), > 1 too much (grain, noise). Bands are periods in pixels, from the image's width down to 2 px (Nyquist).

  python bench/bench_spectrum.py --fresh runs/bench-recipe/texture-fresh.npy --gain TEACHER/latest.pt

--gain asks what the distillation's loss can see: how much of a faint grain, confined to one band and added to the
fresh images, the teacher's denoiser passes at noise levels around sigma_n (1: all of it; near 0: the teacher's
prediction, and so the generator's loss, hardly changes with it), beside each band's clean power over the noise's.
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


def band_masks(h, w):
    """For each band of BANDS, which frequencies of an h x w FFT it holds."""
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing='ij')
    period = 1 / np.maximum(np.hypot(fy, fx), 1e-9)          # in pixels; the DC term gets a huge period
    return [(period >= lo) & (period < (hi or w) + 1e-6) for lo, hi in BANDS]


def band_power(x):
    """Mean power of (N, C, H, W) images per band of BANDS (each image's mean removed first)."""
    x = np.asarray(x, np.float64)
    power = np.abs(np.fft.fft2(x - x.mean((2, 3), keepdims=True))) ** 2
    return np.array([power[..., keep].mean() for keep in band_masks(*x.shape[2:])])


def describe(x, clean):
    """Pixel FD of x to clean, its mean term, and x's total variance and band power as ratios to clean's."""
    fx, fc = fid.sample_features(x, 'pixel'), fid.sample_features(clean, 'pixel')
    (mu, cov), (mu0, cov0) = fid.stats_of(fx), fid.stats_of(fc)
    return dict(fd=fid.frechet_distance(mu, cov, mu0, cov0), mean=float(((mu - mu0) ** 2).sum()),
                var=float(np.trace(cov) / np.trace(cov0)), bands=band_power(x) / band_power(clean))


def band_gain(denoise, x, sigmas, rms=0.05, seed=0):
    """Per band (rows) and noise level s (columns): <D(x + g + s e, s) - D(x + s e, s), g> / <g, g>, for a grain g of
    RMS rms holding only that band's frequencies and the same noise e in both terms."""
    x, gen = torch.as_tensor(x, dtype=torch.float32), torch.Generator().manual_seed(seed)
    gains = np.zeros((len(BANDS), len(sigmas)))
    for i, keep in enumerate(band_masks(*x.shape[2:])):
        g = torch.fft.ifft2(torch.fft.fft2(torch.randn(x.shape, generator=gen)) * torch.from_numpy(keep)).real
        g = g * rms / g.pow(2).mean().sqrt()
        for j, s in enumerate(sigmas):
            e = s * torch.randn(x.shape, generator=gen)
            with torch.no_grad():
                gains[i, j] = float(((denoise(x + g + e, s) - denoise(x + e, s)) * g).sum() / (g * g).sum())
    return gains


def print_gain(path, clean):
    """--gain: band_gain of a teacher on 400 fresh images at 0.25-5x its sigma_n, and clean / noise power per band."""
    net, ckpt = sample.load_net(path, 'cpu')
    sigmas = [ckpt['sigma_n'] * k for k in (0.25, 0.5, 1, 1.5, 2.5, 5)]
    gains = band_gain(lambda y, s: net(y, torch.full((len(y),), s)), clean[:400], sigmas)
    snr = band_power(clean) / (clean.shape[-1] * clean.shape[-2] * ckpt['sigma_n'] ** 2)   # white noise's power
    print(f'{path}: the part of a grain the teacher passes, at sigma ' + ' '.join(f'{s:.3g}' for s in sigmas))
    for (lo, hi), row, r in zip(BANDS, gains, snr):
        print(f'  periods {lo:g}-{hi or "W"} px (clean / noise power {r:.3f}): ' + ' '.join(f'{v:.3f}' for v in row))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--fresh', required=True, help='clean images, (N, 3, H, W) in [-1, 1], e.g. SET-fresh.npy')
    p.add_argument('checkpoints', nargs='+', help='generator or teacher checkpoints; TEACHER:full|truncated')
    p.add_argument('--gain', action='store_true', help='teachers: how much of a grain per band the denoiser passes')
    a = p.parse_args(argv)
    clean = np.load(a.fresh) if os.path.isfile(a.fresh) else None
    if clean is None or clean.ndim != 4 or clean.shape[1] != 3:
        raise SystemExit(f'error: --fresh {a.fresh}: needs an existing .npy of clean images (N, 3, H, W), '
                         f'e.g. SET-fresh.npy from bench_recipe.py')
    torch.set_num_threads(1)
    if a.gain:
        for path in a.checkpoints:
            print_gain(path, clean)
        return
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
