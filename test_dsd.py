"""The test suite, in pipeline order: data, networks, Phase I, Phase II, both training stages under torchrun and
after a kill, sampling, FID, theory, the front door. CPU only, tiny configs, fixed seeds, no network.
Run: python -m pytest -q test_dsd.py"""
import collections
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time
import types
import zipfile

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
from PIL import Image

import distill
import fid
import networks
import pretrain
import sample
from bench import bench_recipe, bench_replay, bench_spectrum

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env():
    """The one environment of the suite's subprocesses: unbuffered output, one thread per process."""
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def _run(script, *args, cwd, nproc=1, timeout=600):
    """Run a script of this repo as a user would (under torchrun when nproc > 1); return the CompletedProcess."""
    launch = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, pattern):
    """Bad input ends in exactly one 'error: ...' line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert len(err) >= 1 and err[-1].startswith('error: '), proc.stderr
    assert re.search(pattern, err[-1]), err[-1]


def _same_training(a, b, start, rel=0.02):
    """Two state dicts that took the same steps from `start`: each tensor differs by at most `rel` of how far it
    moved (round-off of another summation order, amplified by Adam), and tensors that did not move are equal."""
    assert a.keys() == b.keys()
    for k in a:
        moved = (a[k].float() - start[k].float()).abs().max().item()
        assert (a[k].float() - b[k].float()).abs().max().item() <= 1e-7 + rel * moved, k


# --------------------------------------------------------------------------------------------------------------
# Data and its corruption (pretrain.py)


def test_noisy_set_is_fixed_float_and_unclipped():
    x, info = pretrain.load_data('shapes')
    assert info['kind'] == 'images' and x.shape[1:] == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    y1 = pretrain.make_noisy(x[:50], 0.2, seed=3)
    y2 = pretrain.make_noisy(x[:50], 0.2, seed=3)
    assert y1.dtype == np.float32 and np.array_equal(y1, y2)                      # same in every run
    assert np.array_equal(pretrain.make_noisy(x[:50][[7, 3]], 0.2, 3, index=[7, 3]), y1[[7, 3]])  # per item
    assert not np.array_equal(pretrain.make_noisy(x[:50], 0.2, seed=4), y1)
    assert y1.min() < -1 and y1.max() > 1                                         # never clipped
    assert abs(float((y1 - x[:50]).std()) - 0.2) < 0.01
    y, _ = pretrain.noisy_dataset('toy', 0.2, seed=0)
    clean, _ = pretrain.load_data('toy')
    assert y.shape == clean.shape and not np.allclose(y, clean)
    assert np.array_equal(pretrain.noisy_dataset('toy', 0.2, 0, already_noisy=True)[0], clean)


def test_builtin_clean_samples_differ_from_training_set():
    a = pretrain.builtin_clean('toy', 100)
    b, _ = pretrain.load_data('toy')
    assert a.shape == (100, 2) and not np.allclose(a, b[:100])
    curve = pretrain.toy_curve()
    from scipy.spatial import cKDTree
    assert cKDTree(curve).query(a)[0].max() < 0.01                                # on the clean curve


def test_data_formats_and_bad_data(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    folder = tmp_path / 'imgs'
    (folder / 'sub').mkdir(parents=True)
    imgs = g.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / ('sub' if i % 2 else '') / f'{i:03d}.png')
    x, info = pretrain.load_data(str(folder))
    assert x.shape == (5, 3, 8, 8) and info['kind'] == 'images'
    with zipfile.ZipFile(tmp_path / 'imgs.zip', 'w') as z:
        for i, im in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format='PNG')
            z.writestr(f'{i:05d}.png', buf.getvalue())
    xz, _ = pretrain.load_data(str(tmp_path / 'imgs.zip'))
    np.save(tmp_path / 'imgs.npy', imgs)
    xn, _ = pretrain.load_data(str(tmp_path / 'imgs.npy'))
    assert np.allclose(xz, xn) and np.allclose(x[:3], xn[[0, 2, 4]])   # sorted by path: top level first
    assert np.allclose(xn, imgs.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    np.savez(tmp_path / 'pts.npz', pts=g.normal(size=(10, 3)))
    assert pretrain.load_data(str(tmp_path / 'pts.npz'))[1]['kind'] == 'points'
    np.save(tmp_path / 'ints.npy', np.arange(20).reshape(10, 2))                 # integer coordinates are points
    ints, info = pretrain.load_data(str(tmp_path / 'ints.npy'))
    assert info['kind'] == 'points' and ints.dtype == np.float32 and ints[9, 1] == 19
    np.save(tmp_path / 'flat.npy', np.zeros((10, 64), np.uint8))                  # flattened uint8 images: refused
    with pytest.raises(SystemExit, match='expected uint8 NHWC images'):
        pretrain.load_data(str(tmp_path / 'flat.npy'))
    for name, arr, msg in [('unit', g.uniform(0, 1, (4, 3, 8, 8)), r'model units, \[-1, 1\]; these lie in \[0, 0.99'),
                           ('u255', g.uniform(0, 255, (4, 3, 8, 8)), r'these lie in \[0, 25[45]'),   # float 0..255
                           ('one', g.uniform(-1, 1, (1, 3, 8, 8)), 'at least 2 images, found 1'),
                           ('fwide', g.uniform(-1, 1, (4, 3, 6, 8)), '8x6; they must be square'),
                           ('nopts', np.zeros((0, 2)), r'points \(that are not all equal\); got float64 \(0, 2\)'),
                           ('same', np.ones((50, 2)), r'not all equal\); got float64 \(50, 2\)')]:
        np.save(tmp_path / f'{name}.npy', arr)
        with pytest.raises(SystemExit, match=msg):
            pretrain.load_data(str(tmp_path / f'{name}.npy'))
    model_units = g.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)       # float NCHW in [-1, 1] load as given
    np.save(tmp_path / 'model.npy', model_units)
    assert np.array_equal(pretrain.load_data(str(tmp_path / 'model.npy'))[0], model_units)
    np.save(tmp_path / 'far.npy', g.normal(size=(20, 2)).astype(np.float32) * 1e30)   # the spread in float64: finite
    assert np.isfinite(pretrain.noisy_dataset(str(tmp_path / 'far.npy'), 0.2)[0]).all()
    np.save(tmp_path / 'nan.npy', np.where(np.arange(20).reshape(10, 2) == 7, np.nan, 0.0))
    with pytest.raises(SystemExit, match='nan.npy: holds NaN or inf'):
        pretrain.load_data(str(tmp_path / 'nan.npy'))
    np.save(tmp_path / 'line.npy', g.normal(size=(300, 1)).astype(np.float32))   # 1-D points train, previews drawn
    pretrain.main(['--data', str(tmp_path / 'line.npy'), '--kimg', '0.05', '--batch', '16', '--device', 'cpu',
                   '--outdir', str(tmp_path / 'line')])
    dots = np.asarray(sample.scatter(np.array([[0.0], [0.0], [0.0]])))[1:-1, 1:-1].min(2) < 100   # blue dots
    assert dots.any(0).sum() <= 3 and np.ptp(np.flatnonzero(dots.any(1))) > 300  # one column, top to bottom

    (tmp_path / 'wide').mkdir()
    for i in range(2):
        Image.fromarray(g.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(tmp_path / 'wide' / f'{i}.png')
    with pytest.raises(SystemExit, match='8x6; they must be square'):
        pretrain.load_data(str(tmp_path / 'wide'))
    Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / 'zz.png')
    with pytest.raises(SystemExit, match='zz.png is 16x16 .*all images must have one size'):
        pretrain.load_data(str(folder))
    (tmp_path / 'deep').mkdir()                    # a 16-bit PNG would read as white: refused, not clipped
    for name in ('a.png', 'b.png'):
        Image.fromarray(g.integers(0, 65535, (8, 8)).astype(np.uint16)).save(tmp_path / 'deep' / name)
    with pytest.raises(SystemExit, match=r'a.png is a I;16 \(16-bit or float\) image; save 8-bit ones'):
        pretrain.load_data(str(tmp_path / 'deep'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='no image files'):
        pretrain.load_data(str(tmp_path / 'empty'))
    with pytest.raises(SystemExit, match='no such file'):
        pretrain.load_data(str(tmp_path / 'missing'))
    (tmp_path / 'bad.npy').write_bytes(b'not numpy')
    with pytest.raises(SystemExit, match='cannot read'):
        pretrain.load_data(str(tmp_path / 'bad.npy'))
    (tmp_path / 'bad.zip').write_bytes(b'not a zip')
    with pytest.raises(SystemExit, match='not a readable zip'):
        pretrain.load_data(str(tmp_path / 'bad.zip'))


def _fake_cifar(path, evil=False):
    """A cifar-10-python.tar.gz in the real layout, 4 images per batch (or a batch that tries to run code)."""
    with tarfile.open(path, 'w:gz') as tar:
        for k in range(1, 6):
            data = np.full((4, 3072), k, np.uint8)
            blob = pickle.dumps({'data': data, 'labels': [0] * 4}, protocol=2)
            if evil and k == 3:
                blob = b"cos\nsystem\n(S'touch " + str(path).encode() + b".pwned'\ntR."
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar10_loader_reads_the_tarball_and_runs_no_code(tmp_path):
    _fake_cifar(tmp_path / 'cifar-10-python.tar.gz')
    x, info = pretrain.load_data('cifar10', str(tmp_path))
    assert x.shape == (20, 3, 32, 32) and np.allclose(x[4:8], 2 / 127.5 - 1)
    evil = tmp_path / 'evil'
    evil.mkdir()
    _fake_cifar(evil / 'cifar-10-python.tar.gz', evil=True)
    with pytest.raises(SystemExit, match='not a readable'):
        pretrain.load_data('cifar10', str(evil))
    assert not os.path.exists(str(evil / 'cifar-10-python.tar.gz') + '.pwned')


def _undo_augment(out, lab):
    """Invert one augmented image from its 9 EDM-layout labels [xflip, yflip, scale, cos-1, sin, aniso x2, tx, ty]:
    shift back (pixels that came from the reflected border become NaN), rotate back, unflip."""
    c, h, w = out.shape
    tx, ty = (round(float(v) * w * 0.125) for v in lab[7:9])
    back = torch.full_like(out, float('nan'))
    r0, r1, c0, c1 = max(0, -ty), h - max(0, ty), max(0, -tx), w - max(0, tx)
    back[:, r0:r1, c0:c1] = out[:, r0 + ty:r1 + ty, c0 + tx:c1 + tx]
    back = torch.rot90(back, -round(math.atan2(float(lab[4]), float(lab[3]) + 1) / (math.pi / 2)), (1, 2))
    back = back.flip(1) if lab[1] else back
    return back.flip(2) if lab[0] else back


def test_augment_permutes_pixels_and_its_labels_undo_it():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 3, 8, 8)
    out, labels = pretrain.augment(y, 1.0, g)
    assert out.shape == y.shape and labels.shape == (64, 9)
    assert (labels[:, [2, 5, 6]] == 0).all()                    # scale and anisotropy are never applied
    assert (labels[:, [1, 4, 7, 8]] != 0).any(0).all()           # at p = 1 every other transform occurs
    for i in range(64):                                          # the labels say exactly what was done
        back = _undo_augment(out[i], labels[i])
        known = ~back.isnan()
        assert known.float().mean() > 0.2 and torch.equal(back[known], y[i][known]), i
    flipped = labels[:, 0] == 1
    assert 0.3 < flipped.float().mean() < 0.7
    out0, lab0 = pretrain.augment(y, 0.0, g)                     # p = 0: only EDM's x-flip remains
    assert (lab0[:, 1:] == 0).all()
    assert all(torch.equal(out0[i], y[i].flip(2) if lab0[i, 0] else y[i]) for i in range(64))


# --------------------------------------------------------------------------------------------------------------
# The noise level of data nobody gave sigma_n for (pretrain.py --sigma auto, --estimate-sigma)


SIGMAS = (0.05, 0.1, 0.2, 0.4)


def _to_unit(img01: np.ndarray) -> np.ndarray:
    u8 = np.clip(np.round(img01 * 255.0), 0, 255).astype(np.uint8)
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def _random_field(rng, n, size, beta):
    """n real fields (n, size, size) with amplitude spectrum ~ f^-beta, unit std."""
    big = size + size // 2  # generate larger and crop: little periodic wrap-around
    fy = np.fft.fftfreq(big)[:, None]
    fx = np.fft.rfftfreq(big)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = f[None] ** (-np.asarray(beta, dtype=np.float64)[:, None, None])
    amp[:, 0, 0] = 0.0
    white = np.fft.rfft2(rng.standard_normal((n, big, big), dtype=np.float32))
    g = np.fft.irfft2(white * amp, s=(big, big))[:, :size, :size]
    g -= g.mean((1, 2), keepdims=True)
    g /= g.std((1, 2), keepdims=True) + 1e-12
    return g


def _shape_masks(rng, n, size, kind):
    """(n, size, size) boolean masks of random shapes of one kind (pixel-centre sampling)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    yy, xx = yy[None], xx[None]
    col = lambda v: v[:, None, None]  # noqa: E731
    cy, cx = col(rng.uniform(0.15, 0.85, n) * size), col(rng.uniform(0.15, 0.85, n) * size)
    dy, dx = yy - cy, xx - cx
    th = col(rng.uniform(0, np.pi, n))
    if kind in ("ellipse", "circle"):
        ry = col(rng.uniform(0.1, 0.35, n) * size)
        rx = ry if kind == "circle" else col(rng.uniform(0.1, 0.35, n) * size)
        a = (dx * np.cos(th) + dy * np.sin(th)) / rx
        b = (-dx * np.sin(th) + dy * np.cos(th)) / ry
        return a ** 2 + b ** 2 <= 1.0
    if kind in ("box", "square"):
        hy = col(rng.uniform(0.1, 0.35, n) * size)
        hx = hy if kind == "square" else col(rng.uniform(0.1, 0.35, n) * size)
        if kind == "square":
            th = np.zeros_like(th)
        a = dx * np.cos(th) + dy * np.sin(th)
        b = -dx * np.sin(th) + dy * np.cos(th)
        return (np.abs(a) <= hx) & (np.abs(b) <= hy)
    if kind == "bar":
        w = col(rng.uniform(0.03, 0.08, n) * size)
        return np.abs(dx * np.sin(th) - dy * np.cos(th)) <= w
    if kind == "triangle":
        rad = rng.uniform(0.15, 0.4, n) * size
        ang = rng.uniform(0, 2 * np.pi, n)[:, None] + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])[None] \
            + rng.uniform(-0.3, 0.3, (n, 3))
        vx, vy = cx[:, 0, 0, None] + rad[:, None] * np.cos(ang), cy[:, 0, 0, None] + rad[:, None] * np.sin(ang)
        inside = np.ones((n, size, size), bool)
        for i in range(3):
            j, k = (i + 1) % 3, (i + 2) % 3
            x1, y1, x2, y2 = col(vx[:, i]), col(vy[:, i]), col(vx[:, j]), col(vy[:, j])
            s_pt = (x2 - x1) * (yy - y1) - (y2 - y1) * (xx - x1)
            s_opp = (x2 - x1) * (col(vy[:, k]) - y1) - (y2 - y1) * (col(vx[:, k]) - x1)
            inside &= s_pt * np.sign(s_opp) >= 0
        return inside
    raise ValueError(kind)


def _paint(rng, img, kinds, size, n_shapes, shade=0.0):
    """Paint up to n_shapes[i] random shapes of random colour into img (n, 3, size, size)."""
    n = img.shape[0]
    for slot in range(int(n_shapes.max())):
        kind_idx = rng.integers(0, len(kinds), n)
        colour = rng.uniform(0, 1, (n, 3))
        ramp = 1.0 + shade * rng.uniform(-1, 1, n)[:, None, None] * (np.arange(size) / size - 0.5)[None, None, :]
        for ki, kind in enumerate(kinds):
            sel = np.nonzero((kind_idx == ki) & (slot < n_shapes))[0]
            if sel.size == 0:
                continue
            m = _shape_masks(rng, sel.size, size, kind)
            fill = colour[sel][:, :, None, None] * ramp[sel][:, None]
            img[sel] = np.where(m[:, None], fill, img[sel])
    return img


