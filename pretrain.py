"""Phase I of DSD: denoising pretraining of an EDM teacher on a fixed noisy copy of the data (Algorithm 2).

    python pretrain.py --data toy                          # 2-D toy, CPU, about a minute
    torchrun --nproc_per_node=4 pretrain.py --sigma 0.2    # the paper's CIFAR-10 teacher

Read top to bottom: the data and its corruption y = x0 + sigma_n * eps (the only data any stage trains on),
augmentation, the losses of Eqs. (1) and (3), the training-loop bookkeeping that distill.py shares, the noise-level
estimate for data of unknown sigma_n, and the loop of Algorithm 2.
"""
import argparse
import codecs
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import pickle
import resource
import tarfile
import time
import urllib.request
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from networks import PRESETS, build_net, die, end_distributed, init_distributed, load_checkpoint, print0, save_checkpoint
from sample import save_preview

P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal training noise levels
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


# ----------------------------------------------------------------------------------------------
# Data. Every loader returns clean float32 data: images NCHW in [-1, 1], points (N, D).

def toy_points(n, seed):
    """2-D points on a 1-D curve (a sine arc) cut into 5 separated pieces: a low-dimensional set with modes."""
    g = np.random.default_rng(seed)
    piece = g.integers(0, 5, n)
    t = -1.5 + 0.7 * piece + 0.3 * g.random(n)           # pieces of width 0.3, gaps of 0.4
    return np.stack([t, np.sin(2.2 * t)], 1).astype(np.float32)