@functools.lru_cache(maxsize=None)
def cifar_like(n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S, up = 32, 2  # shapes are rendered at 2x and box-downsampled (anti-aliased, like CIFAR)
    fields = _random_field(rng, 3 * n, S, rng.uniform(1.5, 2.5, 3 * n)).reshape(n, 3, S, S)
    base = rng.uniform(0.2, 0.8, (n, 3, 1, 1))
    lum = rng.uniform(0.05, 0.2, (n, 1, 1, 1))          # shared (luminance) texture
    mix = rng.normal(0, 0.04, (n, 3, 3))                 # weaker colour texture
    img = base + lum * fields[:, :1] + np.einsum("ncd,ndhw->nchw", mix, fields)
    hi = np.repeat(np.repeat(img, up, 2), up, 3)
    hi = _paint(rng, hi, ("ellipse", "box", "triangle", "bar"), S * up, rng.integers(1, 5, n), shade=0.3)
    img = hi.reshape(n, 3, S, up, S, up).mean((3, 5))
    return _to_unit(np.clip(img, 0, 1))


@functools.lru_cache(maxsize=None)
def shapes16(n: int = 5000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = 16
    ramp = (np.arange(S) + 0.5) / S - 0.5
    th = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    grad = np.cos(th) * ramp[None, None, :] + np.sin(th) * ramp[None, :, None]   # n, S, S
    slope = rng.uniform(-0.5, 0.5, (n, 3)) * (rng.random(n) < 0.5)[:, None]    # half plain, half gradient
    img = rng.uniform(0, 1, (n, 3))[:, :, None, None] + slope[:, :, None, None] * grad[:, None]
    img = _paint(rng, img, ("circle", "square", "triangle"), S, np.ones(n, int))
    return _to_unit(np.clip(img, 0, 1))


def add_noise(x: np.ndarray, sigma: float, seed: int = 123) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)


DATASETS = {"builtin_shapes": lambda: pretrain.load_data("shapes")[0][:5000], "cifar_like": cifar_like,
            "shapes16": shapes16}


@pytest.mark.parametrize("name,sigma", [(n, s) for n in DATASETS for s in SIGMAS])
def test_sigma_relative_error(name, sigma):
    x = add_noise(DATASETS[name](), sigma)
    out = pretrain.estimate_sigma(x, seed=0)
    assert set(out) >= {"sigma", "std", "method", "n"}
    rel = abs(out["sigma"] - sigma) / sigma
    assert rel < 0.10, (name, sigma, out)
    assert np.isfinite(out["std"]) and out["std"] < 0.1 * sigma


@pytest.mark.parametrize("name", list(DATASETS))
def test_sigma_clean_data_near_zero(name):
    out = pretrain.estimate_sigma(DATASETS[name](), seed=0)
    assert out["sigma"] < 0.01, out


def test_sigma_deterministic_and_torch_input():
    import torch

    x = add_noise(shapes16(), 0.1)
    a = pretrain.estimate_sigma(x, seed=3)
    b = pretrain.estimate_sigma(torch.from_numpy(x), seed=3)
    assert a["sigma"] == b["sigma"]


def test_sigma_few_images():
    for k in (3, 30):
        out = pretrain.estimate_sigma(add_noise(shapes16()[:k], 0.1), seed=0)
        assert abs(out["sigma"] - 0.1) < 0.01, (k, out)


def test_sigma_auto_and_estimate_sigma_flags(tmp_path, capsys):
    y = pretrain.make_noisy(pretrain.load_data('shapes')[0][:3000], 0.1, seed=5)
    np.save(tmp_path / 'noisy.npy', y)
    pretrain.main(['--data', str(tmp_path / 'noisy.npy'), '--already-noisy', '--estimate-sigma'])
    out = capsys.readouterr().out
    assert re.search(r'estimated sigma_n = 0\.(09|10|11)\d* \+- ', out), out
    pretrain.main(['--data', str(tmp_path / 'noisy.npy'), '--already-noisy', '--sigma', 'auto', '--kimg', '0.064',
                   '--batch', '32', '--outdir', str(tmp_path / 'run'), '--device', 'cpu'])
    ck = networks.load_checkpoint(str(tmp_path / 'run' / 'latest.pt'))
    assert abs(ck['sigma_n'] - 0.1) < 0.01 and ck['config']['sigma_estimate']['method'].startswith('patch PCA')
    with pytest.raises(SystemExit, match='--already-noisy'):
        pretrain.main(['--data', 'shapes', '--sigma', 'auto'])
    np.save(tmp_path / 'points.npy', pretrain.load_data('toy')[0])      # points: no estimator, and it says so
    with pytest.raises(SystemExit, match='estimates the noise of images .*--sigma S'):
        pretrain.main(['--data', str(tmp_path / 'points.npy'), '--already-noisy', '--sigma', 'auto'])


# --------------------------------------------------------------------------------------------------------------
# networks.py


# --- EDM layout: digests of EDM's own EDMPrecond(SongUNet DDPM++) state dicts, resample_filter buffers
# dropped, one "name:shape" line per tensor (measured from NVlabs/edm training/networks.py, label_dim 0,
# augment_dim 9; the full listing is in edm_param_shapes.json where the lead keeps it).
_NETWORKS_EDM_DIGESTS = {
    'cifar10': (55733891, 417, 'cd71817b4d037326df1892c6c98039fd1257578799510c18df85e5608e1fd8d4'),
    'ffhq64': (61805571, 541, '79710be42561f2071ed767ef7ae8892d7ff79b6722271ead4bdbf2488337e50f'),
    'tiny': (750179, 143, 'ac806909ba0392a9c0418405db2313b96260da15cc81f272afbb0da156769a00'),
}

@pytest.mark.parametrize('preset', ['cifar10', 'ffhq64', 'tiny'])
def test_networks_edm_names_and_shapes(preset):
    with torch.device('meta'):  # no memory, no init cost
        net = networks.EDMPrecond(**networks.PRESETS[preset]['net'])
    sd = net.state_dict()
    canon = '\n'.join(f'{k}:{tuple(v.shape)}' for k, v in sd.items())
    n = sum(v.numel() for v in sd.values())
    assert (n, len(sd), hashlib.sha256(canon.encode()).hexdigest()) == _NETWORKS_EDM_DIGESTS[preset]
    if preset == 'cifar10':  # a few by hand, from EDM's constructor
        assert tuple(sd['model.map_augment.weight'].shape) == (128, 9)
        assert 'model.map_augment.bias' not in sd
        assert tuple(sd['model.enc.32x32_conv.weight'].shape) == (128, 3, 3, 3)
        assert tuple(sd['model.enc.16x16_down.skip.weight'].shape) == (256, 256, 1, 1)
        assert tuple(sd['model.enc.16x16_block0.qkv.weight'].shape) == (768, 256, 1, 1)
        assert tuple(sd['model.dec.8x8_in0.proj.weight'].shape) == (256, 256, 1, 1)
        assert tuple(sd['model.dec.32x32_block0.conv0.weight'].shape) == (256, 512, 3, 3)
        assert tuple(sd['model.dec.32x32_aux_conv.weight'].shape) == (3, 256, 3, 3)

def test_networks_edm_state_dict_with_filters_loads_strict():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**networks.PRESETS['tiny']['net'])
    sd = dict(net.state_dict())
    sd['model.enc.8x8_down.conv0.resample_filter'] = torch.full((1, 1, 2, 2), 0.25)  # as EDM stores them
    sd['model.enc.8x8_down.skip.resample_filter'] = torch.full((1, 1, 2, 2), 0.25)
    net.load_state_dict(sd, strict=True)
    assert list(net.state_dict()) == [k for k in sd if not k.endswith('resample_filter')]

def test_networks_forward_shapes_and_sigma_forms():
    torch.manual_seed(0)
    net = networks.build_net(networks.PRESETS['tiny']['net']).eval()
    x = torch.randn(3, 3, 16, 16)
    aug = torch.randn(3, 9)
    with torch.no_grad():
        d_float = net(x, 0.7, aug)
        d_0d = net(x, torch.tensor(0.7), aug)
        d_vec = net(x, torch.full((3,), 0.7), aug)
        d_mix = net(x, torch.tensor([0.7, 5.0, 0.01]))
    assert d_float.shape == x.shape and d_float.dtype == torch.float32
    assert torch.equal(d_float, d_0d) and torch.allclose(d_float, d_vec, atol=1e-6)
    assert d_mix.shape == x.shape and torch.isfinite(d_mix).all()
    with torch.no_grad():  # per-sample sigma is really per sample
        assert torch.allclose(net(x[1:2], 5.0), d_mix[1:2], atol=1e-5)
    # fresh net: F starts near 0 (1e-5 output init), so D ~ c_skip x
    sd = 0.5
    assert torch.allclose(d_float, sd ** 2 / (0.7 ** 2 + sd ** 2) * x, atol=1e-3)
    with pytest.raises(ValueError):
        net(x, torch.ones(2))
    toy = networks.build_net(networks.PRESETS['toy']['net'])
    pts = torch.randn(5, 2)
    out = toy(pts, torch.rand(5) + 0.1)
    assert out.shape == (5, 2)
    out.square().sum().backward()
    assert all(p.grad is not None for p in toy.parameters())

def test_networks_config_rebuild_and_build_net_errors():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**networks.PRESETS['tiny']['net'])
    cfg = net.config
    assert all(isinstance(v, (int, float, str, list)) for v in cfg.values())
    twin = networks.EDMPrecond(**cfg)
    twin.load_state_dict(net.state_dict())
    assert twin.config == cfg and (twin.img_resolution, twin.img_channels, twin.sigma_data) == (16, 3, 0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, 1.0), twin.eval()(x, 1.0))
    for bad, word in [(dict(cfg, arch='transformer'), 'arch'), (dict(cfg, width=3), 'width'),
                      ({'img_channels': 3}, 'img_resolution')]:
        with pytest.raises(SystemExit, match=word):
            networks.build_net(bad)
    for name, p in networks.PRESETS.items():
        assert set(p['train']) == {'batch', 'lr', 'kimg', 'warmup', 'ema', 'ema_rampup', 'augment'}, name

# --- checkpoints ------------------------------------------------------------------------------

def _networks_ckpt(net):
    return dict(format='dsd-1', kind='teacher', net=net.config, ema=net.state_dict(), sigma_n=0.2, loss='ambient',
                data='tiny', kimg=1.5, state=dict(step=3, opt=dict(lr=1e-3, betas=[0.9, 0.999])))

def test_networks_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = networks.EDMPrecond(**networks.PRESETS['tiny']['net'])
    path = tmp_path / 'a.pt'
    networks.save_checkpoint(path, _networks_ckpt(net))
    raw = torch.load(path, weights_only=True)  # plain torch, restricted loader
    ck = networks.load_checkpoint(path)
    assert raw.keys() == ck.keys() and ck['sigma_n'] == 0.2 and ck['state']['opt']['betas'] == [0.9, 0.999]
    back = networks.build_net(ck['net'])
    back.load_state_dict(ck['ema'])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ['a.pt']

def test_networks_checkpoint_atomic(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = networks.EDMPrecond(**networks.PRESETS['tiny']['net'])
    path = tmp_path / 'a.pt'
    networks.save_checkpoint(path, _networks_ckpt(net))
    before = path.read_bytes()
    with pytest.raises(TypeError, match='numpy|object'):  # refused before anything is written
        networks.save_checkpoint(path, dict(_networks_ckpt(net), bad=object()))
    real_save = torch.save
    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        buf = io.BytesIO(); real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        networks.save_checkpoint(path, _networks_ckpt(net))
    with pytest.raises(KeyboardInterrupt):
        networks.save_checkpoint(tmp_path / 'new.pt', _networks_ckpt(net))
    assert path.read_bytes() == before  # old checkpoint intact, no partial new one, no temp files
    assert sorted(os.listdir(tmp_path)) == ['a.pt']

def test_networks_load_checkpoint_errors(tmp_path):
    (tmp_path / 'text.pt').write_text('hello')
    (tmp_path / 'notes.pt').write_text('# notes\n')        # torch calls this a weights-only refusal
    torch.save({'ema': {}}, tmp_path / 'other.pt')
    torch.save({'format': 'dsd-1', 'ema': _NetworksFakeObj('Anything')}, tmp_path / 'objects.pt')
    for name, word in [('missing.pt', 'no such'), ('text.pt', 'not a readable torch checkpoint'),
                       ('notes.pt', 'not a readable torch checkpoint'), ('other.pt', 'dsd-1'),
                       ('objects.pt', 'refused: it holds Python objects')]:
        with pytest.raises(SystemExit) as e:
            networks.load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith('error: ') and name in msg and word in msg and '\n' not in msg
        assert 'weights_only' not in msg.lower()               # never relay torch's advice to load unsafely

# --- EDM / SiD snapshots, built with no EDM code ------------------------------------------------
# EDM pickles each network module as torch_utils.persistence._reconstruct_persistent_obj(meta) with
# meta = {type, version, module_src, class_name, state}; EDM's loader exec()s module_src. Our pickles put
# in module_src code that creates a mark file, so running it anywhere would show.

_NETWORKS_EDM_CLASS = {torch.nn.Conv2d: 'Conv2d', torch.nn.Linear: 'Linear', torch.nn.GroupNorm: 'GroupNorm'}

class _NetworksFakeObj:  # a non-module persistent object (EDM's loss_fn, augment_pipe)
    def __init__(self, class_name, **state):
        self.class_name, self.state = class_name, state

class _NetworksEvil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))

class _NetworksEDMPickler(pickle.Pickler):
    def __init__(self, f, reconstruct, src, names, extra, filters, legacy):
        super().__init__(f, protocol=4)
        self.reconstruct, self.src, self.names, self.extra, self.filters, self.legacy = (
            reconstruct, src, names, extra, filters, legacy)

    def _persistent(self, class_name, state):
        meta = dict(type='class', version=6, module_src=self.src, class_name=class_name, state=state)
        return self.reconstruct, (meta,)

    def reducer_override(self, obj):
        if isinstance(obj, _NetworksFakeObj):
            return self._persistent(obj.class_name, dict(obj.state))
        if isinstance(obj, torch.nn.Module) and not isinstance(obj, torch.nn.ModuleDict):
            state = {k: v for k, v in obj.__dict__.items()
                     if k in ('_parameters', '_buffers', '_modules', 'training') or not k.startswith('_')}
            if isinstance(obj, torch.nn.Conv2d):  # EDM's Conv2d always has this buffer (None unless resampling)
                state['_buffers'] = dict(state['_buffers'], resample_filter=self.filters.get(id(obj)))
            state.update(self.extra.get(id(obj), {}))
            name = self.names.get(id(obj), _NETWORKS_EDM_CLASS.get(type(obj), type(obj).__name__))
            return self._persistent(name, state)
        if self.legacy and isinstance(obj, torch.nn.Parameter):  # torch 1.x layout, legacy storage bytes
            return torch._utils._rebuild_parameter, (obj.detach(), False, collections.OrderedDict())
        if self.legacy and type(obj) is torch.Tensor:
            t = obj.detach().clone().contiguous()  # own storage, offset 0
            buf = io.BytesIO()
            torch.save(t.storage(), buf, _use_new_zipfile_serialization=False)
            return torch._utils._rebuild_tensor_v2, (_NetworksBytes(buf.getvalue()), 0, tuple(t.shape), t.stride(),
                                                     False, collections.OrderedDict())
        return NotImplemented

class _NetworksBytes:
    def __init__(self, data):
        self.data = data
    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)

class _NetworksFakePersistence:
    """Installs a module named torch_utils.persistence (only while pickling / for the control load); its
    reconstruct function runs module_src the way EDM's loader does."""
    def __enter__(self):
        mod = types.ModuleType('torch_utils.persistence')
        def _reconstruct_persistent_obj(meta):
            exec(meta['module_src'], {})
            return types.SimpleNamespace(**meta['state'])
        _reconstruct_persistent_obj.__module__ = mod.__name__
        _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
        mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
        pkg = types.ModuleType('torch_utils')
        pkg.persistence = mod
        self.saved = {k: sys.modules.get(k) for k in ('torch_utils', 'torch_utils.persistence')}
        sys.modules.update({'torch_utils': pkg, 'torch_utils.persistence': mod})
        return mod

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

def _networks_edm_tree(net, precond='EDMPrecond', model='SongUNet', noise='PositionalEmbedding', unet_kwargs=None):
    """Class names / extra attributes / resample filters that make our module tree look like EDM's."""
    names = {id(net): precond, id(net.model): model, id(net.model.map_noise): noise}
    unet_kw = dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], **net.config)
    unet_kw.update(unet_kwargs or {})
    extra = {id(net): dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf')),
             id(net.model): dict(label_dropout=0, _init_kwargs=unet_kw),
             id(net.model.map_noise): dict(max_positions=10000, endpoint=True)}
    filters = {}
    for m in net.modules():
        if isinstance(m, networks.UNetBlock):
            extra[id(m)] = dict(num_heads=1 if m.attention else 0, skip_scale=math.sqrt(0.5), adaptive_scale=False)
            if m.up or m.down:
                filters[id(m.conv0)] = filters[id(m.skip)] = torch.full((1, 1, 2, 2), 0.25)
    return names, extra, filters

def _networks_snapshot(path, snap, mark, tree, legacy=False):
    src = f'open({str(mark)!r}, "w").write("module_src was executed")\nclass EDMPrecond: pass\n'
    with _NetworksFakePersistence() as mod, open(path, 'wb') as f:
        _NetworksEDMPickler(f, mod._reconstruct_persistent_obj, src, *tree, legacy).dump(snap)
    return path

def _networks_tiny_net():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**networks.PRESETS['tiny']['net']).eval()
    with torch.no_grad():  # trained-like weights so a wrong mapping would show in the outputs
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net

@pytest.mark.parametrize('legacy', [False, True])
def test_networks_edm_snapshot_loads_without_running_code(tmp_path, legacy):
    net = _networks_tiny_net()
    mark = tmp_path / 'MARK'
    snap = dict(ema=net, loss_fn=_NetworksFakeObj('EDMLoss', P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                augment_pipe=_NetworksFakeObj('AugmentPipe', p=0.12, xflip=1e8),
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                    path='datasets/cifar10-32x32.zip', use_labels=False, max_size=50000))
    path = _networks_snapshot(tmp_path / 'network-snapshot-000200.pkl', snap, mark, _networks_edm_tree(net), legacy)

    ck = networks.load_checkpoint(path)
    assert not mark.exists()
    assert (ck['format'], ck['kind'], ck['sigma_n'], ck['loss'], ck['kimg'], ck['data']) == (
        'dsd-1', 'teacher', 0.0, 'standard', 200.0, 'cifar10-32x32')
    assert ck['net'] == net.config
    assert list(ck['ema']) == list(net.state_dict())
    assert all(torch.equal(ck['ema'][k], v) for k, v in net.state_dict().items())
    back = networks.build_net(ck['net']).eval()
    back.load_state_dict(ck['ema'])
    x, aug = torch.randn(2, 3, 16, 16), torch.randn(2, 9)
    with torch.no_grad():
        assert torch.equal(back(x, torch.tensor([0.3, 3.0]), aug), net(x, torch.tensor([0.3, 3.0]), aug))
    ck2 = networks.load_checkpoint(path, sigma_n=0.2)
    assert (ck2['sigma_n'], ck2['loss'], ck2['converted']['from_flags']) == (0.2, 'ambient', ['sigma_n'])
    assert not mark.exists()

    # control: EDM's way of loading (plain pickle + a reconstruct that exec()s module_src) does run it
    with _NetworksFakePersistence():
        pickle.loads(path.read_bytes())
    assert mark.exists()

def test_networks_sid_generator_snapshot_and_cli(tmp_path):
    net = _networks_tiny_net()
    mark = tmp_path / 'MARK'
    path = _networks_snapshot(tmp_path / 'network-snapshot-1.200000-000512.pkl', dict(ema=net), mark,
                              _networks_edm_tree(net))
    ck = networks.load_checkpoint(path)
    assert (ck['kind'], ck['sigma_init'], ck['kimg'], ck['teacher']) == ('generator', 2.5, 512.0, net.config)
    out = tmp_path / 'g.pt'
    networks.main(['convert', str(path), str(out), '--sigma-init', '80', '--sigma', '0.2'])
    ck = networks.load_checkpoint(out)
    assert (ck['kind'], ck['sigma_init'], ck['sigma_n']) == ('generator', 80.0, 0.2)
    assert ck['converted']['from_flags'] == ['sigma_n', 'sigma_init']
    networks.main(['convert', str(path), str(tmp_path / 't.pt'), '--kind', 'teacher'])
    assert networks.load_checkpoint(tmp_path / 't.pt')['kind'] == 'teacher'
    assert all(torch.equal(ck['ema'][k], v) for k, v in net.state_dict().items())
    assert not mark.exists()

def _networks_refused(path):
    with pytest.raises(SystemExit) as e:
        networks.load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f'error: {path}: ') and '\n' not in msg
    return msg

@pytest.mark.parametrize('variant,words', [
    (dict(precond='VPPrecond'), ['VPPrecond']),
    (dict(model='DhariwalUNet'), ['DhariwalUNet']),
    (dict(noise='FourierEmbedding'), ['FourierEmbedding', 'NCSN++']),
    (dict(unet_kwargs=dict(encoder_type='residual')), ['encoder_type', 'NCSN++']),
])
def test_networks_snapshot_other_architecture_refused(tmp_path, variant, words):
    net = _networks_tiny_net()
    mark = tmp_path / 'MARK'
    path = _networks_snapshot(tmp_path / 'network-snapshot-000100.pkl', dict(ema=net), mark,
                              _networks_edm_tree(net, **variant))
    msg = _networks_refused(path)
    assert all(w in msg for w in words), msg
    assert not mark.exists()

def test_networks_snapshot_bad_files_refused(tmp_path):
    net = _networks_tiny_net()
    mark = tmp_path / 'MARK'
    good = _networks_snapshot(tmp_path / 'good.pkl', dict(ema=net), mark, _networks_edm_tree(net))
    data = good.read_bytes()
    (tmp_path / 'cut.pkl').write_bytes(data[: len(data) // 2])
    assert 'truncated or corrupt' in _networks_refused(tmp_path / 'cut.pkl')
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle at all')
    assert 'truncated or corrupt' in _networks_refused(tmp_path / 'junk.pkl')
    evil = _networks_snapshot(tmp_path / 'evil.pkl', dict(ema=net, extra=_NetworksEvil()), mark,
                              _networks_edm_tree(net))
    assert 'system' in _networks_refused(evil)  # os.system is pickled as posix.system / nt.system
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([1, 2, 3]))
    assert "'ema'" in _networks_refused(tmp_path / 'list.pkl')
    assert not mark.exists()


# --------------------------------------------------------------------------------------------------------------
# Phase I: pretrain.py (Algorithm 2)


def test_ambient_loss_learns_clean_posterior_mean(tmp_path):
    """Gaussian data x0 ~ N(0, s0^2 I): E[x0|x_t] = s0^2/(s0^2+sigma^2) x_t, E[y|x_t] = (s0^2+sn^2)/(s0^2+sn^2+sigma^2) x_t.
    A briefly trained toy denoiser must approach the first under Eq. (3), reweighted ('ambient-x0': the weight
    changes, the minimiser does not) or not, and the second under Eq. (1)."""
    s0, sn = 0.7, 0.5
    g = np.random.default_rng(0)
    np.save(tmp_path / 'gauss.npy', (g.normal(size=(20000, 2)) * s0).astype(np.float32))
    errs = {}
    for loss in ('ambient', 'ambient-x0', 'standard'):
        out = tmp_path / loss
        pretrain.main(['--data', str(tmp_path / 'gauss.npy'), '--sigma', str(sn), '--loss', loss, '--preset', 'toy',
                       '--kimg', '400', '--batch', '512', '--lr', '2e-3', '--warmup', '20', '--ema', '10',
                       '--outdir', str(out), '--device', 'cpu'])
        net, ck = sample.load_net(str(out / 'latest.pt'), 'cpu')
        s = ck['config']['data_scale']                                  # the net works in model units, x / s
        for sigma in (0.6, 1.0, 2.0):
            x_t = torch.from_numpy(g.normal(size=(4000, 2)).astype(np.float32)) * float(np.sqrt(s0**2 + sigma**2))
            with torch.no_grad():
                d = s * net(x_t / s, torch.full((4000,), sigma / s))
            clean = s0**2 / (s0**2 + sigma**2) * x_t
            noisy = (s0**2 + sn**2) / (s0**2 + sn**2 + sigma**2) * x_t
            errs[loss, sigma] = ((d - clean).pow(2).mean().sqrt().item(), (d - noisy).pow(2).mean().sqrt().item())
    print(errs)
    for sigma in (0.6, 1.0, 2.0):
        for loss in ('ambient', 'ambient-x0'):
            to_clean, to_noisy = errs[loss, sigma]
            assert to_clean < 0.35 * to_noisy, (loss, sigma, errs)
        to_clean, to_noisy = errs['standard', sigma]
        assert to_noisy < 0.35 * to_clean, (sigma, errs)


def test_ambient_x0_weighs_ds_own_error_by_lambda_and_draws_sigma_above_sigma_n():
    """'ambient-x0' is Eq. (3) with D's own error weighted by lambda(sigma), capped at 25x near sigma_n: with x_t = y =
    x0 (eps = 0) and D = x0 + delta the Tweedie residual is (1 - sn^2/sigma^2) delta, so Eq. (3) gives lambda
    (1 - sn^2/sigma^2)^2 delta^2 and 'ambient-x0' lambda delta^2. Its noise levels are the log-normal above sigma_n
    (none clamped to it; the median is the conditional one), where 'ambient' clamps 37% of them at sigma_n = 0.2."""
    sn, delta = 0.2, 0.3
    sigma = torch.tensor([0.21, 0.22, 0.25, 0.3, 0.5, 1.0, 3.0])
    y = torch.zeros(len(sigma), 2)
    net = lambda x, s, labels: x + delta
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    shrink = 1 - sn ** 2 / sigma ** 2
    for loss, want in (('ambient', lam * shrink ** 2 * delta ** 2),
                       ('ambient-x0', lam * delta ** 2 * torch.where(shrink < 0.2, 25 * shrink ** 2, 1))):
        got = pretrain.denoising_loss(net, y, sigma, torch.zeros_like(y), sn, loss)[:, 0]
        assert torch.allclose(got, want, rtol=1e-5), (loss, got, want)
    draws = {loss: pretrain.sample_sigma(100000, sn, loss, torch.Generator().manual_seed(0))
             for loss in ('ambient', 'ambient-x0', 'standard')}
    assert (draws['standard'] < sn).float().mean() == pytest.approx(0.367, abs=0.01)
    assert (draws['ambient'] == sn).float().mean() == pytest.approx(0.367, abs=0.01)
    x0 = draws['ambient-x0']
    assert x0.dtype == torch.float32 and x0.isfinite().all() and (x0 > sn).all()
    lo = 0.5 * math.erfc((pretrain.P_MEAN - math.log(sn)) / (pretrain.P_STD * math.sqrt(2)))
    median = math.exp(pretrain.P_MEAN + pretrain.P_STD * scipy.stats.norm.ppf((1 + lo) / 2))
    assert x0.median().item() == pytest.approx(median, rel=0.01)
    assert pretrain.sample_sigma(10, 0.0, 'ambient-x0', torch.Generator()).min() > 0     # sigma_n = 0: plain EDM
    above = {loss: pretrain.sample_sigma(100000, sn, loss, torch.Generator().manual_seed(0), above=True)
             for loss in ('ambient', 'standard')}                     # the tiny recipe's fake net: 'ambient', above
    assert torch.equal(above['ambient'], x0) and torch.equal(above['standard'], draws['standard'])
    assert pretrain.sample_sigma(10, 1e6, 'ambient-x0', torch.Generator()).isfinite().all()   # no inf at the tail


_TOY = ['--data', 'toy', '--sigma', '0.2', '--batch', '64', '--lr', '2e-3', '--warmup', '0.2', '--ema', '0.5',
        '--tick', '0.5', '--device', 'cpu']


def test_pretrain_bad_input_ends_in_one_clear_line(tmp_path):
    run = lambda *a: pretrain.main([*_TOY, '--kimg', '0.1', '--outdir', str(tmp_path / 'o'), *a])
    for args, msg in [(['--data', str(tmp_path / 'missing')], 'no such file'),
                      (['--sigma', '-0.1'], 'must be >= 0'),
                      (['--sigma', 'abc'], 'not a number'),
                      (['--batch', '60', '--batch-gpu', '8'], 'not divisible'),
                      (['--preset', 'huge'], 'unknown'),
                      (['--preset', 'tiny'], 'is for images'),
                      (['--resume'], 'does not exist'),
                      (['--lr', '-1'], r'--lr -1.0: must be > 0'), (['--augment', '2'], r'--augment 2.0: must be in \[0, 1\]'),
                      (['--ema', 'nan'], r'--ema nan: must be > 0 \(a finite number\)'),
                      (['--seed', '-1'], '--seed -1: must be >= 0')]:
        with pytest.raises(SystemExit, match=msg):
            run(*args)
    run('--kimg', '0.128', '--snap', '0.128')                    # a finished run of the toy architecture ...
    with pytest.raises(SystemExit, match=r'o holds a run \(latest.pt\); add --resume to continue it'):
        run('--kimg', '0.064')                                   # ... that a fresh start into its folder leaves alone
    assert networks.load_checkpoint(str(tmp_path / 'o' / 'latest.pt'))['kimg'] == 0.128
    with pytest.raises(SystemExit, match='another architecture'):
        pretrain.main([*_TOY, '--kimg', '0.2', '--outdir', str(tmp_path / 'o'), '--resume', '--dropout', '0.1'])
    _one_line_error(_run('pretrain.py', '--data', 'toy', '--sigma', '-1', cwd=tmp_path), '--sigma')


def test_sizes_the_unet_cannot_halve_are_refused_and_the_tiny_preset_scores_pixels_at_any_size(tmp_path, capsys):
    for size, flags, msg in [(9, ['--preset', 'tiny'], '9px images; --preset tiny needs a multiple of 2 px'),
                             (18, ['--preset', 'cifar10'], '18px images; --preset cifar10 needs a multiple of 4 px'),
                             (9, [], '9x9 images have no default preset; pass --preset tiny')]:
        np.save(tmp_path / f'{size}.npy', np.zeros((4, size, size, 3), np.uint8))
        with pytest.raises(SystemExit, match=msg):           # before, 9 px crashed in the U-Net's skip connections
            pretrain.main(['--data', str(tmp_path / f'{size}.npy'), *flags, '--dry-run'])
    np.save(tmp_path / 'gray.npy', np.zeros((4, 20, 20, 1), np.uint8))   # 20 px grey on the CPU preset
    pretrain.main(['--data', str(tmp_path / 'gray.npy'), '--preset', 'tiny', '--kimg', '0.008', '--batch', '4',
                   '--outdir', str(tmp_path / 't'), '--device', 'cpu'])
    capsys.readouterr()
    distill.main(['--teacher', str(tmp_path / 't' / 'latest.pt'), '--data', str(tmp_path / 'gray.npy'), '--dry-run'])
    cfg = json.loads(capsys.readouterr().out)['config']
    assert cfg['preset'] == 'tiny' and cfg['features'] == 'pixel'    # Proximal FD needs no Inception weights


# --------------------------------------------------------------------------------------------------------------
# Phase II: distill.py (Algorithm 1)


@pytest.fixture(scope='module')
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    pretrain.main([*_TOY, '--kimg', '3', '--snap', '3', '--outdir', str(out)])
    return str(out / 'latest.pt')


_DIST = ['--data', 'toy', '--batch', '32', '--tick', '0.128', '--fid-num', '200', '--device', 'cpu']


def test_distill_bad_input_ends_in_one_clear_line(tmp_path, toy_teacher):
    _one_line_error(_run('distill.py', '--sigma', '0.2', cwd=tmp_path),
                    r'no teacher at .*python pretrain\.py --data cifar10 --sigma 0\.2')
    (tmp_path / 'junk.pt').write_bytes(b'\x00' * 10)
    _one_line_error(_run('distill.py', '--teacher', str(tmp_path / 'junk.pt'), cwd=tmp_path), 'junk.pt')
    gen = _tiny_ckpt(tmp_path / 'g.pt', 'generator', points=True)
    _one_line_error(_run('distill.py', '--teacher', gen, cwd=tmp_path), 'generator checkpoint')
    for args, msg in [(['--sigma', '-0.5'], 'must be >= 0'), (['--method', 'gan'], 'unknown'),
                      (['--loss', 'standard'], 'force-loss'), (['--batch', '30', '--batch-gpu', '4'], 'not divisible'),
                      (['--lr', '-1'], '--lr -1.0: must be > 0'), (['--fid-num', '1'], '--fid-num 1: must be 0 or >= 2'),
                      (['--gbeta1', '1'], r'--gbeta1 1.0: must be in \[0, 1\)'), (['--alpha', 'nan'], '--alpha nan'),
                      (['--sigma-init', '0'], '--sigma-init 0.0: must be > 0'),
                      (['--fake-steps', '0'], '--fake-steps 0: must be > 0'),
                      (['--glr-end', '1.5'], r'--glr-end 1.5: must be in \[0, 1\]'),
                      (['--fake-sigma', 'clamp'], "only --loss ambient clamps sigma .this run's loss is ambient-x0"),
                      (['--seed', '-2'], '--seed -2: must be >= 0')]:
        with pytest.raises(SystemExit, match=msg):
            distill.main(['--teacher', toy_teacher, '--data', 'toy', '--fid-num', '0', '--kimg', '0.064', '--outdir',
                          str(tmp_path / 'o'), *args])
    run = [*_DIST, '--teacher', toy_teacher, '--fid-num', '0', '--snap', '0.064', '--outdir', str(tmp_path / 'r')]
    distill.main([*run, '--kimg', '0.064'])
    distill.main([*run, '--kimg', '0.128', '--lr', '3e-5', '--gbeta1', '0.5', '--resume'])   # new flags take hold
    opts = torch.load(tmp_path / 'r' / 'latest.pt', weights_only=True)['state']
    assert opts['opt_f']['param_groups'][0]['lr'] == 3e-5 and opts['opt_g']['param_groups'][0]['betas'][0] == 0.5
    with pytest.raises(SystemExit, match='that run used sigma_init=0.5'):     # G's input scale is part of G
        distill.main([*run, '--kimg', '0.128', '--sigma-init', '1.0', '--resume'])
    with pytest.raises(SystemExit, match=r'r holds a run \(latest.pt\); add --resume'):   # never started over
        distill.main([*run, '--kimg', '0.064'])
    other = torch.load(toy_teacher, weights_only=True)        # the same teacher trained on: other weights
    next(iter(other['ema'].values())).add_(1e-3)
    networks.save_checkpoint(tmp_path / 'other.pt', other)
    with pytest.raises(SystemExit, match='that run used teacher_sha256=.*; use its flags'):
        distill.main([*run, '--kimg', '0.128', '--teacher', str(tmp_path / 'other.pt'), '--resume'])
    old = torch.load(tmp_path / 'r' / 'latest.pt', weights_only=True)   # a run from before the teacher was recorded
    del old['config']['teacher_sha256']
    networks.save_checkpoint(tmp_path / 'r' / 'latest.pt', old)
    distill.main([*run, '--kimg', '0.192', '--resume'])                 # resumes: what was not recorded is not checked
    np.save(tmp_path / 'other.npy', np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32))
    with pytest.raises(SystemExit, match=r'other.npy: not the noisy set the teacher trained on \(its --data: toy\)'):
        distill.main(['--teacher', toy_teacher, '--data', str(tmp_path / 'other.npy'), '--fid-num', '100', '--kimg',
                      '0.064', '--outdir', str(tmp_path / 'p')])                # Proximal FID would score against it