def toy_curve(m=20000):
    """The clean support of `toy_points`, densely sampled (to measure distance to the clean data)."""
    t = np.concatenate([-1.5 + 0.7 * k + np.linspace(0, 0.3, m // 5) for k in range(5)])
    return np.stack([t, np.sin(2.2 * t)], 1).astype(np.float32)


def shapes_images(n, seed, res=16):
    """Procedural 16x16 RGB images: one anti-aliased disk or square of one of six colours on a grey ground.
    Few degrees of freedom (kind, colour, centre, size), smooth except at the edge."""
    g = np.random.default_rng(seed)
    palette = np.array([[.9, .2, .2], [.2, .8, .3], [.2, .4, .9], [.9, .8, .2], [.8, .3, .8], [.2, .8, .8]])
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    kind, colour = g.integers(0, 2, n), palette[g.integers(0, 6, n)]
    cx, cy, r = g.uniform(5, res - 5, n), g.uniform(5, res - 5, n), g.uniform(2.5, 4.5, n)
    out = np.empty((n, 3, res, res), np.float32)
    for i in range(n):
        dx, dy = xx - cx[i], yy - cy[i]
        dist_out = np.hypot(dx, dy) - r[i] if kind[i] == 0 else np.maximum(abs(dx), abs(dy)) - r[i]
        alpha = np.clip(0.5 - dist_out, 0, 1)               # one-pixel anti-aliased edge
        out[i] = 0.35 * (1 - alpha) + colour[i][:, None, None] * alpha
    return out * 2 - 1


BUILTIN = {'toy': (toy_points, 20000), 'shapes': (shapes_images, 20000)}


def builtin_clean(name, n, seed=1):
    """Fresh clean samples of a built-in set, for evaluation only (training uses seed 0 and noise)."""
    return BUILTIN[name][0](n, seed)


class _NumpyOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles: admit numpy arrays and nothing that could run code."""
    def find_class(self, module, name):
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name == '_reconstruct':
            return np.ndarray.__reduce__(np.zeros(0))[0]                # numpy's own array rebuilder
        if module == 'numpy' and name in ('ndarray', 'dtype'):
            return getattr(np, name)
        if (module, name) == ('_codecs', 'encode'):                       # how protocol 2 spells bytes
            return codecs.encode
        raise pickle.UnpicklingError(f'unexpected global {module}.{name}')


def find_cifar10(data_dir):
    dirs = [d for d in (data_dir, os.environ.get('DSD_DATA'), 'data') if d]
    for path in (os.path.join(d, 'cifar-10-python.tar.gz') for d in dirs):
        if os.path.isfile(path):
            return path
    target = os.path.join(dirs[0], 'cifar-10-python.tar.gz')
    print0(f'downloading CIFAR-10 to {target} (one attempt, 120 s timeout) ...')
    try:
        os.makedirs(dirs[0], exist_ok=True)
        with urllib.request.urlopen(CIFAR_URL, timeout=120) as r, open(target + '.tmp', 'wb') as f:
            f.write(r.read())
        os.replace(target + '.tmp', target)
        return target
    except Exception as e:
        die(f'--data cifar10: cifar-10-python.tar.gz not found in {", ".join(dirs)} and the download failed '
            f'({type(e).__name__}); fetch {CIFAR_URL} by hand and put it in --data-dir, $DSD_DATA or ./data')


def load_cifar10(data_dir):
    path = find_cifar10(data_dir)
    try:
        with tarfile.open(path, 'r:gz') as tar:
            member = lambda k: tar.extractfile(f'cifar-10-batches-py/data_batch_{k}')
            batches = [_NumpyOnly(member(k), encoding='latin1').load()['data'] for k in range(1, 6)]
    except (tarfile.TarError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        die(f'{path}: not a readable cifar-10-python.tar.gz ({e}); delete it and fetch {CIFAR_URL} again')
    return np.concatenate(batches).reshape(-1, 3, 32, 32)        # uint8 NCHW, the 50k training images


def load_images(path, flag='--data'):
    """An image folder (searched recursively) or a .zip of images -> uint8 NHWC RGB, in sorted file order. The one
    image reader: training data here, `fid.py calc --images` there."""
    if os.path.isdir(path):
        names = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
        read = lambda name: open(name, 'rb').read()
    else:
        try:
            read = zipfile.ZipFile(path).read
        except (zipfile.BadZipFile, OSError):
            die(f'{flag} {path}: not a readable zip file')
        names = sorted(n for n in read.__self__.namelist() if n.lower().endswith(IMAGE_EXTS))
    if not names:
        die(f'{flag} {path}: no image files ({"/".join(IMAGE_EXTS)}) in it or below')
    images = []
    for name in names:
        try:
            im = Image.open(io.BytesIO(read(name)))
            images.append(np.asarray(im.convert('RGB')))
        except Exception as e:
            die(f'{flag} {path}: cannot read image {name} ({type(e).__name__})')
        if im.mode[0] in 'IF':                       # 16-bit or float: convert('RGB') clips them to white
            die(f'{flag} {path}: {name} is a {im.mode} (16-bit or float) image; save 8-bit ones or a float NCHW .npy')
        if images[-1].shape != images[0].shape:
            die(f'{flag} {path}: {name} is {images[-1].shape[1]}x{images[-1].shape[0]} but {names[0]} is '
                f'{images[0].shape[1]}x{images[0].shape[0]}; all images must have one size')
    return np.stack(images)


def load_array(path):
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        die(f'{path}: cannot read as .npy/.npz ({type(e).__name__}: {e})')
    if isinstance(arr, np.lib.npyio.NpzFile):
        if len(arr.files) != 1:
            die(f'{path}: the .npz must hold exactly one array, it holds {arr.files}')
        arr = arr[arr.files[0]]
    return arr


def load_data(data, data_dir=None):
    """--data -> (clean or as-given float32 array, info). Images come back NCHW in [-1, 1]."""
    if data in BUILTIN:
        x = builtin_clean(data, BUILTIN[data][1], seed=0)
        return x, dict(name=data, kind='points' if x.ndim == 2 else 'images')
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    if data == 'cifar10':
        imgs = load_cifar10(data_dir)
    elif os.path.isdir(data) or (os.path.isfile(data) and data.endswith('.zip')):
        imgs = load_images(data).transpose(0, 3, 1, 2)
    elif os.path.isfile(data) and data.endswith(('.npy', '.npz')):
        arr = load_array(data)
        if arr.dtype.kind == 'f' and not np.isfinite(arr).all():
            die(f'--data {data}: holds NaN or inf values; drop or repair those items')
        if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] in (1, 3):
            imgs = arr.transpose(0, 3, 1, 2)                # uint8 NHWC images
        elif arr.dtype.kind in 'if' and arr.ndim == 2 and len(arr) > 1 and np.ptp(arr, 0).any():   # points (not uint8)
            return arr.astype(np.float32), dict(name=name, kind='points')
        elif arr.dtype.kind == 'f' and arr.ndim == 4 and arr.shape[1] < arr.shape[3]:
            imgs = arr.astype(np.float32)                   # float NCHW images, already in model units
        else:
            die(f'{data}: expected uint8 NHWC images, float NCHW images or (N, D) points (that are not all equal); '
                f'got {arr.dtype} {arr.shape}')
    else:
        die(f'--data {data}: {"unsupported file type" if os.path.exists(data) else "no such file or folder"}; use '
            'cifar10, toy, shapes, an image folder, a .zip, or a .npy/.npz array')
    if imgs.shape[2] != imgs.shape[3]:
        die(f'--data {data}: images are {imgs.shape[3]}x{imgs.shape[2]}; they must be square (crop or resize them, '
            "e.g. with EDM's dataset_tool.py)")
    if len(imgs) < 2:
        die(f'--data {data}: needs at least 2 images, found {len(imgs)}')
    if imgs.dtype != np.uint8 and imgs.min() >= 0:      # [0, 1] or [0, 255] floats would train as dim, grey images
        die(f'--data {data}: float images are read in model units, [-1, 1]; these lie in [0, {imgs.max():g}]: save '
            f'x * 2 - 1 (or x / 127.5 - 1), or uint8 NHWC')
    return imgs.astype(np.float32) / 127.5 - 1 if imgs.dtype == np.uint8 else imgs, dict(name=name, kind='images')


def make_noisy(clean, sigma, seed=0, index=None, stream=0):
    """y_i = x_i + sigma * eps_i, float32, never clipped; eps_i comes from a generator seeded by (seed, i), so the set
    is the same on every rank, in every run and after resume. `index` numbers the items (default 0..N-1); another
    `stream` (Proximal FID's) draws noise that no training item uses."""
    clean = np.asarray(clean, np.float32)
    if sigma == 0:
        return clean.copy()
    index = range(len(clean)) if index is None else index
    key = lambda i: (seed, int(i)) if stream == 0 else (seed, int(i), 1, stream)   # never a data item's (seed, i)
    noise = np.stack([np.random.default_rng(key(i)).standard_normal(clean.shape[1:], np.float32) for i in index])
    return clean + np.float32(sigma) * noise


def noisy_dataset(data, sigma, seed=0, data_dir=None, already_noisy=False):
    """Alg. 2, line 1: the only data training ever sees, the fixed noisy set, in model units (sigma in data units).
    Points become (x - shift) / scale, scale the power of two that brings their RMS spread into [0.5, 1) and shift their
    mean in multiples of scale: where the toy recipe, whose noise levels are absolute, was measured (README)."""
    x, info = load_data(data, data_dir)
    info.update(scale=1.0, shift=0.0)
    if x.ndim == 2:                                          # exact: scale is a power of two, shift a multiple of it
        s = 2.0 ** math.floor(math.log2(max(float(x.var(0, dtype=np.float64).mean()) ** 0.5, 1e-6) / 0.5))
        info.update(scale=s, shift=[float(np.round(m / s) * s) + 0.0 for m in x.mean(0, dtype=np.float64)])
        x = (x - np.float32(info['shift'])) / np.float32(s)
    y = x if already_noisy else make_noisy(x, sigma / info['scale'], seed)
    return y, dict(info, sha256=hashlib.sha256(y.tobytes()).hexdigest()[:16])    # the fixed noisy set's fingerprint


# ----------------------------------------------------------------------------------------------
# Augmentation. EDM's non-leaky pipe conditions the net on 9 labels. We implement only the transforms that
# permute pixels (x-flip, y-flip, rotation by multiples of 90 degrees, integer translation with reflection):
# they keep the per-pixel noise N(0, sigma_n^2), whereas resampling (fractional scale/rotation/anisotropy)
# would blur and correlate the noise the Ambient loss relies on. Labels use EDM's layout:
# [xflip, yflip, scale, cos(rot)-1, sin(rot), aniso x2, translate x, translate y]; unused slots stay 0.

def augment_choices(n, p, w, g):
    """The augmentation's random choices for n images of width w, one row [x-flip, y-flip, quarter turns, shift x,
    shift y] each, and their labels. Drawn for a whole batch, so that every process can apply its share."""
    on = lambda prob: torch.rand(n, generator=g) < prob
    flip_x = torch.randint(0, 2, (n,), generator=g).bool()         # EDM: x-flip has prob 1/2 whenever p > 0
    flip_y = on(p) & torch.randint(0, 2, (n,), generator=g).bool()
    quarter = torch.where(on(p), torch.randint(0, 4, (n,), generator=g), 0)
    shift = torch.where(on(p)[:, None], (torch.randn(n, 2, generator=g) * w * 0.125).round(), 0).long()
    shift = shift.clamp(-(w - 1), w - 1)
    angle = quarter.float() * (math.pi / 2)
    labels = torch.zeros(n, 9)
    labels[:, 0], labels[:, 1], labels[:, 3], labels[:, 4] = flip_x.float(), flip_y.float(), angle.cos() - 1, angle.sin()
    labels[:, 7:9] = shift.float() / (w * 0.125)
    return torch.stack([flip_x.long(), flip_y.long(), quarter, shift[:, 0], shift[:, 1]], 1), labels


def apply_augment(y, choices):
    """Images NCHW transformed as `choices` (from augment_choices) say: pixels move, values never mix."""
    out = []
    for im, (flip_x, flip_y, quarter, tx, ty) in zip(y, choices.tolist()):
        im = torch.rot90(im.flip([2] * flip_x + [1] * flip_y), quarter, (1, 2))   # x-flip: dim 2 (W), y-flip: dim 1
        if tx or ty:
            pad = torch.nn.functional.pad(im[None], (abs(tx), abs(tx), abs(ty), abs(ty)), mode='reflect')[0]
            im = pad[:, abs(ty) - ty: abs(ty) - ty + im.shape[1], abs(tx) - tx: abs(tx) - tx + im.shape[2]]
        out.append(im)
    return torch.stack(out)


def augment(y, p, g):
    """EDM-style augmentation of a batch with probability p: (augmented images, labels)."""
    choices, labels = augment_choices(len(y), p, y.shape[-1], g)
    return apply_augment(y, choices), labels


# ----------------------------------------------------------------------------------------------
# Algorithm 2's pieces. The fake net in distill.py trains with the same loss (Alg. 1, line 9).

def sample_sigma(n, sigma_n, loss, g, above=False):
    """Alg. 2, line 2: EDM's log-normal noise levels. Eq. (3) needs sigma >= sigma_n: 'ambient' clamps the draws (zero
    loss at sigma_n), 'ambient-x0' (or above=True) draws from the log-normal above sigma_n (inverse CDF, float64)."""
    if (loss == 'ambient-x0' or above and loss == 'ambient') and sigma_n > 0:
        lo = torch.special.ndtr(torch.tensor((math.log(sigma_n) - P_MEAN) / P_STD, dtype=torch.float64))
        z = torch.special.ndtri(lo + (1 - lo) * torch.rand(n, generator=g, dtype=torch.float64)).clamp(max=8)
        return (z * P_STD + P_MEAN).exp().float().clamp(min=sigma_n)
    sigma = (torch.randn(n, generator=g) * P_STD + P_MEAN).exp()
    return sigma if loss == 'standard' else sigma.clamp(min=sigma_n)


def denoising_loss(net, y, sigma, eps, sigma_n, loss, augment_labels=None):
    """Per-element weighted loss on noisy data y: Eq. (3) for loss='ambient' or 'ambient-x0', Eq. (1) for 'standard'."""
    s = sigma.reshape(-1, *[1] * (y.ndim - 1))
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2                          # lambda(sigma), sigma_data = 0.5
    if loss == 'standard':
        x_t = y + s * eps                                              # Alg. 2, line 3 (Eq. 1)
        return weight * (net(x_t, sigma, augment_labels) - y) ** 2    # Alg. 2, line 4: Eq. (1), D predicts E[y | x_t]
    x_t = y + (s ** 2 - sigma_n ** 2).clamp(min=0).sqrt() * eps        # Alg. 2, line 3: x_t ~ x0 + sigma * eps
    x0_hat = net(x_t, sigma, augment_labels)                           # D predicts E[x0 | x_t]
    y_hat = (sigma_n ** 2 / s ** 2) * x_t + (1 - sigma_n ** 2 / s ** 2) * x0_hat   # Tweedie: E[y | x_t]
    if loss == 'ambient-x0':   # y_hat - y carries D's error times (1 - sigma_n^2/sigma^2): weigh D's error by lambda
        weight = weight / (1 - sigma_n ** 2 / s ** 2).clamp(min=0.2) ** 2      # (at most 25x, near sigma_n)
    return weight * (y_hat - y) ** 2                                   # Alg. 2, line 4: Eq. (3)


def ema_beta(batch, nimg, halflife_kimg, rampup):
    """EDM's EMA: half-life in images, ramped up as a fraction of the images seen so far."""
    half = min(halflife_kimg * 1000, nimg * rampup) if rampup else halflife_kimg * 1000
    return 0.5 ** (batch / max(half, 1e-8))


@torch.no_grad()
def update_ema(ema, net, beta):
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.copy_(p.detach().lerp(pe, beta))


def batch_indices(step, batch, n, seed):
    """Positions step*batch ... of an endless stream of shuffled epochs; every rank computes the same list."""
    pos = np.arange(step * batch, (step + 1) * batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        perm = np.random.default_rng((seed, 1, int(epoch))).permutation(n)
        out[sel] = perm[pos[sel] % n]
    return out


def draw_batch(data, step, cfg, augment_dim, g):
    """Alg. 2, line 2: this step's minibatch of noisy data (with augmentation and its labels), its noise levels and
    noise. Everything is drawn for the global batch from (seed, step); each process then takes its share."""
    y = data[torch.from_numpy(batch_indices(step, cfg['batch'], len(data), cfg['seed']))]
    if cfg['xflip'] and y.ndim == 4:
        y = torch.where(torch.rand(len(y), 1, 1, 1, generator=g) < 0.5, y.flip(3), y)
    labels = None
    if augment_dim:
        y, labels = augment(y, cfg['augment'], g) if cfg['augment'] else (y, torch.zeros(len(y), 9))
    return y, sample_sigma(len(y), cfg['sigma_n'], cfg['loss'], g), torch.randn(y.shape, generator=g), labels


# ----------------------------------------------------------------------------------------------
# Training-loop bookkeeping, shared with distill.py: step counts, the optimizer step over micro-batches and
# processes, progress lines, resume and snapshots. None of it is the algorithm; the loops call it around the steps.

def step_generator(seed, step):
    """All the randomness of one step comes from (seed, step): any number of processes draws the same numbers, and a
    resumed run continues exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def steps_of(kimg, batch):
    return max(1, round(kimg * 1000 / batch))


def split_batch(batch, batch_gpu, world):
    """Each process takes batch / world samples, in micro-batches of --batch-gpu whose gradients accumulate."""
    batch_gpu = batch_gpu or batch // world
    if batch_gpu < 1 or batch % (world * batch_gpu):
        die(f'--batch {batch} is not divisible by world size {world} x --batch-gpu {batch_gpu}; '
            f'choose a batch that is a multiple of {world * max(batch_gpu, 1)}')
    return batch_gpu


def optimize(opt, net, ddp, loss_fn, tensors, seed, rank, world, batch_gpu, device, dtype=None):
    """One optimizer step on loss_fn(*micro-batch) over this process's share of the global batch `tensors` (None passes
    through); gradients accumulate over micro-batches, DDP averages them over processes on the last. Dropout is seeded
    by (seed, first sample of the micro-batch), so N processes with --batch-gpu B step as one with B does. Samples with
    a non-finite loss are dropped, non-finite gradients zeroed. Returns (sum of per-sample mean losses, samples, drops)."""
    share = len(tensors[0]) // world
    opt.zero_grad(set_to_none=True)
    total, done, bad = 0.0, 0, 0
    for i in range(rank * share, (rank + 1) * share, batch_gpu):
        part = [t if t is None else t[i:i + batch_gpu].to(device) for t in tensors]
        if device.type == 'cuda':
            part = [t.contiguous(memory_format=torch.channels_last) if t is not None and t.ndim == 4 else t for t in part]
        torch.manual_seed(int(np.random.SeedSequence((*seed, i)).generate_state(1)[0]))
        last = i + batch_gpu >= (rank + 1) * share
        with ddp.no_sync() if world > 1 and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                per = loss_fn(*part).float().flatten(1)
            ok = per.isfinite().all(1)
            (per[ok].sum() / share).backward()
        total += per[ok].mean(1).sum().item()
        done, bad = done + len(per), bad + int((~ok).sum())
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    opt.step()
    return total, done, bad


def on_device(net, device):
    """Image nets run channels-last (NHWC) on GPUs, the layout cuDNN's convolutions are fastest in."""
    nhwc = device.type == 'cuda' and net.config['arch'] != 'mlp'
    return net.to(device, memory_format=torch.channels_last) if nhwc else net.to(device)


def memory_gb(device):
    return (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def log_tick(outdir, sums, step, total_steps, batch, tick_start, run_start, device, rank, world):
    """Sum this tick's totals over the processes, print one progress line and append it to stats.jsonl. Keys
    'loss*' are averaged over 'images' (the samples processed); the rest are counts."""
    vals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(vals)
    s = dict(zip(sums, vals.tolist()))
    n = max(s['images'], 1)
    sec_kimg = (time.time() - tick_start) / (n / 1000)
    rec = dict(kimg=round(step * batch / 1000, 3), **{k: v / n if k.startswith('loss') else int(v) for k, v in s.items()},
               sec_per_kimg=sec_kimg, eta_s=(total_steps - step) * batch / 1000 * sec_kimg, mem_gb=memory_gb(device),
               time_s=time.time() - run_start)
    print0(f'kimg {rec["kimg"]:9.2f}  ' + '  '.join(f'{k} {rec[k]:+.4f}' for k in s if k.startswith('loss')) +
           f'  sec/kimg {sec_kimg:7.2f}  ETA {rec["eta_s"] / 60:7.1f} min  mem {rec["mem_gb"]:.2f} GB')
    if rank == 0:
        with open(os.path.join(outdir, 'stats.jsonl'), 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return rec


def start_run(outdir, record, rank, resumed=None):
    if not resumed and os.path.isfile(os.path.join(outdir, 'latest.pt')):     # a fresh start never writes over a run
        die(f'{outdir} holds a run (latest.pt); add --resume to continue it, or use another --outdir (or delete it)')
    if resumed:                      # here, not in resume_checkpoint, so that a --dry-run prints JSON only
        print0(f'resuming {outdir} at {resumed["kimg"]:g} kimg (step {resumed["state"]["step"]})')
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, 'config.json'), 'w') as f:
            json.dump(record, f, indent=2, default=str)
        for log in (os.path.join(outdir, name) for name in ('stats.jsonl', 'metrics.jsonl')):
            if resumed and os.path.isfile(log):   # drop the lines a killed run wrote after its latest.pt
                with open(log) as f:
                    lines = [t for t in f if t.endswith('\n') and json.loads(t)['kimg'] <= resumed['kimg']]
                with open(log, 'w') as f:
                    f.writelines(lines)


def resume_checkpoint(resume, outdir, kind, net_config, cfg, keys):
    """--resume: the run's latest.pt (or the file given), checked to be this very run so that it continues exactly."""
    path = os.path.join(outdir, 'latest.pt') if resume == 'latest' else resume
    if not os.path.isfile(path):
        die(f'--resume: {path} does not exist; run without --resume to start, or give the latest.pt to resume')
    ck = load_checkpoint(path)
    if ck.get('kind') != kind or 'state' not in ck:
        die(f'--resume {path}: not a {kind} checkpoint with training state (from the same stage)')
    if ck['net'] != net_config:
        diff = sorted(k for k in set(ck['net']) | set(net_config) if ck['net'].get(k) != net_config.get(k))
        die(f'--resume {path}: that run has another architecture (differs in {", ".join(diff)}); use its flags '
            f'or a new --outdir')
    for k in keys:                      # a key an older version did not record is not checked
        if k in ck['config'] and ck['config'][k] != cfg[k]:
            die(f'--resume {path}: that run used {k}={ck["config"].get(k)!r}, this one {cfg[k]!r}; use its flags '
                f'or a new --outdir')
    return ck


def write_snapshot(outdir, ckpt, ema, device):
    """latest.pt (atomically, with the training state) and a preview of the EMA network, named by images seen."""
    save_checkpoint(os.path.join(outdir, 'latest.pt'), ckpt)
    save_preview(ema, ckpt, os.path.join(outdir, f'samples-{round(ckpt["kimg"] * 1000):09d}img.png'), device)


# ----------------------------------------------------------------------------------------------
# The noise level of images nobody gave sigma_n for (--sigma auto, --estimate-sigma): the patch-PCA estimate of
# Chen, Zhu & Heng (ICCV 2015). In the covariance of small patches, a tail of small eigenvalues is filled by the
# noise alone; their mean is sigma^2. Two refinements keep it unbiased on images with edges: each patch is split by
# a 2x2 Haar transform, texture is judged on the coarse part and the noise measured on the fine details (independent
# under white noise, so the choice of patches cannot favour low noise), and only patches whose coarse part looks
# like noise alone are kept (weak texture, after Liu, Tanaka & Okutomi 2013). Points have no estimator.

def _mp_median(ratio):
    """Median of the Marchenko-Pastur law (unit variance, dims/samples = ratio): where the sample-covariance
    eigenvalues of pure noise split in half."""
    r = np.atleast_1d(np.asarray(ratio, np.float64))[:, None]
    lo, hi = (1 - np.sqrt(r)) ** 2, (1 + np.sqrt(r)) ** 2
    x = lo + (hi - lo) * (1 - np.cos(np.linspace(0, np.pi, 400))) / 2       # dense at both square-root edges
    pdf = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * np.pi * r * x)
    cdf = np.cumsum(pdf * np.gradient(x, axis=1), axis=1)
    return np.array([np.interp(c[-1] / 2, c, xs) for c, xs in zip(cdf, x)])


def _noise_variance(d):
    """Chen et al.'s rule on the covariance of d's rows: the largest set of smallest eigenvalues whose mean, scaled
    by the finite-sample median of noise, is not above their median is noise alone. Returns (sigma^2 = their mean, count)."""
    t = torch.from_numpy(d)
    t = t - t.mean(0, dtype=torch.float64).float()
    lam = np.clip(np.linalg.eigvalsh((t.T @ t).double().numpy() / (len(d) - 1)), 0, None)   # ascending
    m = np.arange(1, len(lam) + 1)
    means, medians = np.cumsum(lam) / m, (lam[(m - 1) // 2] + lam[m // 2]) / 2
    k = np.nonzero(means * _mp_median(m / len(d)) <= medians * (1 + 1e-12))[0].max()
    return means[k], k + 1


def estimate_sigma(x, seed=0, n_patches=100_000):
    """Blind estimate of the std of i.i.d. Gaussian noise in images (N, C, H, W): dict(sigma, std, method, n)."""
    x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, np.float32)
    if x.ndim != 4 or not np.isfinite(x).all():
        die(f'--sigma auto estimates the noise of images (N, C, H, W); got data of shape {x.shape}. Give the noise '
            f'level of points with --sigma S')
    rng, (n, c, h, w) = np.random.default_rng(seed), x.shape
    p = 8 if min(h, w) >= 32 else 6 if min(h, w) >= 12 else 4                  # even patch side
    while p > 4 and n * (h - p + 1) * (w - p + 1) < 200 * 3 * c * (p // 2) ** 2:
        p -= 2                                                                  # >= 200 patches per dimension
    total = n * (h - p + 1) * (w - p + 1)
    idx = rng.choice(total, n_patches, replace=False) if total > n_patches else np.arange(total)
    img, row, col = np.unravel_index(idx, (n, h - p + 1, w - p + 1))
    win = np.lib.stride_tricks.sliding_window_view(x, (p, p), axis=(2, 3))[img, :, row, col]   # (k, C, p, p)
    a, b, cc, d = win[..., 0::2, 0::2], win[..., 0::2, 1::2], win[..., 1::2, 0::2], win[..., 1::2, 1::2]
    coarse = (a + b + cc + d) / 2                                               # orthonormal 2x2 Haar transform
    fine = np.concatenate([a - b + cc - d, a + b - cc - d, a - b - cc + d], 1).reshape(len(idx), -1) / 2
    roughness = lambda c: (np.diff(c, axis=-1) ** 2).sum((1, 2, 3)) + (np.diff(c, axis=-2) ** 2).sum((1, 2, 3))
    texture = roughness(coarse)
    order = np.argsort(texture, kind='stable')
    texture, fine, img = texture[order], np.ascontiguousarray(fine[order]), img[order]
    limit = np.quantile(roughness(rng.standard_normal((20000, *coarse.shape[1:]))), 0.99)   # unit noise's texture
    var, dims = _noise_variance(fine[rng.permutation(len(fine))[:20000]])      # all patches: an over-estimate
    keep = -1
    for _ in range(20):   # keep the patches whose coarse part is as flat as noise of the current estimate, re-estimate
        new = max(int(np.searchsorted(texture, var * limit, side='right')), min(len(fine), 10 * fine.shape[1]))
        if new == keep:
            break
        keep = new
        var, dims = _noise_variance(fine[:keep])
    k, parts = min(10, keep // (2 * fine.shape[1])), []                      # the spread over k groups of images
    if k >= 2:
        groups = img[:keep] % k if n >= k else rng.integers(0, k, keep)
        parts = [math.sqrt(_noise_variance(fine[:keep][groups == j])[0]) for j in range(k)
                 if (groups == j).sum() > fine.shape[1]]
    std = float(np.std(parts, ddof=1) / math.sqrt(len(parts))) if len(parts) > 1 else math.nan
    return dict(sigma=math.sqrt(var), std=std, n=n, method=f'patch PCA on weak-texture patches (Chen et al. 2015; {p}x'
                f'{p}x{c} patches, {keep} of {len(idx)} kept, {dims} of {fine.shape[1]} detail dimensions noise only)')


# ----------------------------------------------------------------------------------------------

RANGES = {'> 0': lambda v: 0 < v < math.inf, '>= 0': lambda v: 0 <= v < math.inf, 'in [0, 1]': lambda v: 0 <= v <= 1,
          'in [0, 1)': lambda v: 0 <= v < 1, '0 or >= 2': lambda v: v == 0 or 2 <= v < math.inf}   # 2: a covariance


def check_ranges(args, rules):
    """argparse checks a number flag's type, this its range ({dest: a key of RANGES}), in one line naming the flag."""
    for name, rule in rules.items():
        if getattr(args, name) is not None and not RANGES[rule](getattr(args, name)):
            die(f'--{name.replace("_", "-")} {getattr(args, name)}: must be {rule} (a finite number)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='DSD Phase I: train an EDM teacher on noisy data (Algorithm 2).')
    p.add_argument('--data', default='cifar10', help='cifar10 | toy | shapes | image folder | .zip | .npy/.npz')
    p.add_argument('--data-dir', default=None, help='where cifar-10-python.tar.gz lives (else $DSD_DATA, ./data)')
    p.add_argument('--sigma', default='0.2', help='sigma_n, the noise level of the data; "auto" estimates it (images)')
    p.add_argument('--already-noisy', action='store_true', help='the data is noisy as given: add no noise')
    p.add_argument('--estimate-sigma', action='store_true', help='print an estimate of sigma_n (images) and exit')
    p.add_argument('--loss', choices=['ambient', 'ambient-x0', 'standard'], help='ambient: Eq. (3), the clean score '
                   'above sigma_n; ambient-x0: Eq. (3), D\'s error weighed by lambda (toy default); standard: Eq. (1)')
    p.add_argument('--preset', default=None, help='cifar10|ffhq64|afhq64|celebahq64|tiny|toy (default: by data)')
    p.add_argument('--kimg', type=float, help='training length in thousands of images')
    p.add_argument('--batch', type=int, help='total batch size')
    p.add_argument('--batch-gpu', type=int, default=None, help='per-process batch; smaller accumulates gradients')
    p.add_argument('--lr', type=float, help='Adam learning rate')
    p.add_argument('--warmup', type=float, help='linear learning-rate warm-up, kimg')
    p.add_argument('--dropout', type=float, help='dropout of the U-Net')
    p.add_argument('--augment', type=float, help='probability of EDM-style non-leaky augmentation')
    p.add_argument('--xflip', action='store_true', help='dataset x-flips (no label)')
    p.add_argument('--ema', type=float, help='EMA half-life, kimg')
    p.add_argument('--ema-rampup', type=float, help='EMA ramp-up ratio')
    p.add_argument('--tick', type=float, help='kimg between progress lines')
    p.add_argument('--snap', type=float, help='kimg between snapshots (grid PNG + checkpoint)')
    p.add_argument('--outdir', default=None, help='default runs/pretrain-<data>-sigma<sigma>')
    p.add_argument('--resume', nargs='?', const='latest', default=None,
                   help='continue the run in --outdir (or from the given latest.pt) exactly where it stopped')
    p.add_argument('--init', default=None, help='start from published weights (our .pt or an EDM .pkl)')
    p.add_argument('--seed', type=int, default=0, help='seed of the noisy set and of training')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--compile', action='store_true', help='torch.compile the network')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--dry-run', action='store_true', help='print the resolved configuration and exit')
    return p.parse_args(argv)


def resolve(args):
    """Preset + explicit flags -> the configuration that runs. Returns (cfg, net_config, noisy data, info)."""
    check_ranges(args, dict(kimg='> 0', batch='> 0', batch_gpu='> 0', lr='> 0', warmup='>= 0', dropout='in [0, 1)',
                            augment='in [0, 1]', ema='> 0', ema_rampup='>= 0', tick='> 0', snap='> 0', seed='>= 0'))
    try:
        sigma = None if args.sigma == 'auto' else float(args.sigma)
    except ValueError:
        die(f'--sigma {args.sigma}: not a number; give sigma_n >= 0 (e.g. 0.2) or "auto"')
    if sigma is not None and not 0 <= sigma < math.inf:
        die(f'--sigma {args.sigma}: the noise level must be >= 0 and finite (0 is plain EDM training)')
    if sigma is None and not args.already_noisy:
        die('--sigma auto estimates the noise of data that is already noisy; add --already-noisy')
    y, info = noisy_dataset(args.data, sigma, args.seed, args.data_dir, args.already_noisy)
    estimate = estimate_sigma(y, args.seed) if sigma is None or args.estimate_sigma else None
    sigma = estimate['sigma'] if sigma is None else sigma
    preset = args.preset or ('toy' if y.ndim == 2 else {16: 'tiny', 32: 'cifar10', 64: 'ffhq64'}.get(y.shape[-1]))
    if preset not in PRESETS:
        die(f'--preset {preset}: unknown; choose from {", ".join(PRESETS)}' if preset else f'--data {args.data}: '
            f'{y.shape[-1]}x{y.shape[-1]} images have no default preset; pass --preset tiny (CPU) or cifar10')
    net_cfg, train = copy.deepcopy(PRESETS[preset]['net']), dict(PRESETS[preset]['train'])
    if (info['kind'] == 'points') != (net_cfg.get('arch') == 'mlp'):
        die(f'--preset {preset} is for {"points" if net_cfg.get("arch") == "mlp" else "images"} but --data '
            f'{args.data} holds {info["kind"]}; use --preset {"toy" if info["kind"] == "points" else "tiny"}')
    net_cfg.update(img_channels=y.shape[1], img_resolution=y.shape[-1] if y.ndim == 4 else 0)   # points: D, 0
    if y.ndim == 4 and y.shape[-1] % (k := 2 ** (len(net_cfg['channel_mult']) - 1)):   # each U-Net level halves it
        die(f'--data {args.data}: {y.shape[-1]}px images; --preset {preset} needs a multiple of {k} px (crop or resize)')
    net_cfg['dropout'] = net_cfg['dropout'] if args.dropout is None else args.dropout
    train.update({k: getattr(args, k) for k in ('kimg', 'batch', 'lr', 'warmup', 'augment', 'ema', 'ema_rampup', 'tick',
                                                 'snap') if getattr(args, k) is not None})
    train.setdefault('tick', max(train['kimg'] / 100, 0.1))
    train.setdefault('snap', max(train['kimg'] / 10, train['tick']))
    if train['augment'] and info['kind'] == 'points':
        die('--augment applies to images; use --augment 0 for point data')
    cfg = dict(data=args.data, sigma_n=sigma / info['scale'], data_scale=info['scale'], data_shift=info['shift'],
               loss=args.loss or PRESETS[preset].get('loss', 'ambient'), preset=preset, seed=args.seed,
               already_noisy=args.already_noisy, xflip=args.xflip, precision=args.precision, **train)
    cfg['noisy_sha256'] = info['sha256']          # every rank, --resume and distill.py check it
    if estimate is not None:
        cfg['sigma_estimate'] = estimate
    cfg['outdir'] = args.outdir or os.path.join('runs', f'pretrain-{info["name"]}-sigma{sigma:g}')
    return cfg, net_cfg, y, info


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    cfg, net_cfg, y, info = resolve(args)
    if device.type == 'cpu' and info['kind'] == 'points':
        torch.set_num_threads(1)        # the point MLP is too small for intra-op threads to pay off
    if args.estimate_sigma:
        e = cfg['sigma_estimate']
        print0(f'estimated sigma_n = {e["sigma"]:.4f} +- {e["std"]:.4f} ({e["method"]}, {e["n"]} images)'
               + ('  -- no noise detected' if e['sigma'] < 0.01 else ''))
        return
    batch_gpu = split_batch(cfg['batch'], args.batch_gpu, world)
    if world > 1:                                   # every rank must hold the same noisy set
        shas = [None] * world
        dist.all_gather_object(shas, cfg['noisy_sha256'])
        if len(set(shas)) > 1:
            die(f'the ranks drew different noisy sets ({shas}); check that every node sees the same --data')
    # Alg. 2, line 1: the network D_phi, its EMA (the teacher) and the optimizer.
    torch.manual_seed(cfg['seed'])
    net = build_net(net_cfg).to(device)
    if args.init:
        init = load_checkpoint(args.init)
        if init['net'] != net.config:
            die(f'--init {args.init}: its network {init["net"]} differs from this run\'s {net.config}')
        net.load_state_dict(init['ema'])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg['lr'], betas=(0.9, 0.999), eps=1e-8)
    step = 0
    if args.resume:
        ck = resume_checkpoint(args.resume, cfg['outdir'], 'teacher', net.config, cfg,
                               ('data', 'sigma_n', 'loss', 'seed', 'batch', 'already_noisy', 'noisy_sha256'))
        for m, state in ((net, ck['state']['net']), (ema, ck['ema']), (opt, ck['state']['opt'])):
            m.load_state_dict(state)
        step = ck['state']['step']
    if args.dry_run:                                # after --init / --resume were checked
        print0(json.dumps(dict(config=cfg, net=net_cfg, world=world, batch_gpu=batch_gpu, data_shape=list(y.shape)),
                          indent=2, default=str))
        return
    net, ema = on_device(net, device), on_device(ema, device)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None) \
        if world > 1 else net
    fwd = torch.compile(ddp) if args.compile else ddp
    dtype = torch.bfloat16 if cfg['precision'] == 'bf16' else None
    data, sigma_n, loss = torch.from_numpy(y), float(cfg['sigma_n']), cfg['loss']
    total, tick, snap = (steps_of(cfg[k], cfg['batch']) for k in ('kimg', 'tick', 'snap'))
    start_run(cfg['outdir'], dict(config=cfg, net=net_cfg, world=world, batch_gpu=batch_gpu), rank, args.resume and ck)
    units = f' (model units: (x - {cfg["data_shift"]}) / {cfg["data_scale"]:g})' if info['kind'] == 'points' else ''
    print0(f'{info["name"]}: {len(data)} noisy {info["kind"]} {tuple(data.shape[1:])}, sigma_n={sigma_n:g}{units}, '
           f'loss={loss}, preset={cfg["preset"]}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, '
           f'{total} steps of {cfg["batch"]} on {world} x {device.type}')

    run_start = tick_start = time.time()
    sums = dict(loss=0.0, images=0, nonfinite=0)
    while step < total:
        g = step_generator(cfg['seed'], step)
        y_b, sigma, eps, labels = draw_batch(data, step, cfg, net_cfg['augment_dim'], g)    # Alg. 2, line 2
        for group in opt.param_groups:                   # EDM's linear learning-rate warm-up
            group['lr'] = cfg['lr'] * min(step * cfg['batch'] / max(cfg['warmup'] * 1000, 1e-8), 1)
        # Alg. 2, lines 3-4: corrupt further to level sigma and take a gradient step on Eq. (3) or Eq. (1)
        step_loss = lambda y_b, sigma, eps, labels: denoising_loss(fwd, y_b, sigma, eps, sigma_n, loss, labels)
        out = optimize(opt, net, ddp, step_loss, (y_b, sigma, eps, labels), (cfg['seed'], step, 0), rank, world,
                       batch_gpu, device, dtype)
        step += 1
        update_ema(ema, net, ema_beta(cfg['batch'], step * cfg['batch'], cfg['ema'], cfg['ema_rampup']))  # Alg. 2, line 5
        sums = {k: sums[k] + v for k, v in zip(sums, out)}
        if step % tick == 0 or step == total:
            log_tick(cfg['outdir'], sums, step, total, cfg['batch'], tick_start, run_start, device, rank, world)
            tick_start, sums = time.time(), dict.fromkeys(sums, 0)
        if step % snap == 0 or step == total:
            if rank == 0:                                # the EMA is the teacher
                write_snapshot(cfg['outdir'], dict(format='dsd-1', kind='teacher', net=ema.config,
                                                   ema=ema.state_dict(), sigma_n=sigma_n, loss=loss, data=cfg['data'],
                                                   kimg=step * cfg['batch'] / 1000, config=cfg,
                                                   state=dict(net=net.state_dict(), opt=opt.state_dict(), step=step)),
                               ema, device)
            if world > 1:
                dist.barrier()
    print0(f'done: {os.path.join(cfg["outdir"], "latest.pt")}')
    end_distributed(world)


if __name__ == '__main__':
    main()