def test_points_of_any_spread_and_place_train_the_same_nets_in_model_units(tmp_path):
    """Points become (x - shift) / scale, sigma / scale with them (the recipe's noise levels are absolute): the toy set
    4x larger at 4x the noise trains the very teacher and generator the toy set does, Proximal FD included, and
    sample.py writes the samples back 4x larger; moved 12 away, the same nets up to round-off, the samples moved back."""
    x, runs = pretrain.toy_points(4000, 0), {}
    for k, move, sigma in ((1, 0, '0.2'), (4, 0, '0.8'), (4, 12, '0.8')):
        np.save(tmp_path / f'pts{k}{move}.npy', k * x + move)
        data, out = ['--data', str(tmp_path / f'pts{k}{move}.npy'), '--device', 'cpu'], tmp_path / f'run{k}{move}'
        pretrain.main([*data, '--sigma', sigma, *_TOY[4:-2], '--kimg', '1', '--outdir', str(out / 't')])
        distill.main([*data, '--teacher', str(out / 't' / 'latest.pt'), '--batch', '32', '--kimg', '0.064',
                      '--fid-num', '256', '--outdir', str(out / 'g')])
        sample.main(['--net', str(out / 'g' / 'latest.pt'), '--seeds', '0-99', '--out', str(out / 's.npz')])
        runs[k, move] = [torch.load(out / d / 'latest.pt', weights_only=True) for d in 'tg'] + [
            np.load(out / 's.npz')['samples']]
    (t1, g1, s1), (t4, g4, s4), (tm, gm, sm) = runs[1, 0], runs[4, 0], runs[4, 12]
    assert [(t['config']['data_scale'], t['config']['data_shift'], t['sigma_n']) for t in (t1, t4, tm)] == [
        (1, [0, 0], 0.2), (4, [0, 0], 0.2), (4, [12, 12], 0.2)]
    for a, b in ((t1, t4), (g1, g4)):
        assert all(torch.equal(a['ema'][n], b['ema'][n]) for n in a['ema'])
    assert g4['metrics']['proximal_fd'] == g1['metrics']['proximal_fd']
    assert np.array_equal(s4, 4 * s1) and not np.array_equal(s4, s1)
    assert max(float((tm['ema'][n] - t1['ema'][n]).abs().max()) for n in t1['ema']) < 1e-4   # measured: 2e-6
    assert np.abs(sm - (4 * s1 + 12)).max() < 1e-3
    assert abs(gm['metrics']['proximal_fd'] / g1['metrics']['proximal_fd'] - 1) < 1e-4
    assert pretrain.noisy_dataset('toy', 0.2)[1]['scale'] == 1                    # the built-in set as it was


def test_distill_every_method_and_loss_runs_through_main(tmp_path, toy_teacher):
    """Short runs of D-DMD, D-SDS and the standard loss (with a standard-loss teacher) through distill.main."""
    std = tmp_path / 'std'
    pretrain.main([*_TOY, '--kimg', '1', '--loss', 'standard', '--outdir', str(std)])
    teacher = {'ambient-x0': torch.load(toy_teacher, weights_only=True),        # the toy preset's loss
               'standard': torch.load(std / 'latest.pt', weights_only=True)}
    for method, loss in (('dmd', 'ambient-x0'), ('sds', 'ambient-x0'), ('sid', 'standard')):
        out = tmp_path / f'{method}-{loss}'
        distill.main([*_DIST, '--teacher', toy_teacher if loss == 'ambient-x0' else str(std / 'latest.pt'),
                      '--method', method, '--kimg', '0.16', '--snap', '0.16', '--fid-num', '0', '--outdir', str(out)])
        ck = torch.load(out / 'latest.pt', weights_only=True)
        t = teacher[loss]['ema']
        assert (ck['method'], ck['loss'], ck['state']['step']) == (method, loss, 5)
        assert not torch.equal(ck['state']['G']['model.out.weight'], t['model.out.weight'])      # G moved
        fake_moved = not all(torch.equal(ck['state']['fake'][k], t[k]) for k in t)
        assert fake_moved == (method != 'sds')                   # D-SDS trains no fake net
        stats = [json.loads(l) for l in open(out / 'stats.jsonl')]
        assert all(math.isfinite(s['loss_gen']) and s['nonfinite'] == 0 for s in stats)


def test_fake_score_step_draws_from_an_eval_mode_generator(tmp_path, toy_teacher, monkeypatch):
    """As SiD: G serves the fake net's samples in eval mode (no dropout) and trains in train mode; the fake net
    trains in its step and is frozen (eval) in the generator's."""
    seen = []
    real_fake, real_gen = distill.fake_score_step, distill.generator_step
    monkeypatch.setattr(distill, 'fake_score_step', lambda G, fake, *a: seen.append(('fake', G.training, fake.training))
                        or real_fake(G, fake, *a))
    monkeypatch.setattr(distill, 'generator_step', lambda G, teacher, fake, *a: seen.append(
        ('gen', G.training, fake.training)) or real_gen(G, teacher, fake, *a))
    distill.main([*_DIST, '--teacher', toy_teacher, '--dropout', '0.2', '--kimg', '0.064', '--fid-num', '0',
                  '--outdir', str(tmp_path / 'o')])
    assert seen == ([('fake', False, True)] * distill.RECIPES['toy']['fake_steps'] + [('gen', True, False)]) * 2


def test_fake_steps_take_that_many_fake_score_steps_per_generator_step(tmp_path, toy_teacher, monkeypatch):
    """--fake-steps K: each iteration takes K fake-score steps, each on fresh draws, then one generator step (the
    fake net's Adam counts K steps per generator step); K = 1 is SiD's one-to-one, tiny's and toy's K = 2. The
    generator's noise levels come from the recipe's tmax (toy: 450) unless --tmax is given."""
    seen, tmax = [], []
    real_fake, real_gen, real_sigmas = distill.fake_score_step, distill.generator_step, distill.sid_sigmas
    monkeypatch.setattr(distill, 'fake_score_step', lambda G, fake, z, *a: seen.append(('fake', z[0, 0].item())) or
                        real_fake(G, fake, z, *a))
    monkeypatch.setattr(distill, 'generator_step', lambda *a: seen.append(('gen',)) or real_gen(*a))
    monkeypatch.setattr(distill, 'sid_sigmas', lambda n, g, t, *a: tmax.append(t) or real_sigmas(n, g, t, *a))
    for k, flags in ((1, ['--fake-steps', '1', '--tmax', '800']), (2, []), (3, ['--fake-steps', '3'])):
        seen.clear()
        tmax.clear()
        out = tmp_path / f'k{k}'
        distill.main([*_DIST, '--teacher', toy_teacher, '--kimg', '0.064', '--fid-num', '0', '--outdir', str(out),
                      *flags])
        assert [s[0] for s in seen] == (['fake'] * k + ['gen']) * 2
        assert tmax == [800 if k == 1 else 450] * 2
        assert len({s[1] for s in seen if s[0] == 'fake'}) == 2 * k               # fresh z for every fake step
        ck = torch.load(out / 'latest.pt', weights_only=True)
        assert ck['config']['fake_steps'] == k and ck['state']['step'] == 2
        assert {int(v['step']) for v in ck['state']['opt_f']['state'].values()} == {2 * k}
        assert {int(v['step']) for v in ck['state']['opt_g']['state'].values()} == {2}


def test_glr_end_lowers_the_generators_lr_on_a_cosine_and_leaves_the_fake_nets(tmp_path, toy_teacher, monkeypatch):
    """--glr-end f (not in the paper; tiny's recipe): generator step s of S runs at glr (f + (1 - f) (1 + cos(pi s /
    S)) / 2), from glr down towards f glr; the fake net's lr stays; f = 1 (SiD's recipes) is a constant glr."""
    seen = []
    real = distill.optimize
    monkeypatch.setattr(distill, 'optimize', lambda opt, *a: seen.append(opt.param_groups[0]['lr']) or real(opt, *a))
    for end in (0.25, 1.0):
        seen.clear()
        distill.main([*_DIST, '--teacher', toy_teacher, '--kimg', '0.128', '--fid-num', '0', '--lr', '1e-4',
                      '--glr', '2e-4', '--glr-end', str(end), '--fake-steps', '1',
                      '--outdir', str(tmp_path / f'e{end}')])
        want = [2e-4 * (end + (1 - end) * (1 + math.cos(math.pi * s / 4)) / 2) for s in range(4)]
        assert seen[0::2] == [1e-4] * 4 and seen[1::2] == pytest.approx(want, rel=1e-9), seen
    assert want == [2e-4] * 4
    assert [k for k, r in distill.RECIPES.items() if r['glr_end'] != 1] == ['tiny']   # the paper's presets: SiD's


def test_the_fake_net_trains_with_the_teachers_loss(tmp_path, toy_teacher, monkeypatch):
    """Alg. 1, line 9: the fake net learns with the teacher's own loss, here the toy preset's 'ambient-x0' (its weight
    and its noise levels above sigma_n), on the corrupted generator samples. The tiny recipe keeps a teacher's
    'ambient' but draws the fake net's noise levels above sigma_n (fake_sigma 'above'); --fake-sigma clamp undoes it."""
    drawn = []
    monkeypatch.setattr(distill, 'sample_sigma', lambda n, sn, loss, g, above=False: drawn.append((loss, above)) or
                        pretrain.sample_sigma(n, sn, loss, g, above))
    distill.main([*_DIST, '--teacher', toy_teacher, '--kimg', '0.064', '--fid-num', '0', '--outdir', str(tmp_path)])
    assert drawn == [('ambient-x0', False)] * 2 * distill.RECIPES['toy']['fake_steps']   # 2 iterations
    tiny = _tiny_ckpt(tmp_path / 'tiny.pt')
    for flags, above in (([], True), (['--fake-sigma', 'clamp'], False)):
        drawn.clear()
        distill.main(['--teacher', tiny, '--data', 'shapes', '--kimg', '0.064', '--fid-num', '0', *flags,
                      '--outdir', str(tmp_path / f'tiny{above}')])
        assert drawn == [('ambient', above)] * 4            # two steps of the tiny recipe's two fake-score steps
    torch.manual_seed(0)
    net = networks.build_net(networks.PRESETS['toy']['net'])
    z, eps_n, eps = (torch.randn(64, 2, generator=torch.Generator().manual_seed(k)) for k in range(3))
    sigma, c = torch.full((64,), 0.25), dict(sigma_init=0.5, sigma_n=0.2, loss='ambient-x0')
    got = distill.fake_score_step(net, net, z, eps_n, sigma, eps, None, None, c)
    with torch.no_grad():
        y_g = sample.one_step(net, z, 0.5) + 0.2 * eps_n
        assert torch.allclose(got, pretrain.denoising_loss(net, y_g, sigma, eps, 0.2, 'ambient-x0'))
        assert not torch.allclose(got, pretrain.denoising_loss(net, y_g, sigma, eps, 0.2, 'ambient'))


def test_fake_score_step_augments_the_corrupted_samples_like_the_teacher():
    """With augmentation, the fake net sees apply_augment(x_g + sigma_n eps_n) with its labels, as the teacher saw
    augmented noisy data; and distill takes the teacher's augmentation probability by default."""
    torch.manual_seed(0)
    net = networks.build_net(dict(networks.PRESETS['tiny']['net'], img_resolution=8, attn_resolutions=[4]))
    seen = _Counting(net)
    n, g = 6, torch.Generator().manual_seed(1)
    z, eps_n, eps = (torch.randn(n, 3, 8, 8, generator=g) for _ in range(3))
    sigma = torch.full((n,), 0.2)                                 # = sigma_n: x_t is the augmented y_g
    choices, labels = pretrain.augment_choices(n, 1.0, 8, g)
    c = dict(sigma_init=2.5, sigma_n=0.2, loss='ambient')
    distill.fake_score_step(net, seen, z, eps_n, sigma, eps, choices, labels, c)
    with torch.no_grad():
        y_g = sample.one_step(net, z, 2.5) + 0.2 * eps_n
    aug = pretrain.apply_augment(y_g, choices)
    assert torch.allclose(seen.inputs[0], aug, atol=1e-3) and torch.equal(seen.labels[0], labels)
    assert not torch.allclose(seen.inputs[0], y_g, atol=1e-3)


def test_proximal_fid_under_a_sigma_override_scores_against_the_teachers_noisy_set(tmp_path, toy_teacher,
                                                                                    monkeypatch):
    """--sigma 0.3 with a teacher trained at sigma_n 0.2 (the paper's mis-specified noise study): the reference is the
    teacher's own noisy set (0.2, its seed), never clean data redrawn at 0.3; the samples get the assumed 0.3."""
    data_calls, noise_calls = [], []
    real_noisy, real_make = fid.noisy_dataset, fid.make_noisy
    monkeypatch.setattr(fid, 'noisy_dataset', lambda data, sigma, seed=0, *a: data_calls.append((data, sigma, seed))
                        or real_noisy(data, sigma, seed, *a))
    monkeypatch.setattr(fid, 'make_noisy', lambda x, sigma, *a, **k: noise_calls.append(sigma) or real_make(x, sigma, *a, **k))
    distill.main([*_DIST, '--teacher', toy_teacher, '--sigma', '0.3', '--kimg', '0.064', '--snap', '0.064',
                  '--outdir', str(tmp_path / 'o')])
    assert data_calls == [('toy', 0.2, 0)] and set(noise_calls) == {0.3}


# --------------------------------------------------------------------------------------------------------------
# Both training stages: N processes take the steps of one; a killed run resumes exactly


def _stage_args(stage, teacher):
    """A short run of each training stage with dropout on (so that its seeding is part of what must agree)."""
    if stage == 'pretrain':
        return [*_TOY, '--dropout', '0.1']
    return [*_DIST, '--teacher', teacher, '--dropout', '0.1']


_STAGE = {'pretrain': dict(kimg=['--kimg', '1.5', '--snap', '1.5'], long=['--kimg', '3', '--snap', '0.5'], steps=47,
                           state='net', batch=64),
          'distill': dict(kimg=['--kimg', '0.32', '--snap', '0.32'], long=['--kimg', '1.6', '--snap', '0.32'], steps=50,
                          state='fake', batch=32)}


@pytest.mark.parametrize('stage', ['pretrain', 'distill'])
def test_torchrun_two_processes_take_the_steps_of_one(tmp_path, stage, toy_teacher):
    """2 processes with half the batch each == 1 process with the same --batch and --batch-gpu, dropout included."""
    s, half = _STAGE[stage], str(_STAGE[stage]['batch'] // 2)
    args = [f'{stage}.py', *_stage_args(stage, toy_teacher), *s['kimg']]
    a = _run(*args, '--batch-gpu', half, '--outdir', tmp_path / 'one', cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = _run(*args, '--outdir', tmp_path / 'two', cwd=tmp_path, nproc=2)
    assert b.returncode == 0, b.stderr
    ca, cb = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('one', 'two'))
    run = json.load(open(tmp_path / 'two' / 'config.json'))
    assert (run['world'], run['batch_gpu']) == (2, int(half))                   # the work was split ...
    ticks = [json.loads(l) for l in open(tmp_path / 'two' / 'stats.jsonl')]
    assert sum(t['images'] for t in ticks) == ca['state']['step'] * s['batch']  # ... and each sample done once
    start = torch.load(toy_teacher, weights_only=True)['ema'] if stage == 'distill' else _init_toy_state()
    assert not torch.equal(ca['state'][s['state']]['model.out.weight'], start['model.out.weight'])   # it trained
    _same_training(ca['ema'], cb['ema'], start)
    _same_training(ca['state'][s['state']], cb['state'][s['state']], start)
    if stage == 'pretrain':
        assert ca['config']['noisy_sha256'] == cb['config']['noisy_sha256']   # the same noisy set on all ranks
    else:
        want = ('generator', distill.RECIPES['toy']['sigma_init'], 0.2)
        assert (ca['kind'], ca['sigma_init'], ca['sigma_n']) == want
        teacher = torch.load(toy_teacher, weights_only=True)
        assert ca['teacher'] == teacher['net'] and ca['loss'] == teacher['loss'] == 'ambient-x0'   # the toy default
        assert os.path.isfile(tmp_path / 'one' / 'best.pt') and 'proximal_fd' in ca['metrics']


def _init_toy_state():
    torch.manual_seed(0)
    return networks.build_net(dict(networks.PRESETS['toy']['net'], dropout=0.1)).state_dict()


def _kill_after_snapshot(cmd, cwd, snapshot_path, timeout=300):
    """Start a run, SIGKILL it as soon as a snapshot exists (mid-training), return what was on disk."""
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.time()
    while not os.path.exists(snapshot_path) and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert proc.poll() is None, 'the run finished before it could be killed: ' + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(snapshot_path, weights_only=True)        # what was on disk is a whole checkpoint


@pytest.mark.parametrize('stage', ['pretrain', 'distill'])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, stage, toy_teacher):
    s = _STAGE[stage]
    args = [f'{stage}.py', *_stage_args(stage, toy_teacher), *s['long']]
    ref = _run(*args, '--outdir', tmp_path / 'ref', cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    part = _kill_after_snapshot([os.path.join(ROOT, args[0]), *args[1:], '--outdir', tmp_path / 'run'], tmp_path,
                                tmp_path / 'run' / 'latest.pt')
    assert part['state']['step'] < s['steps']
    with open(tmp_path / 'run' / 'stats.jsonl', 'a') as f:   # as if killed between snapshots: a later tick logged,
        f.write(json.dumps(dict(kimg=1e9)) + '\n{"kimg": 1')  # and the next one cut off mid-line
    if stage == 'distill':                                     # ... or inside one, after its metrics, before latest.pt
        with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(dict(kimg=1e9, proximal_fd=0.0)) + '\n')
    res = _run(*args, '--outdir', tmp_path / 'run', '--resume', cwd=tmp_path)
    assert res.returncode == 0 and 'resuming' in res.stdout, res.stderr
    a, b = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('ref', 'run'))
    assert a['state']['step'] == b['state']['step'] == s['steps']
    for key in ('net', 'opt') if stage == 'pretrain' else ('G', 'fake', 'opt_g', 'opt_f'):
        assert key in b['state']
    _state = lambda c: c['state']['net' if stage == 'pretrain' else 'G']
    assert all(torch.allclose(a['ema'][k], b['ema'][k], atol=1e-6, rtol=1e-6) for k in a['ema'])
    assert all(torch.allclose(_state(a)[k], _state(b)[k], atol=1e-6, rtol=1e-6) for k in _state(a))
    lines = lambda run, log='stats.jsonl': [json.loads(t) for t in open(tmp_path / run / log)]
    assert [t['kimg'] for t in lines('run')] == [t['kimg'] for t in lines('ref')]   # each tick once, in order
    if stage == 'distill':                     # each snapshot's metrics once, and best.pt the lowest of them
        run, ref = lines('run', 'metrics.jsonl'), lines('ref', 'metrics.jsonl')
        assert [m['kimg'] for m in run] == [m['kimg'] for m in ref]
        assert [m['proximal_fd'] for m in run] == pytest.approx([m['proximal_fd'] for m in ref], rel=1e-4)
        best = min(run, key=lambda m: m['proximal_fd'])
        assert torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)['kimg'] == best['kimg']


# --------------------------------------------------------------------------------------------------------------
# Sampling: sample.py (Algorithm 3)


def _tiny_ckpt(path, kind='teacher', sigma_n=0.2, points=False):
    """A checkpoint with random weights, in the format the stages write."""
    torch.manual_seed(0)
    cfg = dict(networks.PRESETS['toy' if points else 'tiny']['net'])
    if not points:
        cfg.update(img_resolution=8, model_channels=16, attn_resolutions=[4])
    net = networks.build_net(cfg)
    ck = dict(format='dsd-1', kind=kind, net=net.config, ema=net.state_dict(), sigma_n=sigma_n, loss='ambient',
              data='shapes', kimg=0.0)
    if kind == 'generator':
        ck.update(sigma_init=2.5, teacher=net.config)
    networks.save_checkpoint(str(path), ck)
    return str(path)


class _Counting(torch.nn.Module):
    """Wraps a denoiser and records the noise level, input, augment labels and output of every evaluation."""
    def __init__(self, net):
        super().__init__()
        self.net, self.sigmas, self.inputs, self.labels, self.outputs = net, [], [], [], []

    def forward(self, x, sigma, augment_labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        self.inputs.append(x.detach().clone())
        self.labels.append(augment_labels)
        self.outputs.append(self.net(x, sigma, augment_labels))
        return self.outputs[-1]


def test_seeds_give_the_same_images_at_any_batch_size(tmp_path):
    net, ck = sample.load_net(_tiny_ckpt(tmp_path / 't.pt'), 'cpu')
    seeds = list(range(10, 17))
    for mode in ('truncated', 'full'):
        a = torch.cat([x for _, x in sample.generate(net, ck, seeds, 1, 'cpu', mode, steps=4)])
        b = torch.cat([x for _, x in sample.generate(net, ck, seeds, 7, 'cpu', mode, steps=4)])
        assert torch.allclose(a, b, atol=1e-5)
    gnet, gck = sample.load_net(_tiny_ckpt(tmp_path / 'g.pt', 'generator'), 'cpu')
    a = torch.cat([x for _, x in sample.generate(gnet, gck, seeds, 1, 'cpu')])
    b = torch.cat([x for _, x in sample.generate(gnet, gck, seeds[3:], 7, 'cpu')])
    assert torch.allclose(a[3:], b, atol=1e-5)


def test_truncated_sampling_returns_the_posterior_mean_at_sigma_n_and_one_step_evaluates_once(tmp_path):
    net, ck = sample.load_net(_tiny_ckpt(tmp_path / 't.pt', sigma_n=0.2), 'cpu')
    z = sample.latents([0, 1], (3, 8, 8))
    full = _Counting(net)
    sample.heun_sampler(full, z, steps=18)
    assert len(full.sigmas) == 35 and min(full.sigmas) == pytest.approx(0.002, rel=1e-4)   # EDM: 2N-1 evals
    trunc = _Counting(net)
    x = sample.heun_sampler(trunc, z, steps=18, sigma_stop=0.2)
    levels = sample.karras_sigmas(18).tolist()
    k = next(i for i in range(18) if levels[i + 1] < 0.2)        # first step whose next level is below sigma_n
    assert trunc.sigmas[-1] == pytest.approx(levels[k], rel=1e-6) and min(trunc.sigmas) >= 0.2
    # the result is the denoised estimate D(x; sigma_k) at the last level reached
    assert len(trunc.sigmas) == 2 * k + 1
    assert torch.equal(x, trunc.outputs[-1])                     # ... the posterior mean, not the noisy state
    gnet, gck = sample.load_net(_tiny_ckpt(tmp_path / 'g.pt', 'generator'), 'cpu')
    one = _Counting(gnet)
    out = sample.one_step(one, z, gck['sigma_init'])
    assert one.sigmas == [2.5] and out.shape == z.shape
    assert torch.allclose(out, gnet(z * 2.5, torch.full((2,), 2.5)))


def test_parse_seeds():
    assert sample.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
    for bad in ('5-2', 'a-b', '-3', '1,,2'):
        with pytest.raises(SystemExit, match='--seeds'):
            sample.parse_seeds(bad)


def test_sample_cli_writes_pngs_npz_and_refuses_bad_input(tmp_path):
    gen = _tiny_ckpt(tmp_path / 'g.pt', 'generator')
    r = _run('sample.py', '--net', gen, '--seeds', '998-1001', '--out', str(tmp_path / 'png'),
              '--grid', str(tmp_path / 'grid.png'), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'png')) == ['000000', '001000']
    assert os.path.isfile(tmp_path / 'png' / '001000' / '001001.png') and os.path.isfile(tmp_path / 'grid.png')
    r = _run('sample.py', '--net', gen, '--seeds', '0-4', '--out', str(tmp_path / 's.npz'), cwd=tmp_path)
    arr = np.load(tmp_path / 's.npz')['samples']
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 3)
    toy = _tiny_ckpt(tmp_path / 'p.pt', 'generator', points=True)
    _run('sample.py', '--net', toy, '--seeds', '0-9', '--out', str(tmp_path / 'p.npz'), cwd=tmp_path)
    pts = np.load(tmp_path / 'p.npz')['samples']
    assert pts.dtype == np.float32 and pts.shape == (10, 2)
    _one_line_error(_run('sample.py', '--net', toy, '--out', str(tmp_path / 'pts'), cwd=tmp_path), 'a FILE.npz')
    for out in (['--grid', str(tmp_path / 'g.txt')], ['--grid', str(tmp_path / 'no' / 'g.png')],
                ['--out', str(tmp_path / 's.png')], []):   # refused before sampling: nothing is written (or kept)
        _one_line_error(_run('sample.py', '--net', gen, *out, cwd=tmp_path), '--grid FILE.png .in a folder')
    assert not any(os.path.exists(p) for p in (tmp_path / 'g.txt', tmp_path / 'no', tmp_path / 's.png'))
    r = _run('sample.py', '--net', gen, '--seeds', '0-1', '--out', str(tmp_path / 'sigma0.2'), cwd=tmp_path)
    assert r.returncode == 0 and os.path.isfile(tmp_path / 'sigma0.2' / '000000' / '000001.png'), r.stderr
    _one_line_error(_run('sample.py', '--net', gen, '--seeds', '9-2', cwd=tmp_path), '--seeds')
    _one_line_error(_run('sample.py', '--net', gen, '--steps', '-3', cwd=tmp_path), '--steps -3: each must be >= 1')
    _one_line_error(_run('sample.py', '--net', str(tmp_path / 'nope.pt'), '--grid', 'g.png', cwd=tmp_path), 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    _one_line_error(_run('sample.py', '--net', str(tmp_path / 'junk.pt'), '--grid', 'g.png', cwd=tmp_path), 'junk.pt')
    other = torch.load(gen, weights_only=True)
    other['kind'] = 'optimizer'
    torch.save(other, tmp_path / 'other.pt')
    _one_line_error(_run('sample.py', '--net', str(tmp_path / 'other.pt'), '--grid', 'g.png', cwd=tmp_path),
                    'neither a teacher nor a generator')
    other = torch.load(gen, weights_only=True)
    del other['sigma_init'], other['loss']                     # a damaged file is refused, not sampled from
    torch.save(other, tmp_path / 'other.pt')
    _one_line_error(_run('sample.py', '--net', str(tmp_path / 'other.pt'), '--grid', 'g.png', cwd=tmp_path),
                    r'other.pt: damaged \(no loss, sigma_init\)')
    other = torch.load(gen, weights_only=True)
    next(v for v in other['ema'].values() if v.is_floating_point()).view(-1)[0] = math.nan
    torch.save(other, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match=r'other.pt: damaged \(non-finite weights\)'):
        sample.main(['--net', str(tmp_path / 'other.pt'), '--grid', str(tmp_path / 'g.png')])


def test_grids_of_small_images_are_enlarged_to_be_seen():
    u8 = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    grid = np.asarray(sample.grid_image(u8))
    assert grid.shape == (2 * 64, 3 * 64, 3)                     # 3 x 2 grid, 16 px enlarged 4x (nearest)
    assert np.array_equal(grid[:64, 64:128], u8[1].repeat(4, 0).repeat(4, 1))
    assert np.asarray(sample.grid_image(np.zeros((4, 64, 64, 3), np.uint8))).shape == (128, 128, 3)   # 64 px: as is


# --------------------------------------------------------------------------------------------------------------
# FID, Proximal FID and the figures: fid.py


def _fid_random_weights(net, seed=0):
    # He-normal convs and non-trivial BN statistics: features stay O(1) through the whole network.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
    return net.eval()


def _fid_gaussian_feats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / d ** 0.5
    return rng.standard_normal((n, d)) @ a + shift


def _fid_bruteforce(mu1, s1, mu2, s2):
    # Tr sqrtm(S1 S2) = sum of sqrt of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix.
    w, v = scipy.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(scipy.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_fid_frechet_distance_values():
    m1, s1 = fid.stats_of(_fid_gaussian_feats(500, 16, 0))
    m2, s2 = fid.stats_of(_fid_gaussian_feats(500, 16, 1, shift=0.3))
    assert abs(fid.frechet_distance(m1, s1, m1, s1)) < 1e-8
    d12, d21 = fid.frechet_distance(m1, s1, m2, s2), fid.frechet_distance(m2, s2, m1, s1)
    assert d12 > 1 and abs(d12 - d21) < 1e-9 * d12
    assert abs(d12 - _fid_bruteforce(m1, s1, m2, s2)) < 1e-8 * d12
    # 1-d closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # stats match numpy's definitions (unbiased covariance) and are float64
    x = _fid_gaussian_feats(50, 4, 2).astype(np.float32)
    mu, sigma = fid.stats_of(x)
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(mu, x.mean(0), atol=1e-6) and np.allclose(sigma, np.cov(x.T), atol=1e-6)


def test_fid_frechet_distance_errors_and_singular():
    with pytest.raises(ValueError, match='at least 2'):
        fid.stats_of(np.zeros((1, 8)))
    with pytest.raises(ValueError, match='differ'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='differ'):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
    # fewer samples than dims: a warning, and still a finite non-negative distance
    with pytest.warns(UserWarning, match='singular'):
        m1, s1 = fid.stats_of(_fid_gaussian_feats(10, 32, 3))
    with pytest.warns(UserWarning):
        m2, s2 = fid.stats_of(_fid_gaussian_feats(10, 32, 4))
    d = fid.frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match='imaginary'):  # not a covariance at all
        fid.frechet_distance(np.zeros(2), np.array([[1.0, 0], [0, -1.0]]), np.zeros(2), np.eye(2))


# Layout of pt_inception-2015-12-05-6726825d.pth as pytorch-fid's FID Inception (torchvision's Inception3,
# 1008 classes, no aux head, patched blocks) builds it: sha256 of the sorted "key shape" lines.
_FID_KEYS = 566
_FID_PARAMS = 23885392
_FID_LAYOUT_SHA = '8cdd2faeb41211e1'  # computed from pytorch-fid's build, equal to ours


def test_fid_inception_state_dict_layout(tmp_path):
    sd = fid.InceptionV3().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(shapes) == _FID_KEYS
    assert sum(v.numel() for k, v in sd.items() if not k.endswith('num_batches_tracked')) == _FID_PARAMS
    for k, s in [('Conv2d_1a_3x3.conv.weight', (32, 3, 3, 3)), ('Conv2d_1a_3x3.bn.running_var', (32,)),
                 ('Conv2d_4a_3x3.conv.weight', (192, 80, 3, 3)),
                 ('Mixed_5b.branch_pool.conv.weight', (32, 192, 1, 1)),
                 ('Mixed_6a.branch3x3.conv.weight', (384, 288, 3, 3)),
                 ('Mixed_6b.branch7x7_2.conv.weight', (128, 128, 1, 7)),
                 ('Mixed_7a.branch7x7x3_4.conv.weight', (192, 192, 3, 3)),
                 ('Mixed_7c.branch3x3dbl_3b.conv.weight', (384, 384, 3, 1)),
                 ('Mixed_7c.branch_pool.conv.weight', (192, 2048, 1, 1)),
                 ('fc.weight', (1008, 2048)), ('fc.bias', (1008,))]:
        assert shapes[k] == s, k
    lines = '\n'.join(f'{k} {list(s)}' for k, s in sorted(shapes.items()))
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == _FID_LAYOUT_SHA
    # The loader takes files without BN's num_batches_tracked (old torch) and refuses other networks.
    old = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    torch.save(old, tmp_path / 'old.pth')
    assert isinstance(fid.load_inception(str(tmp_path / 'old.pth')), fid.InceptionV3)
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match='not the FID Inception'):
        fid.load_inception(str(tmp_path / 'bad.pth'))
    with pytest.raises(SystemExit, match='no such file'):  # an explicit path is never searched for or downloaded
        fid.load_inception(str(tmp_path / 'missing.pth'))


def test_fid_weights_search(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setenv('DSD_DATA', str(tmp_path / 'data'))
    with pytest.raises(SystemExit, match='not found in .*data or .*hub.*--inception PATH'):
        fid.find_weights(download=False)
    # the one download attempt: a wrong or broken file is refused and leaves nothing in the cache
    monkeypatch.setattr(fid.urllib.request, 'urlopen', lambda url, timeout: io.BytesIO(b'not the weights'))
    with pytest.raises(SystemExit, match='sha256 mismatch'):
        fid.find_weights()
    assert os.listdir(tmp_path / 'hub' / 'checkpoints') == []
    for d in ('hub/checkpoints', 'data'):  # $DSD_DATA first, then torch hub's cache
        os.makedirs(tmp_path / d, exist_ok=True)
        (tmp_path / d / fid.WEIGHTS_NAME).write_bytes(b'')
        assert fid.find_weights(download=False) == str(tmp_path / d / fid.WEIGHTS_NAME)


def test_fid_inception_features_shape_and_determinism():
    net = _fid_random_weights(fid.InceptionV3())
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x[1] = x[1, :, :, :1]  # a grey image stored as RGB
    f1 = fid.features(x, 2, 'cpu', net)
    f2 = fid.features(iter([x[:1], x[1:, :, :, :1]]), 1, 'cpu', net)  # other batching; grey as 1 channel
    assert f1.shape == (2, 2048) and f1.dtype == np.float32 and np.isfinite(f1).all()
    assert f1.std() > 1e-3 and np.abs(f1[0] - f1[1]).max() > 1e-4  # not degenerate
    assert np.allclose(f1, f2, rtol=1e-4, atol=1e-5 * np.abs(f1).max())
    with pytest.raises(ValueError, match='uint8 NHWC'):
        fid.features(x.astype(np.float32), 2, 'cpu', net)


def test_to_uint8():
    x = np.array([-2, -1, -0.999, 0, 0.5, 1, 3], np.float32).reshape(1, 1, 1, 7).repeat(3, 1)
    u = sample.to_uint8(x)
    assert u.shape == (1, 1, 7, 3) and u.dtype == np.uint8
    assert u[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert np.array_equal(sample.to_uint8(torch.from_numpy(x)), u)


def test_fid_stats_files(tmp_path):
    mu, sigma = fid.stats_of(_fid_gaussian_feats(40, 6, 5))
    p = str(tmp_path / 'sub' / 'ref')  # no .npz suffix: written exactly where asked
    fid.save_stats(p, mu, sigma, 'pixel', num=40)
    assert os.path.isfile(p)
    m2, s2 = fid.load_stats(p, 'pixel')
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma) and fid.stats_kind(p) == 'pixel'
    with np.load(p) as f:
        assert int(f['num']) == 40 and f['mu'].dtype == np.float64
    with pytest.raises(SystemExit, match='holds pixel stats'):
        fid.load_stats(p, 'inception')
    # EDM's / pytorch-fid's files: plain np.savez(mu=..., sigma=...), Inception stats
    edm = str(tmp_path / 'cifar10-32x32.npz')
    np.savez(edm, mu=mu.astype(np.float32), sigma=sigma)
    m3, s3 = fid.load_stats(edm)
    assert fid.stats_kind(edm) == 'inception' and np.allclose(m3, mu, atol=1e-6) and s3.dtype == np.float64
    np.savez(str(tmp_path / 'other.npz'), mean=mu)
    with pytest.raises(SystemExit, match='no mu/sigma'):
        fid.load_stats(str(tmp_path / 'other.npz'))
    np.savez(str(tmp_path / 'odd.npz'), mu=mu, sigma=sigma[:3])
    with pytest.raises(SystemExit, match='do not fit'):
        fid.load_stats(str(tmp_path / 'odd.npz'))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with pytest.raises(SystemExit, match='not a readable'):
        fid.load_stats(str(tmp_path / 'junk.npz'))
    with pytest.raises(SystemExit, match='no such file'):
        fid.load_stats(str(tmp_path / 'nope.npz'))


def _fid_fake_modules(monkeypatch, clean, sigma_n=0.2):
    """Stand-ins for what fid.py takes from pretrain / sample (the data, generation); records the calls. The
    generator 'replays' the data set: seed s gives clean item s."""
    calls, real_make_noisy = [], pretrain.make_noisy

    def make_noisy(x, sigma, seed=0, index=None, stream=0):
        calls.append(('make_noisy', sigma, seed, None if index is None else list(index), stream))
        return real_make_noisy(x, sigma, seed, index, stream)

    def generate(net, ckpt, seeds, batch, device, mode=None, steps=None):
        calls.append(('generate', list(seeds)))
        for i in range(0, len(seeds), batch):
            s = list(seeds[i:i + batch])
            yield s, torch.from_numpy(np.stack([clean[j % len(clean)] for j in s]))

    monkeypatch.setattr(fid, 'load_data', lambda data, data_dir=None: (clean, {'kind': 'images', 'name': data}))
    monkeypatch.setattr(fid, 'make_noisy', make_noisy)
    monkeypatch.setattr(fid, 'generate', generate)
    monkeypatch.setattr(fid, 'load_net', lambda path, device: ('net', {'sigma_n': sigma_n, 'net': {'arch': 'songunet'}}))
    return calls


def _fid_clean(n=80, res=4, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, res, res)).astype(np.float32)


def test_fid_cli_pixel_ref_and_calc(tmp_path, monkeypatch, capsys):
    clean = _fid_clean()
    calls = _fid_fake_modules(monkeypatch, clean)
    ref = str(tmp_path / 'ref.npz')
    fid.main(['ref', '--data', 'toyimgs', '--features', 'pixel', '--out', ref])
    assert fid.stats_kind(ref) == 'pixel'
    mu, sigma = fid.load_stats(ref, 'pixel')
    u8 = sample.to_uint8(clean)
    assert np.allclose(mu, (u8.reshape(len(u8), -1) / 127.5 - 1).mean(0))
    noisy_ref = str(tmp_path / 'noisy.npz')
    fid.main(['ref', '--data', 'toyimgs', '--features', 'pixel', '--sigma', '0.2', '--seed', '7', '--out', noisy_ref])
    assert ('make_noisy', 0.2, 7, None, 0) in calls
    # a PNG folder (in subfolders) of the same images: pixel FD ~ 0, labelled as such, kind taken from --ref
    for i, im in enumerate(u8):
        os.makedirs(tmp_path / 'imgs' / str(i % 3), exist_ok=True)
        Image.fromarray(im).save(tmp_path / 'imgs' / str(i % 3) / f'{i}.png')
    capsys.readouterr()
    (v,) = fid.main(['calc', '--images', str(tmp_path / 'imgs'), '--ref', ref])
    out = capsys.readouterr().out
    assert abs(v) < 1e-6 and 'pixel FD' in out and 'FID' not in out
    np.savez(str(tmp_path / 's.npz'), samples=u8[:60])
    (v,) = fid.main(['calc', '--images', str(tmp_path / 's.npz'), '--ref', noisy_ref])
    m2, s2 = fid.stats_of(u8[:60].reshape(60, -1) / 127.5 - 1)
    assert v == pytest.approx(fid.frechet_distance(m2, s2, *fid.load_stats(noisy_ref, 'pixel')), rel=1e-9)
    with pytest.raises(SystemExit, match='holds pixel stats'):
        fid.main(['calc', '--images', str(tmp_path / 's.npz'), '--ref', ref, '--features', 'inception'])


def test_fid_cli_net_repeats_and_proximal(tmp_path, monkeypatch, capsys):
    clean = _fid_clean()
    calls = _fid_fake_modules(monkeypatch, clean)
    ref = str(tmp_path / 'ref.npz')
    fid.main(['ref', '--data', 'toyimgs', '--features', 'pixel', '--out', ref])
    capsys.readouterr()
    vals = fid.main(['calc', '--net', 'g.pt', '--num', '80', '--repeats', '3', '--batch', '32', '--ref', ref])
    gens = [c[1] for c in calls if c[0] == 'generate']
    assert [(g[0], g[-1], len(g)) for g in gens] == [(0, 79, 80), (80, 159, 80), (160, 239, 80)]
    assert len(vals) == 3 and max(vals) < 1e-6  # the fake generator replays the data set exactly
    assert '+-' in capsys.readouterr().out
    noisy_ref = str(tmp_path / 'noisy.npz')
    fid.main(['ref', '--data', 'toyimgs', '--features', 'pixel', '--sigma', '0.2', '--out', noisy_ref])
    calls.clear()
    capsys.readouterr()
    (v,) = fid.main(['calc', '--net', 'g.pt', '--num', '80', '--proximal', '--ref', noisy_ref, '--batch', '50'])
    noisy = [c for c in calls if c[0] == 'make_noisy']
    assert [(c[1], c[4]) for c in noisy] == [(0.2, fid.PROXIMAL_STREAM)] * 2 and noisy[0][3] == list(range(50))
    assert 'proximal pixel FD' in capsys.readouterr().out
    (v_clean,) = fid.main(['calc', '--net', 'g.pt', '--num', '80', '--proximal', '--ref', ref])
    assert v_clean > 0.1  # noisy samples vs clean stats
    _fid_fake_modules(monkeypatch, clean, sigma_n=0.0)
    with pytest.raises(SystemExit, match='sigma_n > 0'):
        fid.main(['calc', '--net', 'g.pt', '--num', '8', '--proximal', '--ref', ref])


def test_proximal_noise_is_no_training_items_noise(monkeypatch):
    """A generator that replays the clean training set exactly, corrupted for Proximal FID, must not reproduce the
    noisy training set itself: its Proximal FD is that of an independent noisy copy, not zero."""
    clean = _fid_clean(400, res=2)
    _fid_fake_modules(monkeypatch, clean)
    train = fid.sample_features(pretrain.make_noisy(clean, 0.2, seed=0), 'pixel')      # the teacher's noisy set
    ref = fid.stats_of(train)
    replay = fid.generated_features('net', {'sigma_n': 0.2}, list(range(400)), 'pixel', 'cpu', corrupt=0.2)
    copy = fid.stats_of(fid.sample_features(pretrain.make_noisy(clean, 0.2, seed=1), 'pixel'))
    expected = fid.frechet_distance(*copy, *ref)
    got = fid.frechet_distance(*fid.stats_of(replay), *ref)
    assert not np.allclose(replay, train)
    assert expected > 0.01 and 0.5 * expected < got < 2 * expected, (got, expected)


def test_fid_cli_bad_input(tmp_path, monkeypatch):
    ref = str(tmp_path / 'ref.npz')
    fid.save_stats(ref, np.zeros(48), np.eye(48), 'pixel')
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(SystemExit, match='error: --images .*no .*png'):
        fid.main(['calc', '--images', str(tmp_path / 'empty'), '--ref', ref])
    os.makedirs(tmp_path / 'mixed')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'mixed' / 'a.png')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'mixed' / 'b.png')
    with pytest.raises(SystemExit, match='all images must have one size'):
        fid.main(['calc', '--images', str(tmp_path / 'mixed'), '--ref', ref])
    with pytest.raises(SystemExit, match='error: --ref .*no such file'):
        fid.main(['calc', '--images', str(tmp_path / 'mixed'), '--ref', str(tmp_path / 'none.npz')])
    os.makedirs(tmp_path / 'one')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'one' / 'a.png')
    with pytest.raises(SystemExit, match='need at least 2'):
        fid.main(['calc', '--images', str(tmp_path / 'one'), '--ref', ref])
    np.savez(str(tmp_path / 'big.npz'), samples=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match='48-d stats'):  # pixel stats of 4x4 images vs 8x8 samples
        fid.main(['calc', '--images', str(tmp_path / 'big.npz'), '--ref', ref])
    with pytest.raises(SystemExit, match='need --net'):
        fid.main(['calc', '--images', str(tmp_path / 'big.npz'), '--ref', ref, '--proximal'])
    fid.save_stats(str(tmp_path / 'nan.npz'), np.full(192, np.nan), np.eye(192), 'pixel')
    with pytest.raises(SystemExit, match='nan.npz: mu .* or hold NaN / inf'):
        fid.main(['calc', '--images', str(tmp_path / 'big.npz'), '--ref', str(tmp_path / 'nan.npz')])
    gen, points_teacher = _tiny_ckpt(tmp_path / 'g.pt', 'generator'), _tiny_ckpt(tmp_path / 't.pt', points=True)
    with pytest.raises(SystemExit, match='g.pt was distilled from another teacher than --net'):
        fid.main(['figure', '--net', points_teacher, '--generator', gen, '--out', str(tmp_path / 'f.png')])
    for sigma in ('-1', 'nan'):
        with pytest.raises(SystemExit, match=f'--sigma {float(sigma)}: must be >= 0'):
            fid.main(['ref', '--data', 'shapes', '--features', 'pixel', '--sigma', sigma, '--out', f'{tmp_path}/r.npz'])
    assert not os.path.exists(tmp_path / 'r.npz')
    for out in ('f.txt', 'no/f.png'):                             # checked before any sampling
        with pytest.raises(SystemExit, match=f'--out .*{out}: give an image file'):
            fid.main(['figure', '--net', points_teacher, '--generator', gen, '--out', str(tmp_path / out)])


# --------------------------------------------------------------------------------------------------------------
# Theory (Sec. 5, Theorem 1): a linear low-rank Gaussian model, checked without a GPU


# Theory (Sec. 5, Theorem 1): a linear low-rank Gaussian model, checked without a GPU.
#   clean x = U z (U: d x r orthonormal, z ~ N(0, I_r)); noisy y = x + sigma_n eps, p_y = N(0, U U^T + sigma_n^2 I).
#   A rank-r linear generator G(z) = W z, distilled against the exact NOISY score, converges to
#   W W^T = (1 + sigma_n^2) U U^T, so W2^2(distilled, clean) = r (sqrt(1 + sigma_n^2) - 1)^2 while
#   W2^2(noisy, clean) = r (sqrt(1 + sigma_n^2) - 1)^2 + (d - r) sigma_n^2.
# Every denoiser here is exact: for N(0, S), E[x0 | x0 + sigma eps] = S (S + sigma^2 I)^-1 x.
# ---------------------------------------------------------------------------------------------------------------

_THEORY_D, _THEORY_R, _THEORY_SN = 12, 3, 0.5
_THEORY_DT = torch.float64


def _theory_model(seed):
    """A seeded generator and a random orthonormal U (d x r)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(_THEORY_D, _THEORY_R, generator=g, dtype=_THEORY_DT))
    return g, U


def _theory_psd_sqrt(A):
    e, V = torch.linalg.eigh(A)
    return (V * e.clamp(min=0).sqrt()) @ V.T


def _theory_w2sq(A, B):
    """Squared Wasserstein-2 distance between N(0, A) and N(0, B) (A, B PSD, possibly singular)."""
    rA = _theory_psd_sqrt(A)
    return (A.trace() + B.trace() - 2 * _theory_psd_sqrt(rA @ B @ rA).trace()).item()


def _theory_max_angle_deg(W, U):
    """Largest principal angle between span(W) and span(U), in degrees."""
    Q, _ = torch.linalg.qr(W)
    c = torch.linalg.svdvals(U.T @ Q).clamp(max=1.0).min().item()
    return math.degrees(math.acos(c))


def _theory_denoise(V, lam, x, sigma):
    """Exact x0-prediction for N(0, V diag(lam) V^T) at per-row noise levels sigma: (B, d) -> (B, d)."""
    return ((x @ V) * (lam / (lam + sigma[:, None] ** 2))) @ V.T


def _theory_fisher(W, S_data, sigmas):
    """Eq. (4), closed form: mean over sigma of sigma^4 E_{x ~ N(0, A)} ||grad log N(0, B)(x) - grad log N(0, A)(x)||^2
    with A = W W^T + sigma^2 I (the generator, diffused) and B = S_data + sigma^2 I (the noisy data, diffused);
    E ||(B^-1 - A^-1) x||^2 = tr((B^-1 - A^-1)^2 A). The sigma^4 weight makes it the x0-prediction distance
    ||D_real - D_fake||^2; by the spec any positive weighting has the same minimiser."""
    I = torch.eye(_THEORY_D, dtype=_THEORY_DT)
    s2 = torch.as_tensor(sigmas, dtype=_THEORY_DT)[:, None, None] ** 2
    A, B = W @ W.T + s2 * I, S_data + s2 * I
    M = torch.linalg.inv(B) - torch.linalg.inv(A)
    return (s2[:, 0, 0] ** 2 * torch.einsum('kij,kjl,kli->k', M, M, A)).mean()


class _Linear(torch.nn.Module):
    """A rank-r linear generator in the one-step interface: G(sigma_init z; sigma_init) = W z."""
    def __init__(self, W):
        super().__init__()
        self.W = W

    def forward(self, x, sigma, augment_labels=None):
        return (x / sigma[:, None]) @ self.W.T


def _theory_distill(seed, method='sid', setting='theorem', steps=400, lr=3e-2, batch=256):
    """Trains W with distill.generator_step itself (the product's generator step: input construction, stop-gradients,
    loss), with exact Gaussian teacher / fake denoisers in place of the nets. Returns (W0, W, U).

    setting='theorem' -- Theorem 1's setting, the one that gives W W^T = (1 + sigma_n^2) U U^T: the teacher is the exact
        denoiser of the NOISY data, E[y | y + sigma eps] with p_y = N(0, U U^T + sigma_n^2 I) (an Eq. (1) teacher,
        i.e. the exact noisy score); the generator's samples are NOT corrupted, x_sigma = x_g + sigma eps; the fake
        net is exact for the generator's own N(0, W W^T). Sigmas: SiD's schedule (sigma_min 0.002).
    setting='ambient' -- Algorithm 1's default (ambient loss) with exact nets: the teacher is Eq. (3)'s E[x0 | x0 + sigma
        eps] for the CLEAN data (valid for sigma >= sigma_n), the fake is Eq. (3) trained on y_g = x_g + sigma_n eps,
        i.e. E[x_g | x_g + sigma eps], x_sigma = x_g + sigma eps, sigma >= sigma_n (the --gen-sigma-min variant).
    setting='standard' -- Algorithm 1's standard loss with exact nets: Eq. (1) teacher of p_y, fake exact for the
        corrupted generator N(0, W W^T + sigma_n^2 I), x_in = x_g + sigma_n eps, x_sigma = x_in + sigma eps.
    Adam with SiD's betas (0, 0.999), written out to skip torch.optim's one-off import of torch._dynamo (~8 s
    here), and a cosine-decayed lr."""
    g, U = _theory_model(seed)
    d, r, sn = _THEORY_D, _THEORY_R, _THEORY_SN
    I = torch.eye(d, dtype=_THEORY_DT)
    S_teacher = U @ U.T if setting == 'ambient' else U @ U.T + sn ** 2 * I
    lam_t, V_t = torch.linalg.eigh(S_teacher)
    teacher = lambda x, sigma: _theory_denoise(V_t, lam_t.clamp(min=0), x, sigma)
    c = dict(sigma_init=2.5, sigma_n=sn, loss='standard' if setting == 'standard' else 'ambient', method=method,
             alpha=1.2, lsg=1.0)
    sigma_min = sn if setting == 'ambient' else 0.002
    W = (0.3 * torch.randn(d, r, generator=g, dtype=_THEORY_DT)).requires_grad_(True)
    W0 = W.detach().clone()
    v = torch.zeros_like(W)
    for it in range(steps):
        sigma = distill.sid_sigmas(batch, g, sigma_min=sigma_min).to(_THEORY_DT)
        z = torch.randn(batch, r, generator=g, dtype=_THEORY_DT)
        eps_n = torch.randn(batch, d, generator=g, dtype=_THEORY_DT)
        eps = torch.randn(batch, d, generator=g, dtype=_THEORY_DT)
        Wd = W.detach()
        if setting == 'standard':
            lam_f, V_f = torch.linalg.eigh(Wd @ Wd.T + sn ** 2 * I)
        else:
            V_f, sv, _ = torch.linalg.svd(Wd, full_matrices=False)
            lam_f = sv ** 2
        fake = lambda x, sigma: _theory_denoise(V_f, lam_f, x, sigma)
        loss = distill.generator_step(_Linear(W), teacher, fake, z, eps_n, sigma, eps, c).sum() / batch
        grad, = torch.autograd.grad(loss, W)
        lr_t = lr * (0.02 + 0.49 * (1 + math.cos(math.pi * it / steps)))
        with torch.no_grad():
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)
            W -= lr_t * grad / ((v / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)
    return W0, W.detach(), U


def _theory_expected():
    d, r, sn = _THEORY_D, _THEORY_R, _THEORY_SN
    w2_dist = r * (math.sqrt(1 + sn ** 2) - 1) ** 2
    return w2_dist, w2_dist + (d - r) * sn ** 2


def test_sid_sigmas_follow_edms_rho_schedule_up_to_tmax():
    """distill.sid_sigmas: t ~ U[0, tmax/1000] through EDM's rho-schedule, so sigma runs from sigma_min (t = 0) to
    about 24.4 (t = 0.8), and its q-quantile is the schedule at t = 0.8 q."""
    s = distill.sid_sigmas(400_000, torch.Generator().manual_seed(0)).double()
    at = lambda t: (80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert at(0.8) == pytest.approx(24.4, abs=0.05)
    assert s.min().item() == pytest.approx(0.002, rel=0.01) and s.max().item() == pytest.approx(at(0.8), rel=1e-3)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(s, q).item() == pytest.approx(at(0.8 * q), rel=0.03), q
    assert distill.sid_sigmas(1000, torch.Generator().manual_seed(0), tmax=400).max() <= at(0.4) + 1e-6


def test_theory_gaussian_fisher_closed_form_matches_monte_carlo():
    """Mathematics, not the implementation: the closed form used below is the Fisher divergence (a Monte Carlo
    estimate with exact scores agrees)."""
    g, U = _theory_model(3)
    d, sn = _THEORY_D, _THEORY_SN
    S_y = U @ U.T + sn ** 2 * torch.eye(d, dtype=_THEORY_DT)
    W = torch.randn(d, _THEORY_R, generator=g, dtype=_THEORY_DT)
    sigma = 0.7
    closed = _theory_fisher(W, S_y, [sigma]).item()
    n = 200_000
    x = torch.randn(n, _THEORY_R, generator=g, dtype=_THEORY_DT) @ W.T + \
        sigma * torch.randn(n, d, generator=g, dtype=_THEORY_DT)
    I = torch.eye(d, dtype=_THEORY_DT)
    score_data = -x @ torch.linalg.inv(S_y + sigma ** 2 * I)
    score_gen = -x @ torch.linalg.inv(W @ W.T + sigma ** 2 * I)
    mc = (sigma ** 4 * ((score_data - score_gen) ** 2).sum(1).mean()).item()
    print(f'\n[theory] Fisher divergence at sigma {sigma}: closed form {closed:.5f}, Monte Carlo {mc:.5f}')
    assert abs(mc - closed) < 0.02 * closed


@pytest.mark.parametrize('schedule', ['sid', 'fixed'])
def test_theory_fisher_minimiser_is_inflated_data_subspace(schedule):
    """Mathematics, not the implementation (Theorem 1 itself): directly minimising Eq. (4) over W gives
    W W^T = (1 + sigma_n^2) U U^T for any schedule, and the W2 distances of the spec."""
    g, U = _theory_model(0 if schedule == 'sid' else 1)
    d, r, sn = _THEORY_D, _THEORY_R, _THEORY_SN
    I = torch.eye(d, dtype=_THEORY_DT)
    S_y = U @ U.T + sn ** 2 * I
    sigmas = distill.sid_sigmas(32, g).tolist() if schedule == 'sid' else [0.05, 0.3, 1.0, 3.0]
    W0 = 0.3 * torch.randn(d, r, generator=g, dtype=_THEORY_DT)

    def f(w):
        W = torch.tensor(w, dtype=_THEORY_DT).reshape(d, r).requires_grad_(True)
        val = _theory_fisher(W, S_y, sigmas)
        grad, = torch.autograd.grad(val, W)
        return val.item(), grad.numpy().ravel()

    res = scipy.optimize.minimize(f, W0.numpy().ravel(), jac=True, method='L-BFGS-B',
                                  options=dict(maxiter=2000, ftol=1e-15, gtol=1e-12))
    W = torch.tensor(res.x, dtype=_THEORY_DT).reshape(d, r)
    C, target = W @ W.T, (1 + sn ** 2) * U @ U.T
    rel = (torch.linalg.norm(C - target) / torch.linalg.norm(target)).item()
    eig = torch.linalg.eigvalsh(C)[-r:]
    w2_dist, w2_noisy = _theory_w2sq(C, U @ U.T), _theory_w2sq(S_y, U @ U.T)
    exp_dist, exp_noisy = _theory_expected()
    # the minimiser beats the clean distribution itself under Eq. (4): the theorem's target is NOT W W^T = U U^T
    f_min, f_clean = _theory_fisher(W, S_y, sigmas).item(), _theory_fisher(U, S_y, sigmas).item()
    print(f'\n[theory] direct Fisher minimisation ({schedule} sigmas, {res.nit} L-BFGS iterations): '
          f'top eigenvalues of W W^T {np.round(eig.numpy(), 5).tolist()} (expected {1 + sn ** 2}), '
          f'rel. Frobenius error {rel:.2e}; W2^2(distilled, clean) {w2_dist:.5f} (formula {exp_dist:.5f}), '
          f'W2^2(noisy, clean) {w2_noisy:.5f} (formula {exp_noisy:.5f}); Eq. (4) at W {f_min:.3e}, at U {f_clean:.3e}')
    assert rel < 0.05
    assert torch.allclose(eig, torch.full_like(eig, 1 + sn ** 2), rtol=0.05)
    assert abs(w2_dist - exp_dist) < 0.05 * exp_dist
    assert abs(w2_noisy - exp_noisy) < 0.05 * exp_noisy
    assert w2_dist < w2_noisy
    assert f_min < f_clean


@pytest.mark.parametrize('method', ['sid', 'dmd'])
def test_theory_generator_loss_drives_linear_generator_into_data_subspace(method):
    """distill.generator_step (D-SiD, alpha 1.2; and D-DMD) in Theorem 1's setting (exact noisy-data teacher, exact
    fake for the generator, x_sigma = x_g + sigma eps, SiD's sigmas): W ends in span(U), with W W^T close to
    (1 + sigma_n^2) U U^T and a W2 distance to the clean data far below the noisy data's."""
    W0, W, U = _theory_distill(0, method, 'theorem', steps=400, batch=512)
    r, sn = _THEORY_R, _THEORY_SN
    I = torch.eye(_THEORY_D, dtype=_THEORY_DT)
    angle0, angle = _theory_max_angle_deg(W0, U), _theory_max_angle_deg(W, U)
    C = W @ W.T
    eig = torch.linalg.eigvalsh(C)[-r:]
    rel = (torch.linalg.norm(C - (1 + sn ** 2) * U @ U.T) / torch.linalg.norm((1 + sn ** 2) * U @ U.T)).item()
    w2_dist, w2_noisy = _theory_w2sq(C, U @ U.T), _theory_w2sq(U @ U.T + sn ** 2 * I, U @ U.T)
    exp_dist, _ = _theory_expected()
    name = {'sid': 'SiD', 'dmd': 'DMD'}[method]
    print(f'\n[theory] D-{name} on a linear generator: largest principal angle {angle0:.1f} -> {angle:.2f} deg; '
          f'top eigenvalues of W W^T {np.round(eig.numpy(), 4).tolist()} (theorem {1 + sn ** 2}), rel. error {rel:.3f}; '
          f'W2^2(distilled, clean) {w2_dist:.4f} (theorem {exp_dist:.4f}) vs W2^2(noisy, clean) {w2_noisy:.4f}')
    assert angle0 > 45                                          # it started far from the subspace
    assert angle < 5
    assert torch.allclose(eig, torch.full_like(eig, 1 + sn ** 2), rtol=0.05)
    assert rel < 0.10                                           # includes the SGD jitter out of span(U)
    assert w2_dist < w2_noisy
    assert w2_dist < 1.5 * exp_dist


@pytest.mark.parametrize('loss', ['ambient', 'standard'])
def test_theory_algorithm1_recovers_the_clean_gaussian(loss):
    """Algorithm 1 as distill.generator_step runs it (teacher, fake net and generator with one loss, nets exact): unlike
    Theorem 1's setting (no corruption on the generator side), the fixed point is the CLEAN distribution,
    W W^T = U U^T (the corruption is matched on both sides, or removed on both sides above sigma_n)."""
    W0, W, U = _theory_distill(1, 'sid', loss, steps=300)
    I = torch.eye(_THEORY_D, dtype=_THEORY_DT)
    C = W @ W.T
    eig = torch.linalg.eigvalsh(C)[-_THEORY_R:]
    rel = (torch.linalg.norm(C - U @ U.T) / torch.linalg.norm(U @ U.T)).item()
    angle = _theory_max_angle_deg(W, U)
    w2_dist, w2_noisy = _theory_w2sq(C, U @ U.T), _theory_w2sq(U @ U.T + _THEORY_SN ** 2 * I, U @ U.T)
    exp_dist, _ = _theory_expected()
    print(f'\n[theory] D-SiD, {loss} loss: principal angle {_theory_max_angle_deg(W0, U):.1f} -> {angle:.3f} deg, '
          f'top eigenvalues of W W^T {np.round(eig.numpy(), 4).tolist()} (clean: 1), rel. error {rel:.1e}; '
          f'W2^2(distilled, clean) {w2_dist:.2e} (Theorem 1: {exp_dist:.4f}, noisy data: {w2_noisy:.4f})')
    assert angle < 5
    assert rel < 0.05
    assert w2_dist < 0.2 * exp_dist < w2_noisy


# --------------------------------------------------------------------------------------------------------------
# The front door: README, --help / --dry-run, the quick start at reduced length


def test_readme_algorithm_table_is_complete_and_points_at_real_functions():
    import importlib
    text = open(os.path.join(ROOT, 'README.md')).read()
    refs = re.findall(r'`(\w+)\.py:(\w+)`', text)
    assert len(refs) >= 40
    for mod, fn in refs:
        assert hasattr(importlib.import_module(mod), fn), f'README names {mod}.py:{fn}, which does not exist'
    tables = re.split(r'\*\*Algorithm (\d)', text)
    lines = {int(tables[i]): [int(m) for m in re.findall(r'^\| (\d+) \|', tables[i + 1], re.M)]
             for i in range(1, len(tables) - 1, 2)}
    assert lines == {2: list(range(1, 6)), 1: list(range(1, 15)), 3: list(range(1, 10))}
    for eq in ('Eq. (1)', 'Eq. (2)', 'Eq. (3)', 'Eq. (8)', 'Eq. (9)', 'Eq. (10)', 'Proximal FID'):
        assert f'| {eq}' in text
    # every '# Alg. N, line(s) K' comment in the code names a line of the table
    for name in ('pretrain.py', 'distill.py', 'sample.py'):
        for n, ks in re.findall(r'# Alg\. (\d), lines? ([\d\- ]+)', open(os.path.join(ROOT, name)).read()):
            for k in re.findall(r'\d+', ks):
                assert int(k) in lines[int(n)], (name, n, k)


def test_every_script_answers_help_with_the_papers_names_and_dry_run(tmp_path, capsys, toy_teacher):
    names = {pretrain.main: ['--sigma', '--loss', '--preset', '--kimg', '--batch-gpu', '--augment', '--ema'],
             distill.main: ['--sigma', '--alpha', '--tmax', '--sigma-init', '--method', '--loss', '--glr', '--lsg'],
             sample.main: ['--net', '--mode', '--steps', '--seeds', '--grid'],
             fid.main: ['ref', 'calc', 'figure']}
    for main, flags in names.items():
        with pytest.raises(SystemExit) as e:
            main(['--help'])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(f in out for f in flags), (main.__module__, out)
    pretrain.main(['--data', 'toy', '--sigma', '0.3', '--kimg', '7', '--dry-run'])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg['config']['sigma_n'] == 0.3 and cfg['config']['kimg'] == 7 and cfg['config']['preset'] == 'toy'
    assert cfg['config']['lr'] == networks.PRESETS['toy']['train']['lr']
    distill.main(['--teacher', toy_teacher, '--data', 'toy', '--alpha', '1.5', '--dry-run'])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg['config']['alpha'] == 1.5 and cfg['config']['method'] == 'sid' and cfg['config']['sigma_n'] == 0.2
    assert (cfg['config']['sigma_init'], cfg['config']['tmax']) == (0.5, 450)   # the toy recipe's; SiD's 2.5, 800
    for flags, want in (([], (1.0, 800)), (['--sigma-init', '2.5', '--tmax', '600'], (2.5, 600))):
        distill.main(['--teacher', _tiny_ckpt(tmp_path / 'tiny.pt'), '--data', 'shapes', *flags, '--dry-run'])
        c = json.loads(capsys.readouterr().out)['config']
        assert (c['sigma_init'], c['tmax']) == want
    sample.main(['--net', toy_teacher, '--seeds', '0-9', '--dry-run'])
    assert 'truncated' in capsys.readouterr().out
    pretrain.main([*_TOY, '--resume', toy_teacher, '--dry-run'])   # a resume that fits: the output is JSON only
    assert json.loads(capsys.readouterr().out)['config']['data'] == 'toy'
    for main, flags, words in ((pretrain.main, ['--init', str(tmp_path / 'tiny.pt')], 'differs from this run'),
                               (pretrain.main, ['--resume', str(tmp_path / 'none.pt')], 'does not exist'),
                               (distill.main, ['--teacher', toy_teacher, '--resume', toy_teacher], 'not a generator')):
        with pytest.raises(SystemExit, match=words):               # --dry-run opens what the run would open
            main(['--data', 'toy', '--outdir', str(tmp_path / 'run'), *flags, '--dry-run'])


def test_every_command_in_readme_names_only_flags_its_script_takes(capsys):
    """A reader copies README's commands: each `python|torchrun ... X.py [sub] --flag` must name a flag X.py has."""
    mains = dict(pretrain=pretrain.main, distill=distill.main, sample=sample.main, fid=fid.main)
    text = open(os.path.join(ROOT, 'README.md')).read()
    commands = [c for block in re.findall(r'```bash\n(.*?)```', text, re.S) for line in block.splitlines()
                for c in line.split('#')[0].split('&&')]
    checked = 0
    for cmd in commands:
        m = re.search(r'\b(pretrain|distill|sample|fid)\.py( (?:ref|calc|figure)\b)?(.*)', cmd)
        if not m:
            continue
        with pytest.raises(SystemExit):
            mains[m[1]](([m[2].strip()] if m[2] else []) + ['--help'])
        usage = capsys.readouterr().out
        for flag in re.findall(r'(--[\w-]+)', m[3]):
            assert re.search(rf'{flag}\b', usage), f'README runs {m[1]}.py{m[2] or ""} with {flag}, which it lacks'
        checked += 1
    assert checked >= 10


def test_toy_quickstart_dsd_is_closer_to_the_clean_data_than_ambient_full(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                  # runs/ lands here, found by convention
    pretrain.main(['--data', 'toy', '--kimg', '300', '--snap', '300', '--device', 'cpu'])
    # a sixteenth of the default length, so twice the default learning rates and a short EMA ramp-up
    distill.main(['--data', 'toy', '--kimg', '128', '--snap', '64', '--lr', '1e-4', '--glr', '1e-4', '--ema-rampup',
                  '0.05', '--device', 'cpu'])
    assert 'proximal FD (Fourier features)' in capsys.readouterr().out       # points are not called pixels
    table = fid.main(['figure', '--net', 'runs/pretrain-toy-sigma0.2/latest.pt', '--generator',
                      'runs/distill-toy-sigma0.2/best.pt', '--out', 'fig4.png', '--device', 'cpu'])
    assert Image.open('fig4.png').size[0] > 4 * 300
    full, trunc, dsd, noisy = (table[k] for k in ('Ambient-Full', 'Ambient-Truncated', 'DSD (one step)', 'noisy data'))
    print(json.dumps(table, indent=1))
    assert dsd['curve_dist'] < 0.8 * full['curve_dist']          # cleaner than the teacher's full sampler
    assert dsd['curve_dist'] < 0.8 * noisy['curve_dist']         # and than the data it learned from
    assert dsd['w2'] < full['w2'] and dsd['w2'] < noisy['w2']    # without collapsing onto a few points
    assert trunc['curve_dist'] < full['curve_dist']


def test_under_torchrun_a_bad_input_is_reported_once(tmp_path):
    """Every rank exits, but the line is printed once (torchrun then adds its own failure report)."""
    r = _run('distill.py', '--sigma', '0.2', cwd=tmp_path, nproc=2)
    assert r.returncode != 0 and r.stderr.count('error: no teacher at ') == 1, r.stderr
    assert 'distill.py", line' not in r.stderr                 # no traceback from our code


def test_stale_torchrun_variables_and_a_missing_gpu_end_in_one_clear_line(monkeypatch):
    monkeypatch.setenv('RANK', '3')                  # left over from another launch: no process here is rank 0
    with pytest.raises(SystemExit, match='^error: RANK=3 with WORLD_SIZE=1: launch with torchrun'):
        networks.init_distributed('cpu')
    monkeypatch.delenv('RANK')
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match='^error: RANK=None with WORLD_SIZE=2'):
        networks.init_distributed('cpu')
    monkeypatch.delenv('WORLD_SIZE')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='^error: --device cuda: no CUDA GPU'):
            networks.init_distributed('cuda')


def test_bench_recipe_smoke(tmp_path):
    """bench/bench_recipe.py end to end at tiny budgets on two image sets and one point set: data it makes itself
    (or crops from a photograph), teacher, distillation, the three samplers (and a perfect teacher's, for points),
    the floor (clean training images: nearer the fresh set than the noisy data), the ceiling (--ceiling: the same
    teacher recipe on the clean set), the table."""
    bad = _run('bench/bench_recipe.py', '--quick', '--sets', 'photo', cwd=tmp_path)
    assert bad.returncode != 0 and '--photo None: the set photo needs existing image files' in bad.stderr
    img = np.zeros((60, 90, 3), np.uint8)
    img[:, :45, 0] = img[:, 45:, 2] = 255                      # a photograph: red left half, blue right half
    Image.fromarray(img).save(tmp_path / 'p.png')
    args = ('bench/bench_recipe.py', '--quick', '--sets', 'leaves,photo,clusters', '--photo', tmp_path / 'p.png',
            '--out', tmp_path / 'b')
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 0 and 'clean set' not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = _run(*args, '--ceiling', cwd=tmp_path)        # the finished runs are reused; the ceilings are added to them
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'leaves (pixel FD to clean' in r.stdout and 'clusters (FD (Fourier features) / W2' in r.stdout
    patches = np.load(tmp_path / 'b' / 'photo.npy').astype(int)           # crops of the photograph, area-averaged
    assert patches.shape == (300, 16, 16, 3) and patches[..., 1].max() == 0
    assert (abs(patches[..., 0] + patches[..., 2] - 255) <= 1).all() and patches[..., 0].std() > 50
    assert ((patches[..., 0] > 5) & (patches[..., 0] < 250)).any()       # the edge, averaged: not nearest-neighbour
    for name, key in (('leaves', 'fd'), ('photo', 'fd'), ('clusters', 'w2'), ('clusters', 'fd')):
        (run,) = (tmp_path / 'b').glob(f'{name}-*distill*')
        res = json.load(open(run / 'result.json'))
        vals = [res['best'][k][key] for k in ('floor', 'noisy', 'full', 'truncated', 'dsd', 'clean')]
        vals += [res['latest'][key]]
        assert all(math.isfinite(v) and v > 0 for v in vals) and len(res['proximal']) == 4, res
        every = [json.loads(line)['proximal_fd'] for line in open(run / 'metrics.jsonl')]   # drift: last vs lowest
        assert res['drift'] == pytest.approx(every[-1] / min(every) - 1) and res['drift'] >= 0, (res, every)
        assert res['best']['floor']['fd'] < res['best']['noisy']['fd'], res
        # --ceiling: the same teacher recipe, trained on the clean set (sigma_n = 0)
        teacher, clean = (torch.load(tmp_path / 'b' / f'{name}-teacher-kimg_0.5_snap_0.25_tick_0.25{end}' / 'latest.pt',
                                     weights_only=True) for end in ('', '-clean'))
        got = (teacher['sigma_n'], clean['sigma_n'], clean['kimg'])
        assert got == (0.2, 0, teacher['kimg']), got
    assert r.stdout.count('trained on the clean set: ') == 3
    # a perfect teacher's Ambient-Truncated (the exact posterior mean) pulls the noisy points onto the clusters
    (res,) = [json.load(open(d / 'result.json')) for d in (tmp_path / 'b').glob('clusters-*distill*')]
    perfect, noisy = res['best']['perfect'], res['best']['noisy']
    assert perfect['support'] < 0.4 * noisy['support'] and perfect['fd'] < 0.5 * noisy['fd'], res
    assert 'perfect teacher' in r.stdout
    stop = res['best']['perfect_stop']      # ... at the level the 18-step sampler stops at, 0.296 > sigma_n: blurrier
    assert stop['level'] == pytest.approx(0.2964, abs=1e-4) and stop['support'] > perfect['support'], res
    # --stretch / --move: the same point set 4x larger and moved trains in other units and scores in the set's own
    for extra in ((), ('--stretch', '4', '--move', '10')):
        r = _run('bench/bench_recipe.py', '--quick', '--sets', 'gaussians', '--out', tmp_path / 'b', *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (plain,), (moved,) = ([json.load(open(d / 'result.json')) for d in (tmp_path / 'b').glob(f'gaussians{m}-k*distill*')]
                          for m in ('', '-x4+10'))
    for row in ('floor', 'noisy'):                      # the same points and noise, mapped back: the same distances
        assert moved['best'][row]['fd'] == pytest.approx(plain['best'][row]['fd'], rel=1e-3), (row, plain, moved)
    for m in (plain, moved):                            # the stopping level in the set's units: 0.1395 x 2 (halved)
        assert m['best']['perfect_stop']['level'] == pytest.approx(0.279, abs=1e-3), m
    for row in ('full', 'truncated', 'dsd'):            # samples mapped back to the set's own units, not 4x and 10 off
        assert moved['best'][row]['support'] < 2 * plain['best'][row]['support'], (row, plain, moved)
    t = torch.load(next((tmp_path / 'b').glob('gaussians-x4+10-teacher-*')) / 'latest.pt', weights_only=True)
    assert (t['config']['data_scale'], t['config']['data_shift'], t['sigma_n']) == (8, [8, 8], 0.1), t['config']
    # bench_spectrum.py reads the same runs: one row of finite numbers per checkpoint
    (run,) = (tmp_path / 'b').glob('leaves-*distill*')
    (teacher,) = (tmp_path / 'b').glob('leaves-teacher-*[0-9]')
    r = _run('bench/bench_spectrum.py', '--fresh', tmp_path / 'b' / 'leaves-fresh.npy', run / 'best.pt',
             f'{teacher / "latest.pt"}:truncated', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line.split()[1:] for line in r.stdout.splitlines()[1:]]
    assert len(rows) == 2 and all(len(v) == 7 and all(math.isfinite(float(x)) for x in v) for v in rows), r.stdout
    r = _run('bench/bench_spectrum.py', '--fresh', tmp_path / 'b' / 'leaves-fresh.npy', '--gain', teacher / 'latest.pt',
             cwd=tmp_path)                              # --gain: a row of six finite gains per band
    rows = [line.split(':')[-1].split() for line in r.stdout.splitlines()[1:]]
    assert r.returncode == 0 and len(rows) == 4 and all(len(v) == 6 and all(map(math.isfinite, map(float, v)))
                                                        for v in rows), r.stdout + r.stderr[-2000:]
    bad = _run('bench/bench_spectrum.py', '--fresh', tmp_path / 'none.npy', run / 'best.pt', cwd=tmp_path)
    _one_line_error(bad, r'--fresh .*none\.npy: needs an existing \.npy of clean images \(N, 3, H, W\)')


def test_bench_recipe_grids_parse():
    """Every row of bench_recipe.GRIDS passes flags that pretrain.py and distill.py accept: a misspelt flag fails
    here, not an hour into a grid."""
    for name, rows in bench_recipe.GRIDS.items():
        for row in rows:
            for stage, args in zip((pretrain, distill), map(bench_recipe.as_args, row)):
                try:
                    stage.parse_args(args)
                except SystemExit:
                    pytest.fail(f'--grid {name}: {stage.__name__}.py rejects {args}')


def test_bench_replay_smoke(tmp_path, toy_teacher):
    """bench/bench_replay.py continues a toy distillation from its snapshot with every update logged: twice the same
    stretch gives the same updates (resuming is exact); with the fake net's --lr 100x lower its updates shrink."""
    run = [*_DIST, '--teacher', toy_teacher, '--fid-num', '0', '--kimg', '0.064', '--fake-steps', '1', '--outdir',
           str(tmp_path / 'r')]
    distill.main(run)
    rep = lambda *extra: bench_replay.main([str(tmp_path / 'r' / 'latest.pt'), '--steps', '2', '--out',
                                            str(tmp_path / 'b'), '--', '--kimg', '0.128', *extra])
    first, again, slow = rep(), rep(), rep('--lr', '5e-7')
    assert [r[1] for r in first] == ['fake', 'G'] * 2 and [r[0] for r in first] == [2, 2, 3, 3]
    assert first == again and all(math.isfinite(r[2]) and r[3] > 0 for r in first)
    fake_size = lambda rows: [r[3] for r in rows if r[1] == 'fake']
    assert all(s < 0.1 * f for s, f in zip(fake_size(slow), fake_size(first)))


def test_bench_snapshots_smoke(tmp_path):
    """bench/bench_snapshots.py at tiny budgets: every snapshot is kept and scored; its Proximal FD on the first
    draw of seeds is the one distill.py recorded for that snapshot, and each 'picks' line names the snapshot where
    its column is lowest."""
    r = _run('bench/bench_snapshots.py', '--quick', '--set', 'clusters', '--num', '100', '--draws', '2',
             '--out', tmp_path / 'b', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [[float(v) for v in re.findall(r' (-?[\d.]+)(?=\s|$)', line)] for line in r.stdout.splitlines()
            if line.strip().endswith(tuple('0123456789')) and ' kimg  prox 0-99 ' in line]
    recorded = [json.loads(line) for line in open(tmp_path / 'b' / 'clusters-seed0-distill' / 'metrics.jsonl')]
    assert [row[0] for row in rows] == [m['kimg'] for m in recorded] and len(rows) == 4, r.stdout
    for row, m in zip(rows, recorded):        # kimg, prox 0-99, prox 100-199, prox 0-499, FD to clean
        assert row[1] == pytest.approx(m['proximal_fd'], abs=1e-3) and row[2] != row[1], (row, m)
        assert len(row) == 5 and all(math.isfinite(v) and v > 0 for v in row[1:]), row
    picks = re.findall(r'^(prox \S+|FD to clean) +picks +([\d.]+) kimg', r.stdout, re.M)
    assert [float(k) for _, k in picks] == [min(rows, key=lambda x: x[i])[0] for i in range(1, 5)], (picks, rows)


def test_bench_spectrum_sees_blur_and_grain():
    """bench_spectrum.describe: a set against itself is exact (FD 0, every ratio 1), a second draw of the same
    distribution is near 1, a 2x2 box blur loses the finest band (periods 2-2.67 px) and grain adds to it."""
    rng = np.random.default_rng(0)
    clean, again = (np.clip(rng.normal(0, 0.4, (800, 3, 16, 16)), -1, 1) for _ in range(2))
    same = bench_spectrum.describe(clean, clean)
    assert abs(same['fd']) < 1e-6 and same['var'] == pytest.approx(1) and np.allclose(same['bands'], 1)
    other = bench_spectrum.describe(again, clean)
    assert np.allclose(other['bands'], 1, atol=0.05) and other['var'] == pytest.approx(1, abs=0.05), other
    blur = (clean + np.roll(clean, 1, 2) + np.roll(clean, 1, 3) + np.roll(clean, 1, (2, 3))) / 4
    grain = np.clip(clean + rng.normal(0, 0.2, clean.shape), -1, 1)
    b, g = bench_spectrum.describe(blur, clean), bench_spectrum.describe(grain, clean)
    assert b['bands'][-1] < 0.2 < b['bands'][0] and b['var'] < 0.5 and b['fd'] > other['fd'], b
    assert g['bands'][-1] > 1.1 and g['var'] > 1.1, g


def test_bench_spectrum_gain_of_known_filters():
    """bench_spectrum.band_gain: a denoiser that returns its input passes all of a grain in every band, one that
    returns a constant none, and a 2x2 box blur most of the coarsest band's and little of the finest's."""
    x = np.random.default_rng(0).uniform(-1, 1, (64, 3, 16, 16)).astype(np.float32)
    box = lambda y, s: (y + y.roll(1, 2) + y.roll(1, 3) + y.roll((1, 1), (2, 3))) / 4
    assert np.allclose(bench_spectrum.band_gain(lambda y, s: y, x, [0.1, 0.5]), 1, atol=1e-5)
    assert np.allclose(bench_spectrum.band_gain(lambda y, s: 0 * y, x, [0.1]), 0)
    blur = bench_spectrum.band_gain(box, x, [0.2])[:, 0]
    assert blur[0] > 0.8 and blur[-1] < 0.1 and np.all(np.diff(blur) < 0), blur


def test_bench_gpu_cpu_smoke_mode(tmp_path):
    """bench/bench_gpu.py --device cpu --quick runs every section (tiny preset, a few steps each), reports finite
    numbers and passes its own correctness checks: the GPU benchmark cannot rot between GPU runs."""
    out = tmp_path / 'out'
    r = _run('bench/bench_gpu.py', '--device', 'cpu', '--quick', '--out', out, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / 'bench_gpu.json').read_text())

    def walk(x):
        if isinstance(x, dict):
            yield x
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)
        else:
            yield x
    assert all(k in res for k in ('device', 'phase1', 'phase2', 'sampling', 'fid', 'correctness'))
    items = list(walk(res))
    assert not [d for d in items if isinstance(d, dict) and 'error' in d], json.dumps(res, indent=1)
    assert all(math.isfinite(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool))
    assert min(res['device'][k] for k in ('bf16_tflops', 'tf32_tflops', 'fp32_tflops')) > 0
    for phase in ('phase1', 'phase2'):
        sec = res[phase]
        timed = [row for row in sec['rows'] if 'img_s' in row]
        assert sorted((row['batch'], row['precision']) for row in timed) == \
            [(4, 'bf16'), (4, 'fp32'), (8, 'bf16'), (8, 'fp32')]
        assert all(row['img_s'] > 0 and row['mem_gib'] > 0 and row['tflops'] > 0 for row in timed)
        assert all(0.05 < row['busy'] < 1.2 for row in timed), timed     # share of wall time inside aten ops
        assert all('skipped' in row for row in sec['rows'] if row['precision'] == 'bf16+compile')   # no compile on CPU
        assert sec['flops_per_img'] > 0
    assert res['phase2']['flops_per_img'] > 2 * res['phase1']['flops_per_img']   # three nets, two backward passes
    s = res['sampling']
    assert s['all_finite'] and min(s['one_step_s'], s['full_s'], s['truncated_s']) > 0
    assert res['fid']['finite'] and res['fid']['feature_shape'] == [4, 2048]
    c = res['correctness']
    assert c['all_ok'] and set(c['checks']) == {'precond', 'bf16_loss', 'end_to_end'}, c
    e = c['end_to_end']
    assert (e['pretrain']['step'], e['distill']['step'], e['pretrain_resume']['step'], e['distill_resume']['step']) \
        == (3, 3, 5, 5)
    assert e['pretrain_resume']['first_kimg'] == e['distill_resume']['first_kimg'] == 4 * 8 / 1000   # step 4 of 8
    assert '| correctness | all checks | PASS' in (out / 'bench_gpu.md').read_text()
    assert 'all checks' in r.stdout and 'PASS' in r.stdout
